"""The scale of logged implicit rewards is the objective's own resolved parameter: a user
objective `sharp(..., beta=0.5)` run without params logs what DPO with beta 0.5 logs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import save_tiny_review_model

from prefalign.config import load_config
from prefalign.toy.corpus import review
from prefalign.training.preference import PreferenceConfig, run_preference

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SHARP = """import torch.nn.functional as F


def sharp(pc, pr, rc, rr, beta=0.5):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    rng = random.Random(0)
    save_tiny_review_model(root / "model", rng)
    pairs = []
    for _ in range(32):
        prompt, good = review(rng)
        bad = review(rng)[1]
        if good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "sharp.py").write_text(SHARP)
    return {"model": root / "model", "pairs": root / "pairs.jsonl", "code": root / "sharp.py"}


def history(tiny, out: Path, *objective: str) -> list[dict]:
    config = load_config(
        PreferenceConfig,
        None,
        [
            f"model.name_or_path={tiny['model']}",
            f"data.path={tiny['pairs']}",
            f"data.eval_path={tiny['pairs']}",
            f"trainer.out_dir={out}",
            "trainer.batch_size=4",
            "trainer.max_steps=4",
            "trainer.lr=1e-3",
            "trainer.log_every=1",
            "trainer.eval_every=2",
            "trainer.progress=false",
            *objective,
        ],
    )
    return run_preference(config, log=lambda *_: None).history


def test_user_objective_logs_rewards_at_its_signature_scale(tiny, tmp_path):
    user = history(tiny, tmp_path / "user", f"objective.code={tiny['code']}:sharp")
    dpo = history(tiny, tmp_path / "dpo", "objective.name=dpo", "objective.params={beta: 0.5}")
    keys = [k for k in dpo[-1] if k.startswith(("rewards/", "eval/pair_margin"))]
    assert "rewards/margins" in keys and "eval/pair_margin" in keys
    assert abs(dpo[-1]["rewards/margins"]) > 1e-4  # the policy moved: the scale shows
    for a, b in zip(user, dpo, strict=True):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_a_user_objective_file_is_imported_once_per_run(tiny, tmp_path):
    """Resolved once and passed down: training and its periodic evaluation share one import."""
    counted = tmp_path / "counted.py"
    counted.write_text(f"open({str(tmp_path / 'imports')!r}, 'a').write('x')\n" + SHARP)
    history(tiny, tmp_path / "run", f"objective.code={counted}:sharp")
    assert (tmp_path / "imports").read_text() == "x"  # 2 before: the run, then its evaluator
