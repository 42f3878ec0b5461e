"""`prefalign demo`: every method that exists, on the embedded toy world, in one report.

Each method is a function (world, settings) -> dict of figures; the demo runs the ones that exist
for each task, evaluates gold reward and KL to the SFT policy on the same held-out prompts, and
writes results.json, report.md and plots. Methods that do not exist yet are absent, never faked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefalign.evaluation.core import evaluate_policy
from prefalign.modeling import load_model, load_tokenizer
from prefalign.toy.world import ToyWorld, get_world


@dataclass
class DemoSettings:
    quick: bool
    n_eval_prompts: int
    samples_per_prompt: int
    out_dir: Path

    @classmethod
    def make(cls, quick: bool, out_dir: Path) -> DemoSettings:
        return cls(quick=quick, n_eval_prompts=64 if quick else 128, samples_per_prompt=2 if quick else 4, out_dir=out_dir)


MethodFn = Callable[[ToyWorld, DemoSettings], dict]


def evaluate_model(world: ToyWorld, settings: DemoSettings, model_path: str | Path, reference=None) -> dict:
    """Gold reward, KL to the SFT policy (and accuracy on arith) of a saved model on held-out prompts."""
    tokenizer = load_tokenizer(model_path)
    policy = load_model(model_path, device="cpu")
    reference = reference if reference is not None else load_model(world.policy_path, device="cpu")
    prompts = world.prompts("eval")[: settings.n_eval_prompts]
    result = evaluate_policy(
        policy, tokenizer, world.task, prompts, reference=reference,
        samples_per_prompt=settings.samples_per_prompt, max_new_tokens=world.info()["config"]["max_new_tokens"],
    )
    return result.summary()


def method_sft(world: ToyWorld, settings: DemoSettings) -> dict:
    return evaluate_model(world, settings, world.policy_path)


@dataclass(frozen=True)
class PreferenceRow:
    """One offline-preference demo row: an objective, a reference mode and its settings."""

    objective: str
    reference: str = "frozen"
    beta: float = 0.1
    data: str = "pairs.jsonl"
    sweep_betas: tuple[float, ...] = ()  # extra betas for the reward/KL frontier (full demo only)
    code: str | None = None  # `file.py:function` of a user (or discovered) objective instead of `objective`

    def overrides(self, world: ToyWorld, out_dir: Path, beta: float, quick: bool) -> list[str]:
        steps = 24 if quick else 48
        objective = [f"objective.code={self.code}"] if self.code else [f"objective.name={self.objective}"]
        return [
            f"model.name_or_path={world.policy_path}",
            f"data.path={world.file(self.data)}",
            *objective,
            f"objective.params={{beta: {beta}}}" if self.takes_beta() else "objective.params={}",
            f"reference.mode={self.reference}",
            # Trust-region settings scaled to a run of a few dozen steps (the paper: alpha 0.6, tau 512).
            "reference.alpha=0.6", "reference.period=4", "reference.tau=12",
            f"trainer.out_dir={out_dir}", "trainer.batch_size=16", f"trainer.max_steps={steps}",
            "trainer.lr=5e-4", "trainer.warmup_ratio=0.1", "trainer.log_every=8", "trainer.progress=false",
            "data.max_length=64", "data.max_prompt_length=16",
        ]

    def takes_beta(self) -> bool:
        if not self.code:
            return True
        from prefalign import objectives

        return objectives.load_user_objective(self.code).accepts("beta")


PREFERENCE_ROWS: dict[str, PreferenceRow] = {
    "dpo": PreferenceRow("dpo", sweep_betas=(0.05, 0.3)),
    "tr-dpo-soft": PreferenceRow("dpo", "soft", sweep_betas=(0.05, 0.3)),
    "tr-dpo-hard": PreferenceRow("dpo", "hard"),
    "ipo": PreferenceRow("ipo", beta=0.5),
    "tr-ipo": PreferenceRow("ipo", "soft", beta=0.5),
    "kto": PreferenceRow("kto", data="unpaired.jsonl"),
    "tr-kto": PreferenceRow("kto", "soft", data="unpaired.jsonl"),
    "discopop": PreferenceRow("discopop", beta=0.05),
}


def run_preference_row(world: ToyWorld, settings: DemoSettings, name: str, row: PreferenceRow) -> dict:
    """Train the row (and its beta sweep in the full demo) from the SFT policy; evaluate each run."""
    from prefalign.config import load_config
    from prefalign.training.preference import PreferenceConfig, run_preference

    reference = load_model(world.policy_path, device="cpu")
    betas = [row.beta] + ([] if settings.quick else list(row.sweep_betas))
    sweep = []
    for beta in betas:
        out = settings.out_dir / "runs" / world.task / f"{name}-beta{beta}"
        config = load_config(PreferenceConfig, None, row.overrides(world, out, beta, settings.quick))
        trained = run_preference(config, log=lambda *_: None)
        point = evaluate_model(world, settings, out / "final", reference=reference)
        point.update(beta=beta, train_seconds=round(trained.seconds, 1))
        sweep.append(point)
    result = dict(sweep[0])
    if len(sweep) > 1:
        result["sweep"] = sorted(sweep, key=lambda p: p["kl"])
    return result


def preference_method(name: str, row: PreferenceRow) -> MethodFn:
    def run(world: ToyWorld, settings: DemoSettings) -> dict:
        return run_preference_row(world, settings, name, row)

    return run


def methods_for(task: str, quick: bool = False) -> dict[str, MethodFn]:
    """The demo rows of a task, in table order."""
    rows: dict[str, MethodFn] = {"sft": method_sft}
    if task == "sentiment":
        from prefalign.discovery.demo import demo_discovery
        from prefalign.genarm.demo import demo_genarm

        rows.update({name: preference_method(name, row) for name, row in PREFERENCE_ROWS.items()})
        if not quick:  # discovery trains a dozen candidates: the full demo's row only
            rows["discovered"] = demo_discovery
        rows["genarm"] = demo_genarm
    from prefalign.rest.demo import demo_rest

    rows["rest"] = demo_rest
    return rows


def run_demo(
    out_dir: Path, quick: bool = False, tasks: list[str] | None = None, log=print, worlds: dict[str, ToyWorld] | None = None,
    world: str = "toy", full_finetune: bool = False,
) -> dict:
    """Run every row of every task; `worlds` replaces the default cached toy worlds (tests use mini ones).

    `world="smollm2"` runs the rows on SmolLM2-135M-Instruct (prefalign.smol.demo), LoRA by
    default or every weight with `full_finetune`; the results have the same shape.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if world == "smollm2":
        from prefalign.smol import demo as smol_demo
        from prefalign.smol.world import get_smol_world

        settings = smol_demo.SmolDemoSettings.make(quick, out_dir, full_finetune=full_finetune)
        get, rows_for = get_smol_world, smol_demo.methods_for
    elif world == "toy":
        settings, get, rows_for = DemoSettings.make(quick, out_dir), get_world, methods_for
    else:
        raise ValueError(f"unknown demo world {world!r}, allowed: toy, smollm2")
    results: dict = {"seconds": 0.0, "quick": quick, "world": world, "tasks": {}}
    for task in tasks or ["sentiment", "arith"]:
        t0 = time.perf_counter()
        task_world = (worlds or {}).get(task) or get(task, log=log)
        task_rows: dict[str, dict] = {}
        results["tasks"][task] = {
            "world": str(task_world.root), "build": task_world.info()["figures"], "methods": task_rows,
            "world_seconds": round(time.perf_counter() - t0, 1),  # building it, or finding it cached
        }
        for name, method in rows_for(task, quick).items():
            t0 = time.perf_counter()
            log(f"[{task}] {name} ...")
            row = method(task_world, settings)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            task_rows[name] = row
            log(f"[{task}] {name}: " + format_row(row) + f" ({row['seconds']:.0f}s)")
            # Kept row by row: an interrupted long run still leaves every finished row.
            (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    from prefalign.evaluation.report import write_demo_report

    table = write_demo_report(results, out_dir)
    from prefalign.evaluation.html_report import write_run_report

    write_run_report(out_dir)  # report.md with every plot, and a self-contained report.html
    print(table)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'} and plots in {results['seconds']:.0f}s")
    return results


def format_row(row: dict) -> str:
    parts = [f"gold_reward={row['gold_reward']:.3f}", f"kl={row['kl']:.3f}"]
    if row.get("accuracy") is not None:
        parts.append(f"accuracy={row['accuracy']:.3f}")
    return " ".join(parts)
