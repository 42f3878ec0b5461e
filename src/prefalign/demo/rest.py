"""The demo row `rest` on the toy tasks, with its per-step curve.

- arith (ReST-EM style): the verifiable gold reward filters; only exact answers pass
  (threshold 0.9 on a reward that gives partial credit below 0.5), each distinct right answer once
  per prompt; behaviour cloning that continues from the last policy (restarting from the base, as
  ReST-EM does, would throw away most of the few optimizer steps a demo can afford).
- sentiment (ReST style): a Bradley-Terry reward model trained here on the world's noisy
  preference pairs filters, with a threshold rising over per-prompt percentiles; VADER, the gold
  reward, only judges. Its curve shows whether the learned reward and the gold reward part ways.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefalign.config import load_config
from prefalign.demo.settings import DemoSettings, evaluate_model
from prefalign.demo.worlds import World
from prefalign.modeling import load_model
from prefalign.rest.loop import RestConfig, run_rest


def demo_rest(world: World, settings: DemoSettings) -> dict:
    """Run ReST on `world` and evaluate it like every other demo row."""
    started = time.perf_counter()
    out = Path(settings.out_dir) / "runs" / world.task / "rest"
    shutil.rmtree(out, ignore_errors=True)  # a demo run starts fresh: quick and full runs differ
    extra: dict[str, Any] = {}
    if world.task == "sentiment":
        reward, extra = sentiment_reward_model(world, out)
    else:
        reward = ["reward.kind=gold", f"reward.task={world.task}"]
    overrides = base_overrides(world, out, settings.quick) + reward + TASK_OVERRIDES[world.task](settings.quick)
    config = load_config(RestConfig, None, overrides)
    result = run_rest(config, log=lambda *_: None)

    row = evaluate_model(world, settings, result.final_model, reference=load_model(world.policy_path, device="cpu"))
    evals = [r["eval"] for r in result.records if r.get("eval")]
    first, last = evals[0], evals[-1]
    row.update(extra)
    row.update(
        reward_kind=config.reward.kind if config.reward.kind != "gold" else f"gold:{world.task}",
        loss=config.improve.loss, grow_steps=config.grow_steps, improve_steps_per_grow=config.improve.steps_per_grow,
        # The held-out curve's ends: does the training reward rise with the gold reward?
        train_reward_gain=round(last["reward"] - first["reward"], 4),
        gold_reward_gain=round(last["gold_reward"] - first["gold_reward"], 4),
        steps=[compact(r) for r in result.records],
        plot=copy_plot(result.plot, Path(settings.out_dir) / f"rest_{world.task}_steps.png"),
        rest_seconds=round(result.seconds, 1),
        total_seconds=round(time.perf_counter() - started, 1),
    )
    return row


def base_overrides(world, out: Path, quick: bool) -> list[str]:
    return [
        f"model.name_or_path={world.policy_path}", "model.device=cpu", f"out_dir={out}",
        f"grow.prompts={world.file('prompts_train.jsonl')}", "grow.batch_size=256",
        f"eval.task={world.task}", f"eval.prompts={world.file('prompts_eval.jsonl')}",
        f"eval.n_prompts={32 if quick else 64}", "eval.samples_per_prompt=2", "eval.seed=0",
        "improve.trainer.batch_size=16", "improve.trainer.progress=false", "improve.trainer.log_every=5",
    ]


def arith_overrides(quick: bool) -> list[str]:
    # ReST-EM: many samples per problem, keep the right answers (each distinct one once per prompt).
    return [
        f"grow_steps={2 if quick else 4}", f"grow.samples_per_prompt={16 if quick else 24}", "grow.max_new_tokens=6",
        "improve.steps_per_grow=1", "improve.thresholds=[0.9]", "improve.dedup=true", "improve.loss=bc",
        # The SFT policy ends its cosine schedule at lr 0: 1e-3 knocked it from 54% to 22% right in
        # the first Improve step, 3e-4 rose unevenly (54 -> 61%), 1e-4 every step (54 -> 73%).
        f"improve.trainer.max_steps={30 if quick else 40}", "improve.trainer.lr=1e-4", "improve.trainer.schedule=constant",
        "eval.n_prompts=128",  # answers are a few tokens: the whole held-out set is cheap
    ]


def sentiment_overrides(quick: bool) -> list[str]:
    return [
        "grow_steps=2", f"grow.n_prompts={64 if quick else 96}", "grow.samples_per_prompt=4",
        "grow.max_new_tokens=24",
        "improve.steps_per_grow=2", "improve.normalize=per_prompt_percentile", "improve.thresholds=[0.4, 0.7]",
        "improve.loss=bc", "improve.trainer.epochs=1", "improve.trainer.lr=5e-4", "improve.trainer.schedule=constant",
    ]


TASK_OVERRIDES = {"arith": arith_overrides, "sentiment": sentiment_overrides}


def sentiment_reward_model(world, out: Path) -> tuple[list[str], dict]:
    """Train a reward model on the world's preference pairs; its held-out accuracy goes in the row."""
    from prefalign.reward_models.train import RewardModelConfig, train_reward_model

    rm_dir = out.with_name("rest_reward_model")
    shutil.rmtree(rm_dir, ignore_errors=True)
    config = load_config(RewardModelConfig, None, [
        f"model.name_or_path={world.policy_path}", f"data.path={world.file('pairs.jsonl')}",
        f"data.eval_path={world.file('pairs_eval.jsonl')}", "data.max_length=64", "data.max_prompt_length=16",
        f"trainer.out_dir={rm_dir}", "trainer.batch_size=16", "trainer.max_steps=48",
        "trainer.lr=1e-3", "trainer.progress=false", "trainer.log_every=8",
    ])
    result = train_reward_model(config, log=lambda *_: None)
    return ["reward.kind=model", f"reward.model_path={result.path}"], {"rm_pair_accuracy": round(result.accuracy, 4)}


def compact(record: dict) -> dict:
    """The per-step figures the demo keeps (the run directory has the full records)."""
    keep = {k: record[k] for k in ("kind", "grow", "improve", "threshold", "kept", "kept_fraction", "samples") if k in record}
    if record["kind"] == "grow":
        keep["grown_reward_mean"] = round(record["reward"]["mean"], 4)
        if "gold_reward" in record:
            keep["grown_gold_reward_mean"] = round(record["gold_reward"]["mean"], 4)
    for k in ("reward", "gold_reward", "kl", "accuracy"):
        if record.get("eval", {}).get(k) is not None:
            keep[k] = record["eval"][k]
    return keep


def copy_plot(src: Path | None, dst: Path) -> str | None:
    if src is None:
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)
