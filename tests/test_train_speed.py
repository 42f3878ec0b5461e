"""Preference training with the exact speed-ups on (shared-prompt rows, cached frozen-reference
log-probs) trains the same policy as the plain computation; the cache is reused across runs
and resumes, and a change of truncation makes a new one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_review_world
from safetensors.torch import load_file

from prefalign.config import load_config
from prefalign.training.preference import PreferenceConfig, run_preference

pytestmark = pytest.mark.usefixtures("one_thread")
PLAIN = ("speed.shared_prompt=off", "speed.reference_cache=off")


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    return save_tiny_review_world(tmp_path, 24)


def train(tiny, out: Path, *extra: str, resume: bool = False) -> tuple[list[str], list[dict]]:
    config = load_config(
        PreferenceConfig,
        None,
        [
            f"model.name_or_path={tiny['model']}",
            f"data.path={tiny['pairs']}",
            f"trainer.out_dir={out}",
            "trainer.batch_size=4",
            "trainer.max_steps=6",
            "trainer.lr=1e-3",
            "trainer.log_every=1",
            "trainer.schedule=constant",
            "trainer.progress=false",
            "objective.params={beta: 0.5}",
            *extra,
        ],
    )
    lines: list[str] = []
    result = run_preference(
        config, resume=resume, log=lambda *a: lines.append(" ".join(map(str, a)))
    )
    return lines, result.history


def assert_same_training(a: Path, b: Path, history_a, history_b) -> None:
    for x, y in zip(history_a, history_b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
    wa, wb = (
        load_file(a / "final" / "model.safetensors"),
        load_file(b / "final" / "model.safetensors"),
    )
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def cache_files(tiny) -> list[Path]:
    return sorted((tiny["pairs"].parent / "pairs.jsonl.refcache").glob("*.safetensors"))


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_speedups_train_the_same_policy_as_the_plain_computation(tiny, tmp_path, objective):
    logs, fast = train(tiny, tmp_path / "fast", f"objective.name={objective}")
    assert "shared-prompt forward: on" in logs
    assert any("reference log-probs: computed for 24 pairs" in line for line in logs)
    plain_logs, plain = train(tiny, tmp_path / "plain", f"objective.name={objective}", *PLAIN)
    assert "shared-prompt forward: off" in plain_logs
    assert not any("reference log-probs" in line for line in plain_logs)
    assert_same_training(tmp_path / "fast", tmp_path / "plain", fast, plain)
    # Each speed-up on its own as well.
    _, shared_only = train(tiny, tmp_path / "shared", f"objective.name={objective}", PLAIN[1])
    _, cache_only = train(tiny, tmp_path / "cache", f"objective.name={objective}", PLAIN[0])
    assert_same_training(tmp_path / "shared", tmp_path / "plain", shared_only, plain)
    assert_same_training(tmp_path / "cache", tmp_path / "plain", cache_only, plain)


def test_reference_cache_is_reused_across_runs_and_resume(tiny, tmp_path):
    train(tiny, tmp_path / "a")
    (first,) = cache_files(tiny)
    stamp = first.stat().st_mtime_ns
    logs, straight = train(
        tiny, tmp_path / "b", "trainer.max_steps=8", "objective.params={beta: 0.2}"
    )
    assert any(f"read from {first}" in line for line in logs)  # a beta sweep computes it once
    assert cache_files(tiny) == [first] and first.stat().st_mtime_ns == stamp
    # Stop at step 4, resume to 8: the resumed run reads the same table and trains identically.
    train(tiny, tmp_path / "c", "trainer.max_steps=4", "objective.params={beta: 0.2}")
    logs, _ = train(
        tiny, tmp_path / "c", "trainer.max_steps=8", "objective.params={beta: 0.2}", resume=True
    )
    assert any(f"read from {first}" in line for line in logs)
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    wc = load_file(tmp_path / "c" / "final" / "model.safetensors")
    for name in wb:
        torch.testing.assert_close(wc[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    # Other truncation, other tokens: a second table, the first one left as it was.
    logs, _ = train(tiny, tmp_path / "d", "data.max_length=24", "data.max_prompt_length=12")
    assert any("computed for" in line for line in logs)
    assert len(cache_files(tiny)) == 2 and first.stat().st_mtime_ns == stamp


def test_trust_region_references_are_scored_live(tiny, tmp_path):
    logs, _ = train(tiny, tmp_path / "soft", "reference.mode=soft")
    assert "shared-prompt forward: on" in logs
    assert not any("reference log-probs" in line for line in logs)
    assert cache_files(tiny) == []


def test_a_cached_frozen_reference_keeps_no_copy_and_resumes_either_way(tiny, tmp_path):
    logs, _ = train(tiny, tmp_path / "a", "trainer.max_steps=8")
    assert any("no copy kept" in line for line in logs)
    # Held-out pairs score with the reference live: it is a full copy there.
    logs, _ = train(tiny, tmp_path / "e", f"data.eval_path={tiny['pairs']}")
    assert not any("no copy kept" in line for line in logs)
    # A checkpoint of a copy-free run resumes with a copied reference too (the cache off).
    train(tiny, tmp_path / "b", "trainer.max_steps=4")
    train(tiny, tmp_path / "b", "trainer.max_steps=8", "speed.reference_cache=off", resume=True)
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_released_reference_never_scores_again(tiny):
    from prefalign.modeling import load_model
    from prefalign.reference import InitialPolicyReference

    policy = load_model(str(tiny["model"]), device="cpu").train()
    reference = InitialPolicyReference(policy)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    before = reference.logps(ids, mask, mask.bool()).sum
    assert policy.training  # scored in eval mode, the policy's own mode restored
    reference.release()
    with pytest.raises(RuntimeError, match="released"):
        reference.logps(ids, mask, mask.bool())
    assert torch.isfinite(before).all()
