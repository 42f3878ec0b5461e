"""The `genarm` row on SmolLM2 (Xu et al., 2025, GenARM): LoRA ARMs guiding SmolLM2 itself.

A sentiment ARM (a LoRA adapter on SmolLM2 trained with the GenARM objective on the world's
pairs) and a brevity ARM (the same responses against their own first clause, labelled by
brevity); decoding SmolLM2 guided by the sentiment ARM over a sweep of alpha, beside SmolLM2
guided by itself (the sharpening any ARM initialised from its base brings); the two objectives
traded off by weighting both ARMs; ARGS (Khanov et al., 2024) and best-of-N at GenARM's compute,
driven by a reward model trained on the same pairs. Every point is measured on the same held-out
prompts as the other rows: gold reward, brevity, KL(decoding || SmolLM2).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from prefalign.config import load_config
from prefalign.demo.smol_limits import DATA_LIMITS
from prefalign.generation import SamplingParams
from prefalign.smol.rewards import brevity_reward, sentiment_reward

ALPHAS = (0.0, 1.0, 2.0)
TRADEOFF = ((2.0, 0.0), (1.0, 1.0), (0.0, 2.0))  # (sentiment, brevity) ARM weights
HEADLINE_ALPHA = 1.0  # fixed in advance, not picked from the sweep


def arm_overrides(world, settings, pairs: Path, eval_pairs: Path | None, out: Path) -> list[str]:
    """The config overrides of the demo's LoRA ARM on `pairs`."""
    overrides = [
        f"model.name_or_path={world.policy_path}",
        *settings.model_overrides(),
        f"data.path={pairs}",
        *DATA_LIMITS,
        "objective.params={beta_r: 0.1}",
        f"trainer.out_dir={out}",
        *settings.schedule_overrides(),
        f"trainer.lr={settings.lr}",
        "trainer.schedule=constant",
        "trainer.progress=false",
        "trainer.log_every=1",  # every step's batch accuracy, for `learning_curve`
    ]
    if eval_pairs is not None:
        overrides.append(f"data.eval_path={eval_pairs}")
    return overrides


def fit_lora_arm(
    world, settings, pairs: Path, eval_pairs: Path | None, out: Path, extra: Sequence[str] = ()
):
    """The demo's LoRA ARM on `pairs` (`extra`: config overrides on top, for bench/smol_arm.py)."""
    from prefalign.genarm.arm import ArmConfig, train_arm

    overrides = arm_overrides(world, settings, pairs, eval_pairs, out) + list(extra)
    return train_arm(load_config(ArmConfig, None, overrides), log=lambda *_: None)


def learning_curve(history: list[dict]) -> dict:
    """Loss and pair accuracy of the first and last third of a one-epoch run, from each step's
    batch before its update: every pair is then unseen, so the accuracy is held-out (92 pairs
    in thirds of about 30, beside the world's 21 held-out pairs)."""
    steps = [h for h in history if "rewards/accuracies" in h]
    third = max(1, len(steps) // 3)

    def mean(rows: list[dict], key: str) -> float:
        return round(sum(r[key] for r in rows) / len(rows), 4)

    first, last = steps[:third], steps[-third:]
    return {
        "steps_per_third": third,
        "accuracy_first_third": mean(first, "rewards/accuracies") if steps else None,
        "accuracy_last_third": mean(last, "rewards/accuracies") if steps else None,
        "loss_first_third": mean(first, "loss") if steps else None,
        "loss_last_third": mean(last, "loss") if steps else None,
    }


def method_genarm(world, settings, log=print) -> dict:
    from prefalign.demo.genarm import (
        accuracy_change,
        frozen,
        measure,
        run_args,
        run_best_of_n,
        sweep_tradeoff,
    )
    from prefalign.demo.smol_reference import frozen_model
    from prefalign.genarm.arm import concise_pairs
    from prefalign.genarm.decoding import Arm, SampledLogps, guided_generate
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.reward_models.reader import load_reward_model
    from prefalign.reward_models.train import RewardModelConfig, train_reward_model

    work = Path(settings.out_dir) / "genarm-smol"
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    rewards = (sentiment_reward, brevity_reward)
    tokenizer = load_tokenizer(world.policy_path)
    base = frozen_model(str(world.policy_path), settings.dtype)  # shared with other rows
    prompts = world.prompts("eval")[: settings.n_eval_prompts]
    expanded = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    max_new = world.info()["config"]["max_new_tokens"]
    params = SamplingParams(
        max_new_tokens=max_new, temperature=1.0, seed=0, batch_size=len(expanded)
    )

    pairs, pairs_eval = world.file("pairs.jsonl"), world.file("pairs_eval.jsonl")
    sentiment_fit = fit_lora_arm(world, settings, pairs, pairs_eval, work / "arm_sentiment")
    brevity = concise_pairs(pairs, work / "pairs_brevity.jsonl", brevity_reward, seed=0)
    if not brevity["pairs"]:
        raise ValueError(f"no brevity pairs: no response in {pairs} has more than one clause")
    brevity_fit = fit_lora_arm(
        world, settings, work / "pairs_brevity.jsonl", None, work / "arm_brevity"
    )
    dtype = settings.dtype
    sentiment_arm = frozen(load_model(sentiment_fit.model_path, dtype=dtype, device="cpu"))
    brevity_arm = frozen(load_model(brevity_fit.model_path, dtype=dtype, device="cpu"))
    curve = learning_curve(sentiment_fit.train.history)
    log(
        f"  sentiment ARM held-out pair accuracy {accuracy_change(sentiment_fit)}; on unseen "
        f"training pairs {curve['accuracy_first_third']} (first third of the epoch) -> "
        f"{curve['accuracy_last_third']} (last third)"
    )
    lap("train_arms")

    decoded: dict[tuple, dict] = {}

    def guided(arms) -> dict:
        # A weight-0 ARM changes nothing but costs a forward per token: dropped. The same ARMs
        # at the same weights are one decoding (the trade-off's (2, 0) is the sweep's alpha 2).
        arms = [a for a in arms if a.alpha != 0]
        key = tuple((id(a.model), a.alpha) for a in arms)
        if key in decoded:
            return decoded[key]
        recorder = SampledLogps(len(expanded))
        t0 = time.perf_counter()
        gens = guided_generate(base, arms, tokenizer, expanded, params, on_step=recorder)
        decoded[key] = measure(
            expanded,
            gens,
            recorder.logps,
            base,
            tokenizer,
            time.perf_counter() - t0,
            rewards=rewards,
        )
        return decoded[key]

    sweep = []
    for alpha in ALPHAS:
        point = guided([Arm(sentiment_arm, alpha)] if alpha else [])
        sweep.append({"alpha": alpha, **point})
        log(f"  alpha {alpha:g}: gold {point['gold_reward']:.3f} kl {point['kl']:.3f}")
    headline = next(p for p in sweep if p["alpha"] == HEADLINE_ALPHA)
    # Control, as in the toy demo: an ARM that is SmolLM2 plus an adapter makes
    # `pi_base * pi_arm^alpha` about `pi_base^(1 + alpha)`, sampling at temperature
    # 1 / (1 + alpha). SmolLM2 itself as the ARM is that sharpening alone; what the trained
    # ARM adds is the gap between the two at the same alpha.
    control = {
        "alpha": HEADLINE_ALPHA,
        "arm": "SmolLM2 itself (untrained)",
        **guided([Arm(base, HEADLINE_ALPHA)]),
    }
    log(
        f"  control (untrained ARM, alpha {HEADLINE_ALPHA:g}): "
        f"gold {control['gold_reward']:.3f} kl {control['kl']:.3f}"
    )
    lap("alpha_sweep")

    tradeoff = sweep_tradeoff(guided, sentiment_arm, brevity_arm, TRADEOFF, log)
    lap("tradeoff")

    # The reward model of ARGS and best-of-N: SmolLM2 with a score head, every weight trained
    # (the reward-model trainer takes no LoRA), in the demo's dtype, one epoch like an ARM.
    rm_config = load_config(
        RewardModelConfig,
        None,
        [
            f"model.name_or_path={world.policy_path}",
            f"model.dtype={settings.dtype}",
            f"data.path={pairs}",
            f"data.eval_path={pairs_eval}",
            *DATA_LIMITS,
            f"trainer.out_dir={work / 'reward_model'}",
            *settings.schedule_overrides(),
            "trainer.lr=2e-5",
            "trainer.progress=false",
        ],
    )
    rm_fit = train_reward_model(rm_config, log=lambda *_: None)
    rm = frozen(load_reward_model(rm_fit.path).to(dtype=base.dtype))
    lap("train_reward_model")
    baselines = [
        run_args(base, rm, tokenizer, expanded, params, 2, 1.0, rewards=rewards),
        run_best_of_n(base, rm, tokenizer, expanded, params, 2, rewards=rewards),
    ]
    for r in baselines:
        r["reward_model_pair_accuracy"] = rm_fit.accuracy
        log(f"  {r['name']}: gold {r['gold_reward']:.3f} kl {r['kl']:.3f}")
    lap("baselines")

    row = {
        **{k: headline[k] for k in ("gold_reward", "gold_reward_se", "kl", "kl_se", "mean_length")},
        "alpha": HEADLINE_ALPHA,
        "brevity": headline["brevity"],
        "arm": {
            "pair_accuracy": sentiment_fit.pair_accuracy,
            "initial_pair_accuracy": sentiment_fit.initial_pair_accuracy,
            "steps": sentiment_fit.train.steps,
            "lora": not settings.full_finetune,
            **curve,
        },
        "control": control,
        "brevity_arm": {"train_pairs": brevity["pairs"], "steps": brevity_fit.train.steps},
        "base": {
            "gold_reward": sweep[0]["gold_reward"],
            "brevity": sweep[0]["brevity"],
            "mean_length": sweep[0]["mean_length"],
        },
        "sweep": sweep,
        "tradeoff": tradeoff,
        "args": baselines[0],
        "best_of_n": baselines[1],
        "baselines": baselines,
        "timings": timings,
    }
    from prefalign.genarm.plots import plot_alpha_sweep, plot_tradeoff

    plot_alpha_sweep(row, Path(settings.out_dir) / "genarm_alpha_sweep.png")
    plot_tradeoff(row, Path(settings.out_dir) / "genarm_tradeoff.png")
    return row
