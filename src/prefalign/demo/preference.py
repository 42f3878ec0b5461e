"""The offline preference rows of the demo: DPO, IPO, KTO and DiscoPOP, each with a frozen
reference and with the trust-region (soft / hard) updates of Gorbatovski et al. (2024),
trained from the world's SFT policy on its preference data and evaluated like every row."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prefalign.demo.seeds import with_seed_band
from prefalign.demo.settings import DemoSettings, evaluate_model
from prefalign.demo.worlds import MethodFn, World
from prefalign.modeling import load_model
from prefalign.training.preference import ObjectiveSpec, PreferenceConfig, run_preference


@dataclass(frozen=True)
class PreferenceRow:
    """One offline-preference demo row: an objective, a reference mode and its settings."""

    objective: str
    reference: str = "frozen"
    beta: float = 0.1
    data: str = "pairs.jsonl"
    sweep_betas: tuple[float, ...] = ()  # extra betas for the reward/KL frontier (full demo only)
    code: str | None = None  # `file.py:function` of a user (or discovered) objective

    def config(
        self, world: World, out_dir: Path, beta: float, quick: bool, seed: int = 0
    ) -> PreferenceConfig:
        """The training config of this row at `beta`, with `seed` (batch order)."""
        base = PreferenceConfig()
        return replace(
            base,
            model=replace(base.model, name_or_path=str(world.policy_path)),
            data=replace(
                base.data, path=str(world.file(self.data)), max_length=64, max_prompt_length=16
            ),
            objective=ObjectiveSpec(
                name=base.objective.name if self.code else self.objective,
                code=self.code,
                params={"beta": beta} if self.takes_beta() else {},
            ),
            # Trust-region settings scaled to a run of a few dozen steps (the paper: alpha 0.6,
            # tau 512).
            reference=replace(base.reference, mode=self.reference, alpha=0.6, period=4, tau=12),
            trainer=replace(
                base.trainer,
                out_dir=str(out_dir),
                batch_size=16,
                max_steps=24 if quick else 48,
                lr=5e-4,
                warmup_ratio=0.1,
                log_every=8,
                progress=False,
                seed=seed,
            ),
        )

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


def run_preference_row(world: World, settings: DemoSettings, name: str, row: PreferenceRow) -> dict:
    """Train the row (and its beta sweep in the full demo) from the SFT policy once per seed of
    the settings; each point is the mean over seeds with its seed band."""
    reference = load_model(world.policy_path, device="cpu")
    betas = [row.beta] + ([] if settings.quick else list(row.sweep_betas))
    sweep = []
    for beta in betas:
        runs = []
        for seed in settings.seeds:
            out = settings.out_dir / "runs" / world.task / f"{name}-beta{beta}-seed{seed}"
            config = row.config(world, out, beta, settings.quick, seed=seed)
            trained = run_preference(config, log=lambda *_: None)
            point = evaluate_model(world, settings, out / "final", reference=reference, seed=seed)
            point.update(beta=beta, train_seconds=round(trained.seconds, 1))
            runs.append(point)
        sweep.append(with_seed_band(runs, settings.seeds))
    result = dict(sweep[0])
    if len(sweep) > 1:
        result["sweep"] = sorted(sweep, key=lambda p: p["kl"])
    return result


def preference_method(name: str, row: PreferenceRow) -> MethodFn:
    def run(world: World, settings: DemoSettings) -> dict:
        return run_preference_row(world, settings, name, row)

    return run
