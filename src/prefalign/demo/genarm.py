"""The `genarm` demo row on the sentiment toy world.

Top to bottom: train a sentiment ARM on the world's pairs and a brevity ARM on the same
responses against their own first clause, labelled by brevity; decode the SFT base guided by
the sentiment ARM for a sweep of alpha; trade the two objectives off by weighting both ARMs;
compare with ARGS and best-of-N (driven by a reward model trained on the same pairs) at
comparable compute; and, in the full demo, let the small ARM guide a larger toy base
(weak-to-strong).

Every figure is measured on the same held-out prompts, sampling at temperature 1, as gold
reward (VADER) and KL(decoding || its base), from the log-probs of the distribution each
sample was drawn from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefalign.demo.settings import DemoSettings
from prefalign.demo.worlds import World
from prefalign.evaluation.core import mean_and_se, response_logps
from prefalign.genarm.arm import ArmConfig, ArmResult, concise_pairs, train_arm
from prefalign.genarm.baselines import args_generate, best_of_n, best_of_n_kl_bound
from prefalign.genarm.decoding import Arm, SampledLogps, check_tokenizers, guided_generate
from prefalign.genarm.plots import plot_alpha_sweep, plot_tradeoff
from prefalign.generation import Generation, SamplingParams
from prefalign.modeling import ModelSpec, count_parameters, load_model, load_tokenizer
from prefalign.reward_models.reader import SequenceRewardModel, load_reward_model
from prefalign.reward_models.train import RewardModelConfig, RMData, train_reward_model
from prefalign.toy.rewards import brevity_reward, sentiment_reward
from prefalign.toy.world import ToyConfig, ToyModelSize, get_world
from prefalign.training.loop import TrainerConfig
from prefalign.training.preference import ObjectiveSpec, PreferenceData

# The larger base of the weak-to-strong run: ~3x the parameters of the default toy policy, same
# tokenizer. Fewer preference pairs than the default world: only its policy is used here.
LARGE_BASE = ToyConfig(
    task="sentiment",
    model=ToyModelSize(hidden_size=192, layers=6, heads=6, intermediate_size=576),
    n_pair_prompts=64,
    n_eval_pairs=16,
)


@dataclass
class GenarmPlan:
    alphas: list[float]
    headline_alpha: float  # fixed in advance, not picked from the sweep's results
    tradeoff: list[tuple[float, float]]  # (sentiment, brevity) ARM weights
    # ARM recipe, tuned on the toy's held-out pairs. A small beta_r keeps the Bradley-Terry loss
    # near linear in the margin: with a large one, pairs the SFT prior already orders (short
    # before long) have no gradient and the mislabelled ones drive training. Decoding with
    # alpha then targets the KL coefficient beta = beta_r / alpha.
    arm_lr: float = 5e-4
    arm_epochs: float = 4.0
    beta_r: float = 0.02
    # Baselines; the first of each is at GenARM's compute (base + one equal-sized model per
    # token): ARGS with k=2 (1 + 2 reward-model steps per token), best-of-2 (two decodes).
    args_settings: tuple[tuple[int, float], ...] = ((2, 1.0),)  # (k, weight)
    bon_ns: tuple[int, ...] = (2,)
    weak_to_strong: bool = False
    seed: int = 0

    @classmethod
    def make(cls, quick: bool) -> GenarmPlan:
        if quick:
            # The same ARM recipe as the full demo: halving its epochs left the sentiment ARM at
            # chance on held-out pairs, and doubling the rate to compensate broke the brevity ARM.
            return cls(
                alphas=[0.0, 1.0, 3.0],
                headline_alpha=1.0,
                tradeoff=[(2.0, 0.0), (1.0, 1.0), (0.0, 2.0)],
            )
        return cls(
            alphas=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0],
            headline_alpha=1.0,
            tradeoff=[(2.0, 0.0), (1.5, 0.5), (1.0, 1.0), (0.5, 1.5), (0.0, 2.0)],
            args_settings=((2, 1.0), (10, 1.0)),  # and ARGS's usual k=10, at 5.5x GenARM's compute
            bon_ns=(2, 4),
            weak_to_strong=True,
        )


def demo_genarm(
    world: World, settings: DemoSettings, log=print, plan: GenarmPlan | None = None
) -> dict:
    """The `genarm` row: headline gold reward/KL at a fixed alpha plus sweep, trade-off,
    baselines."""
    if world.task != "sentiment":
        raise ValueError(f"the genarm demo runs on the sentiment world, got '{world.task}'")
    plan = plan or GenarmPlan.make(settings.quick)
    work = Path(settings.out_dir) / "genarm"
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    tokenizer = load_tokenizer(world.policy_path)
    base = frozen(load_model(world.policy_path, device="cpu"))
    max_new = world.info()["config"]["max_new_tokens"]
    prompts = world.prompts("eval")[: settings.n_eval_prompts]
    expanded = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=plan.seed, batch_size=128)

    # 1. Two ARMs from the SFT policy: sentiment (the world's pairs) and brevity (the same
    # responses against their own first clause, labelled by the brevity reward).
    sentiment_fit = fit_arm(
        world.policy_path,
        world.file("pairs.jsonl"),
        world.file("pairs_eval.jsonl"),
        work / "arm_sentiment",
        plan,
    )
    brevity_pairs = concise_pairs(
        world.file("pairs.jsonl"), work / "pairs_brevity.jsonl", brevity_reward, seed=plan.seed
    )
    if not brevity_pairs["pairs"]:
        raise ValueError(
            f"no brevity pairs: no response in {world.file('pairs.jsonl')} has more than one clause"
        )
    brevity_eval = concise_pairs(
        world.file("pairs_eval.jsonl"),
        work / "pairs_brevity_eval.jsonl",
        brevity_reward,
        seed=plan.seed + 1,
    )
    # A held-out set too small to have multi-clause responses leaves the accuracy unmeasured (None).
    brevity_eval_path = work / "pairs_brevity_eval.jsonl" if brevity_eval["pairs"] else None
    brevity_fit = fit_arm(
        world.policy_path,
        work / "pairs_brevity.jsonl",
        brevity_eval_path,
        work / "arm_brevity",
        plan,
    )
    sentiment_arm = frozen(load_model(sentiment_fit.model_path, device="cpu"))
    brevity_arm = frozen(load_model(brevity_fit.model_path, device="cpu"))
    log(
        f"  ARMs' held-out pair accuracy: sentiment {accuracy_change(sentiment_fit)}, "
        f"brevity {accuracy_change(brevity_fit)}"
    )
    lap("train_arms")

    def guided(arms: Sequence[Arm], on: torch.nn.Module = base) -> dict:
        recorder = SampledLogps(len(expanded))
        t0 = time.perf_counter()
        gens = guided_generate(on, arms, tokenizer, expanded, params, on_step=recorder)
        return measure(expanded, gens, recorder.logps, on, tokenizer, time.perf_counter() - t0)

    # 2. Alpha sweep with the sentiment ARM (alpha 0 is the base itself: KL exactly 0).
    sweep = []
    for alpha in plan.alphas:
        point = guided([Arm(sentiment_arm, alpha)])
        sweep.append({"alpha": alpha, **point})
        log(
            f"  alpha {alpha:g}: gold {point['gold_reward']:.3f} kl {point['kl']:.3f} "
            f"brevity {point['brevity']:.3f}"
        )
    headline = next((p for p in sweep if p["alpha"] == plan.headline_alpha), None) or guided(
        [Arm(sentiment_arm, plan.headline_alpha)]
    )
    base_point = next((p for p in sweep if p["alpha"] == 0.0), None) or guided([])
    # Control: the untrained SFT policy as the ARM gives base^(1 + alpha), a colder base. What
    # the trained ARM adds beyond sharpening is the gap between the two at the same alpha.
    control = {
        "alpha": plan.headline_alpha,
        "arm": "the SFT policy itself (untrained)",
        **guided([Arm(base, plan.headline_alpha)]),
    }
    log(
        f"  control (untrained ARM, alpha {plan.headline_alpha:g}): "
        f"gold {control['gold_reward']:.3f} kl {control['kl']:.3f}"
    )
    lap("alpha_sweep")

    # 3. Two objectives: both ARMs, weights swept, no retraining.
    tradeoff = sweep_tradeoff(guided, sentiment_arm, brevity_arm, plan.tradeoff, log)
    lap("tradeoff")

    # 4. Baselines with a reward model trained on the same pairs.
    rm_fit = train_reward_model(
        RewardModelConfig(
            model=ModelSpec(name_or_path=str(world.policy_path), device="cpu"),
            data=RMData(
                path=str(world.file("pairs.jsonl")),
                eval_path=str(world.file("pairs_eval.jsonl")),
                max_length=128,
                max_prompt_length=32,
            ),
            trainer=TrainerConfig(
                out_dir=str(work / "reward_model"),
                batch_size=16,
                epochs=plan.arm_epochs,
                lr=plan.arm_lr,
                schedule="constant",
                seed=plan.seed,
                progress=False,
                log_every=1000,
            ),
        ),
        log=lambda *_: None,
    )
    rm = frozen(load_reward_model(rm_fit.path))
    lap("train_reward_model")
    args_rows = [
        run_args(base, rm, tokenizer, expanded, params, k, w) for k, w in plan.args_settings
    ]
    bon_rows = [run_best_of_n(base, rm, tokenizer, expanded, params, n) for n in plan.bon_ns]
    for r in args_rows + bon_rows:
        r["reward_model_pair_accuracy"] = rm_fit.accuracy
        log(f"  {r['name']}: gold {r['gold_reward']:.3f} kl {r['kl']:.3f}")
    lap("baselines")

    # 5. Weak-to-strong: the small sentiment ARM guides a larger base (full demo only: it builds
    # one).
    if plan.weak_to_strong:
        weak_to_strong = run_weak_to_strong(
            sentiment_arm, tokenizer, expanded, params, plan, guided, log
        )
    else:
        weak_to_strong = {
            "skipped": "full demo only: the first run builds a 3M-parameter toy base "
            "(70 s on 2 idle cores)"
        }
    lap("weak_to_strong")

    row = {
        "gold_reward": headline["gold_reward"],
        "gold_reward_se": headline["gold_reward_se"],
        "kl": headline["kl"],
        "kl_se": headline["kl_se"],
        "mean_length": headline["mean_length"],
        "alpha": plan.headline_alpha,
        "brevity": headline["brevity"],
        "decode_seconds": headline["seconds"],
        "arm": arm_summary(sentiment_fit, plan),
        "brevity_arm": {
            **arm_summary(brevity_fit, plan),
            "train_pairs": brevity_pairs["pairs"],
            "label_agreement": brevity_pairs["label_agreement"],
        },
        "base": {
            "gold_reward": base_point["gold_reward"],
            "brevity": base_point["brevity"],
            "mean_length": base_point["mean_length"],
        },
        "sweep": sweep,
        "control": control,
        "tradeoff": tradeoff,
        "weak_to_strong": weak_to_strong,
        "args": args_rows[0],
        "best_of_n": bon_rows[0],
        "baselines": args_rows + bon_rows,
        "timings": timings,
    }
    plot_alpha_sweep(row, Path(settings.out_dir) / "genarm_alpha_sweep.png")
    plot_tradeoff(row, Path(settings.out_dir) / "genarm_tradeoff.png")
    return row


def sweep_tradeoff(
    guided: Callable[[list[Arm]], dict],
    sentiment_arm: torch.nn.Module,
    brevity_arm: torch.nn.Module,
    weights: Sequence[tuple[float, float]],
    log: Callable[[str], None],
) -> list[dict]:
    """Decode with both ARMs at each pair of weights: the two-objective trade-off, no retraining."""
    points = []
    for ws, wb in weights:
        point = guided([Arm(sentiment_arm, ws), Arm(brevity_arm, wb)])
        points.append(
            {
                "weights": [ws, wb],
                "sentiment": point["gold_reward"],
                "brevity": point["brevity"],
                "kl": point["kl"],
            }
        )
        log(
            f"  weights ({ws:g}, {wb:g}): sentiment {point['gold_reward']:.3f} "
            f"brevity {point['brevity']:.3f}"
        )
    return points


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def fit_arm(
    init: Path, pairs: Path, eval_pairs: Path | None, out_dir: Path, plan: GenarmPlan
) -> ArmResult:
    config = ArmConfig(
        model=ModelSpec(name_or_path=str(init), device="cpu"),
        objective=ObjectiveSpec(name="genarm", params={"beta_r": plan.beta_r}),
        data=PreferenceData(
            path=str(pairs),
            eval_path=str(eval_pairs) if eval_pairs else None,
            max_length=128,
            max_prompt_length=32,
        ),
        trainer=TrainerConfig(
            out_dir=str(out_dir),
            batch_size=16,
            epochs=plan.arm_epochs,
            lr=plan.arm_lr,
            schedule="constant",
            seed=plan.seed,
            progress=False,
            log_every=1000,
        ),
    )
    return train_arm(config, log=lambda *_: None)


def accuracy_change(fit: ArmResult) -> str:
    if fit.pair_accuracy is None:
        return "not measured (no held-out pairs)"
    return f"{fit.initial_pair_accuracy:.3f} -> {fit.pair_accuracy:.3f}"


def arm_summary(fit: ArmResult, plan: GenarmPlan) -> dict:
    return {
        "pair_accuracy": fit.pair_accuracy,
        "initial_pair_accuracy": fit.initial_pair_accuracy,
        "beta_r": plan.beta_r,
        "steps": fit.train.steps,
        "train_seconds": round(fit.train.seconds, 1),
    }


def measure(
    prompts: Sequence[str],
    gens: Sequence[Generation],
    sampled_logps: Sequence[float] | None,
    base: torch.nn.Module,
    tokenizer,
    seconds: float,
    kl_bound: float | None = None,
    rewards: tuple[Callable, Callable] = (sentiment_reward, brevity_reward),
) -> dict:
    """Gold reward, brevity and KL(decoding || base) of samples (or a given KL bound);
    `rewards` are the (gold, brevity) functions of the world (the toy's by default)."""
    gold_fn, brevity_fn = rewards
    golds = [gold_fn(p, g.text) for p, g in zip(prompts, gens, strict=True)]
    brevity = [brevity_fn(p, g.text) for p, g in zip(prompts, gens, strict=True)]
    gold, gold_se = mean_and_se(golds)
    if kl_bound is None:
        base_logps = response_logps(base, gens, tokenizer.pad_token_id)
        kl, kl_se = mean_and_se((torch.tensor(list(sampled_logps)) - base_logps).tolist())
    else:
        kl, kl_se = kl_bound, 0.0
    return {
        "gold_reward": round(gold, 4),
        "gold_reward_se": round(gold_se, 4),
        "kl": round(kl, 4),
        "kl_se": round(kl_se, 4),
        "brevity": round(mean_and_se(brevity)[0], 4),
        "mean_length": round(sum(len(g.response_ids) for g in gens) / max(1, len(gens)), 2),
        "seconds": round(seconds, 2),
    }


def run_args(
    base,
    rm: SequenceRewardModel,
    tokenizer,
    expanded: list[str],
    params: SamplingParams,
    k: int,
    weight: float,
    rewards: tuple[Callable, Callable] = (sentiment_reward, brevity_reward),
) -> dict:
    recorder = SampledLogps(len(expanded))
    t0 = time.perf_counter()
    gens = args_generate(
        base, rm, tokenizer, expanded, params, k=k, weight=weight, on_step=recorder
    )
    point = measure(
        expanded, gens, recorder.logps, base, tokenizer, time.perf_counter() - t0, rewards=rewards
    )
    return {
        "name": f"ARGS k={k}",
        "k": k,
        "weight": weight,
        "model_steps_per_token": 1 + k,
        **point,
    }


def run_best_of_n(
    base,
    rm: SequenceRewardModel,
    tokenizer,
    expanded: list[str],
    params: SamplingParams,
    n: int,
    rewards: tuple[Callable, Callable] = (sentiment_reward, brevity_reward),
) -> dict:
    t0 = time.perf_counter()
    gens, _ = best_of_n(base, tokenizer, expanded, params, n=n, rm=rm)
    point = measure(
        expanded,
        gens,
        None,
        base,
        tokenizer,
        time.perf_counter() - t0,
        kl_bound=best_of_n_kl_bound(n),
        rewards=rewards,
    )
    return {
        "name": f"best-of-{n}",
        "n": n,
        "kl_is_upper_bound": True,
        "model_steps_per_token": n,
        **point,
    }


def run_weak_to_strong(
    arm: torch.nn.Module,
    tokenizer,
    expanded: list[str],
    params: SamplingParams,
    plan: GenarmPlan,
    guided,
    log,
) -> dict:
    t0 = time.perf_counter()
    large_world = get_world("sentiment", LARGE_BASE, log=log)
    large = frozen(load_model(large_world.policy_path, device="cpu"))
    # Every toy model shares one tokenizer; the check makes that a fact, not an assumption.
    check_tokenizers(
        load_tokenizer(large_world.policy_path),
        tokenizer,
        str(large_world.policy_path),
        "the toy ARM",
    )
    build = round(time.perf_counter() - t0, 1)
    alone = guided([], on=large)
    steered = guided([Arm(arm, plan.headline_alpha)], on=large)
    out = {
        "base_parameters": count_parameters(large),
        "arm_parameters": count_parameters(arm),
        "base_build_seconds": large_world.info()["figures"]["build_seconds"],
        "load_or_build_seconds": build,
        "base": alone,
        "guided": {"alpha": plan.headline_alpha, **steered},
    }
    log(
        f"  weak-to-strong: large base gold {alone['gold_reward']:.3f} -> "
        f"{steered['gold_reward']:.3f} with the small ARM (kl {steered['kl']:.3f})"
    )
    return out
