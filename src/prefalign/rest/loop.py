"""`prefalign rest`: Reinforced Self-Training (Gulcehre et al. 2023) and ReST-EM, as one recipe.

Read it top to bottom:

    evaluate the initial policy                                  -> record "initial"
    for each Grow step g:
        sample N responses per prompt from the current policy,
        score them, write grown/grow_GGG.jsonl                   -> record "grow-g"
        for each Improve step i (threshold rising):
            keep the pool's samples above threshold_i (raw, [0, 1]-scaled or percentile
            scores, above an optional raw floor, capped per prompt); samples cut at
            grow.max_new_tokens are dropped first (improve.unfinished=keep: kept, no EOS)
            fine-tune with bc | reward_weighted | any objective (+ the original SFT data), at
            lr * lr_decay**i, from the current policy (or from the base model: ReST-EM),
            into improve/gGGG_iII/final
            evaluate on held-out prompts: gold reward, training reward, KL to the initial policy
                                                                 -> record "improve-g-i"
    plot the records over the steps                              -> steps.png

Every record is printed as a line and saved in state.json / steps.jsonl. Resume (`--resume`)
skips every step whose record exists. A Grow step whose data file was written but whose record
was not reuses that file; an Improve step stopped mid-way continues from its own last Trainer
checkpoint (`improve.trainer.save_every`; with the default 0 there is none, so it restarts from
the step's starting policy). Seeds depend only on the step, so a resumed run makes the same
samples and weights as one that never stopped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefalign import tasks
from prefalign.config import ConfigError
from prefalign.errors import RunDirError
from prefalign.manifest import write_manifest
from prefalign.modeling import ModelSpec, load_model, load_tokenizer, resolve_device
from prefalign.rest.evaluate import EvalSpec, HeldOutEval
from prefalign.rest.filtering import normalized_scores, select, threshold_list
from prefalign.rest.grow import (
    GrownSample,
    GrowSpec,
    GrowTimings,
    grow,
    load_prompts,
    read_samples,
    reward_summary,
    write_samples,
)
from prefalign.rest.improve import (
    ImproveSpec,
    Loss,
    build_data,
    improve,
    loss_at,
    reference_spec,
    resolve_losses,
    training_pool,
    with_original,
)
from prefalign.rest.rewards import RewardSpec, gold_reward, load_reward
from prefalign.rest.state import RunState
from prefalign.training.checkpoint import keep_final
from prefalign.training.loop import seed_everything


@dataclass
class RestConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # name_or_path may be a task: toy:arith
    reward: RewardSpec = field(default_factory=RewardSpec)
    grow: GrowSpec = field(default_factory=GrowSpec)
    improve: ImproveSpec = field(default_factory=ImproveSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    out_dir: str = "runs/rest"
    grow_steps: int = 2


@dataclass
class RestResult:
    out_dir: Path
    final_model: str  # the last policy: an Improve step's final/ (or the base model)
    records: list[dict]
    seconds: float
    plot: Path | None


def run_rest(
    config: RestConfig,
    resume: bool = False,
    log=print,
    on_record: Callable[[dict], None] | None = None,
) -> RestResult:
    """Run (or, with `resume`, continue) G Grow steps each followed by I Improve steps."""
    started = time.perf_counter()
    config = task_defaults(config)
    losses = check(config)  # each Improve step's loss, resolved once for the run
    spec, out = config.improve, Path(config.out_dir)
    n_improve = spec.steps_per_grow
    thresholds = threshold_list(
        n_improve * (config.grow_steps if spec.schedule_scope == "run" else 1),
        spec.thresholds,
        spec.schedule,
    )
    device = str(resolve_device(config.model.device))  # before anything loads
    base = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(base)
    original = load_original(spec.original_data, tokenizer)
    reward = load_reward(config.reward, device)
    # Filter with one reward, judge with another: kept apart so reward hacking shows up.
    reward_is_gold = config.reward.kind == "gold" and same_task(
        config.reward.task, config.eval.task
    )
    gold = gold_reward(config.eval.task) if config.eval.task and not reward_is_gold else None
    prompts = load_prompts(config.grow.prompts, config.grow.n_prompts)
    initial = load_model(base, dtype=config.model.dtype, device=device)
    evaluate = HeldOutEval(
        config.eval, tokenizer, initial, reward, reward_is_gold, config.grow.max_new_tokens
    )
    # Only once every input has loaded: a typo must not leave a run directory behind.
    state = RunState.open(out, asdict(config), resume, log)
    write_manifest(out, "rest")

    def finish(record: dict) -> None:
        state.add(record)
        log(format_record(record))
        if on_record is not None:
            on_record(record)

    def load_policy(path: str):
        return load_model(path, dtype=config.model.dtype, device=device)

    if not state.done("initial"):
        t0 = time.perf_counter()
        finish(
            {
                "kind": "initial",
                "model": base,
                "eval": evaluate(initial),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )

    policy_path, policy_name = base, "base"
    grown: list[list[GrownSample]] = []
    for g in range(config.grow_steps):
        # ---- Grow: sample and score with the current policy --------------------------------
        data_file = out / "grown" / f"grow_{g:03d}.jsonl"
        if state.done(f"grow-{g}"):
            if not data_file.exists():
                raise RunDirError(
                    f"{data_file} is missing but state.json says Grow step {g} finished; "
                    "restore it or start a new out_dir"
                )
            samples = read_samples(data_file)
        elif data_file.exists():
            log(f"[rest] grow {g}: reusing {data_file}, written before the run stopped")
            samples = read_samples(data_file)
            finish(grow_record(g, policy_name, samples, data_file, out, None))
        else:
            samples, timings = grow(
                load_policy(policy_path),
                tokenizer,
                prompts,
                config.grow,
                reward,
                g,
                policy_name,
                gold,
            )
            write_samples(data_file, samples)
            finish(grow_record(g, policy_name, samples, data_file, out, timings))
        grown.append(samples)
        pool = [s for step in grown for s in step] if spec.data == "all" else samples

        for i in range(n_improve):
            # ---- Improve: filter at a rising threshold, fine-tune, evaluate ----------------
            key = f"improve-{g}-{i}"
            if done := state.done(key):
                policy_path, policy_name = done["model"], f"g{g}.i{i}"
                continue
            k = i if spec.schedule_scope == "grow" else g * n_improve + i  # the schedules' step
            threshold = thresholds[k]
            start = base if (i == 0 and spec.restart_from_base) else policy_path
            step_dir = out / "improve" / f"g{g:03d}_i{i:02d}"
            lr = spec.trainer.lr * spec.lr_decay**k
            record = improve_step(
                config,
                pool,
                threshold,
                start,
                step_dir,
                tokenizer,
                g,
                i,
                log,
                losses[i],
                lr,
                original,
            )
            t0 = time.perf_counter()
            record["eval"] = evaluate(load_policy(record["model"]))
            record["seconds_eval"] = round(time.perf_counter() - t0, 3)
            finish(record)
            # The step is recorded: its optimizer checkpoints are no longer needed, final/ stays
            # (moved out of the newest checkpoint it links to).
            keep_final(step_dir)
            shutil.rmtree(step_dir / "checkpoints", ignore_errors=True)
            policy_path, policy_name = record["model"], f"g{g}.i{i}"

    plot = None
    try:
        from prefalign.rest.plot import plot_steps

        plot = plot_steps(
            state.records,
            out / "steps.png",
            title=f"ReST: {config.reward.kind} reward, loss {'/'.join(spec.losses) or spec.loss}",
        )
    except ImportError:  # matplotlib is optional
        log("[rest] matplotlib is not installed: no steps.png")
    return RestResult(out, policy_path, state.records, time.perf_counter() - started, plot)


def improve_step(
    config: RestConfig,
    pool: list[GrownSample],
    threshold: float,
    start: str,
    step_dir: Path,
    tokenizer,
    g: int,
    i: int,
    log,
    loss: Loss,
    lr: float,
    original: list[tuple[list[int], list[int]]],
) -> dict:
    """Filter the pool at `threshold`, train from `start` into step_dir/final; returns the
    record."""
    spec = replace(config.improve, loss=loss_at(config.improve, i))
    seed = spec.trainer.seed + 1000 * g + i
    grown = len(pool)
    unfinished = sum(not s.finished for s in pool)
    pool = training_pool(pool, spec.unfinished)
    groups = [s.prompt_index for s in pool]
    scores = normalized_scores([s.reward for s in pool], groups, spec.normalize)
    dedup = [tuple(s.response_ids) for s in pool] if spec.dedup else None
    kept = select(
        scores,
        groups,
        threshold,
        spec.max_per_prompt,
        seed=seed,
        dedup_keys=dedup,
        rewards=[s.reward for s in pool],
        min_reward=spec.min_reward,
    )
    data = build_data(
        loss,
        pool,
        kept,
        scores,
        threshold,
        spec.max_per_prompt,
        seed=seed,
        min_reward=spec.min_reward,
    )
    data = with_original(data, original)
    record = {
        "kind": "improve",
        "grow": g,
        "improve": i,
        "threshold": threshold,
        "normalize": spec.normalize,
        "loss": spec.loss,
        "pool": grown,
        "unfinished": unfinished,  # cut at grow.max_new_tokens
        "unfinished_dropped": grown - len(pool),
        "kept": len(kept),
        "kept_fraction": round(len(kept) / max(1, grown), 5),
        "kept_prompts": len({pool[k].prompt_index for k in kept}),
        "kept_reward": reward_summary([pool[k].reward for k in kept]),
        "examples": len(data),
        "original_examples": len(original),
        "lr": lr,
        "start": start,
    }
    if len(data) < (2 if data.kind == "unpaired" else 1):
        log(
            f"[rest] improve {g}.{i}: nothing to train on at threshold {threshold}; "
            f"the policy stays {start}"
        )
        return {**record, "model": start, "skipped": True, "train_steps": 0}
    seed_everything(seed)  # the step's seed decides a fresh LoRA adapter's init
    # the Trainer places it
    model = load_model(
        start,
        dtype=config.model.dtype,
        device="cpu",
        lora=config.model.lora,
        gradient_checkpointing=config.model.gradient_checkpointing,
        lean_activations=config.model.lean_activations == "auto",
    )
    trainer_config = replace(spec.trainer, out_dir=str(step_dir), seed=seed, lr=lr)
    t0 = time.perf_counter()
    result = improve(
        model,
        tokenizer,
        data,
        spec,
        trainer_config,
        resume=True,
        loss=loss,
        device=config.model.device,
        run_config={
            "rest": asdict(config),
            "grow_step": g,
            "improve_step": i,
            "threshold": threshold,
        },
    )
    losses = [h["loss"] for h in result.history if "loss" in h]
    return {
        **record,
        "model": str(step_dir / "final"),
        "train_steps": result.steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "seconds_train": round(time.perf_counter() - t0, 3),
    }


def load_original(path: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The original SFT rows (`improve.original_data`) as (prompt ids, completion ids)."""
    if not path:
        return []
    from prefalign.data import load_sft_data, tokenize_sft

    loaded = load_sft_data(path, tokenizer=tokenizer)
    rows, _ = tokenize_sft(loaded.records, tokenizer, max_length=None, max_prompt_length=None)
    return [(list(r.prompt_ids), list(r.completion_ids)) for r in rows]


def grow_record(
    g: int,
    policy: str,
    samples: list[GrownSample],
    path: Path,
    out: Path,
    timings: GrowTimings | None,
) -> dict:
    rewards = [s.reward for s in samples]
    record = {
        "kind": "grow",
        "grow": g,
        "policy": policy,
        "file": str(path.relative_to(out)),
        "samples": len(samples),
        "prompts": len({s.prompt_index for s in samples}),
        "reward": reward_summary(rewards),
        "mean_tokens": sum(s.n_tokens for s in samples) / max(1, len(samples)),
        "finished_fraction": sum(s.finished for s in samples) / max(1, len(samples)),
        "distinct_fraction": len({(s.prompt_index, s.response) for s in samples})
        / max(1, len(samples)),
    }
    golds = [s.gold_reward for s in samples if s.gold_reward is not None]
    if golds:
        record["gold_reward"] = reward_summary(golds)
    if timings is not None:  # None: the data file was reused after a stop
        record.update(
            seconds_sample=round(timings.sample_seconds, 3),
            seconds_score=round(timings.score_seconds, 3),
            samples_per_s=round(len(samples) / max(timings.sample_seconds, 1e-9), 2),
        )
    return record


def format_record(r: dict) -> str:
    """The one line printed per step."""
    if r["kind"] == "grow":
        d = r["reward"]
        line = (
            f"[rest] grow {r['grow']}: {r['samples']} samples from {r['policy']}, "
            f"reward mean {d['mean']:.3f} "
            f"(p10 {d['p10']:.3f}, p90 {d['p90']:.3f}), {r['mean_tokens']:.1f} tokens"
        )
        if "gold_reward" in r:
            line += f", gold {r['gold_reward']['mean']:.3f}"
        if "seconds_sample" in r:
            line += (
                f"; {r['seconds_sample']:.1f}s sampling ({r['samples_per_s']:.0f} samples/s)"
                f" + {r['seconds_score']:.1f}s scoring"
            )
        return line
    if r["kind"] == "initial":
        line = "[rest] initial policy"
    else:
        line = (
            f"[rest] improve {r['grow']}.{r['improve']}: threshold {r['threshold']:.3f}, "
            f"kept {r['kept']}/{r['pool']} "
            f"({r['kept_fraction']:.0%}), {r['examples']} examples"
        )
        if r.get("unfinished_dropped"):
            line += f", {r['unfinished_dropped']} unfinished dropped"
        if r.get("loss_first") is not None:
            line += (
                f", {r['loss']} loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                f" ({r['train_steps']} steps, {r['seconds_train']:.1f}s)"
            )
    e = r.get("eval") or {}
    parts = [
        f"{k} {e[k]:.3f}"
        for k in ("reward", "gold_reward", "accuracy", "kl")
        if e.get(k) is not None
    ]
    return line + (" | held-out " + ", ".join(parts) if parts else "")


def task_defaults(config: RestConfig) -> RestConfig:
    """With a task as the model (e.g. `toy:arith`: its default policy), unset prompts, reward task
    and evaluation task default to that task."""
    name = config.model.name_or_path
    if not name or not tasks.is_task_spec(name) or Path(name).exists():
        return config
    return replace(
        config,
        grow=replace(config.grow, prompts=config.grow.prompts or name),
        reward=replace(config.reward, task=config.reward.task or name),
        eval=replace(config.eval, task=config.eval.task or name),
    )


def resolve_model_path(name: str) -> str:
    """A task name (e.g. `toy:arith`) is that task's default policy; local paths become absolute
    (saved adapters name their base)."""
    if not name:
        raise ConfigError(
            "config key 'model.name_or_path' is required (a model directory, hub id, "
            f"or a task: {tasks.describe_tasks()})"
        )
    if tasks.is_task_spec(name) and not Path(name).exists():
        return tasks.resolve_task(name).policy_path()
    return str(Path(name).resolve()) if Path(name).exists() else name


def same_task(a: str | None, b: str | None) -> bool:
    """Whether two task names (aliases included) name one task."""
    return bool(a and b) and tasks.resolve_task(a).name == tasks.resolve_task(b).name


def check(config: RestConfig) -> list[Loss]:
    """Fail on a bad config before any sampling; returns each Improve step's resolved loss."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would grow and write the same files; Grow is not sharded across ranks yet.
        raise ConfigError(
            "prefalign rest runs in one process; start it without `accelerate launch`"
        )
    for key, value in (
        ("grow_steps", config.grow_steps),
        ("improve.steps_per_grow", config.improve.steps_per_grow),
        ("grow.samples_per_prompt", config.grow.samples_per_prompt),
        ("grow.max_new_tokens", config.grow.max_new_tokens),
    ):
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    if config.reward.kind == "gold" and not config.reward.task:
        raise ConfigError(
            "config key 'reward.task' is required with reward.kind=gold (a task: "
            f"{tasks.describe_tasks()}, or user:PROMPTS.jsonl:module:fn)"
        )
    if config.improve.max_per_prompt < 0:
        raise ConfigError(
            "config key 'improve.max_per_prompt' must be >= 0 (0: no cap), "
            f"got {config.improve.max_per_prompt}"
        )
    spec = config.improve
    if spec.losses and len(spec.losses) != spec.steps_per_grow:
        raise ConfigError(
            f"config key 'improve.losses': {len(spec.losses)} losses for "
            f"{spec.steps_per_grow} Improve steps; give one per step"
        )
    if not spec.lr_decay > 0:
        raise ConfigError(
            f"config key 'improve.lr_decay' must be > 0 (1: constant), got {spec.lr_decay}"
        )
    losses = resolve_losses(spec)
    for loss in losses:
        reference_spec(loss, spec.reference)
    if spec.original_data and not all(isinstance(loss, str) for loss in losses):
        raise ConfigError(
            "config key 'improve.original_data': original SFT rows mix into bc / "
            f"reward_weighted steps only, got losses {spec.losses or [spec.loss]}"
        )
    return losses
