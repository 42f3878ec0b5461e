"""The memory floor (prefalign.training.memory_floor) of a real training step counts every
tensor that is alive at the end of backward: the same bytes as all the storages the garbage
collector finds then, whatever the reference mode, precision or LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import save_tiny_review_world

from prefalign.config import load_config
from prefalign.training import clip_step, memory_floor
from prefalign.training.bf16_weights import Bf16MasterWeights
from prefalign.training.loop import Trainer
from prefalign.training.preference import PreferenceConfig, run_preference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("floor")
    return save_tiny_review_world(root, 16)


def at_end_of_backward(tiny, out: Path, monkeypatch, *extra: str) -> dict:
    """Train 2 steps; at the second step's end of backward (Adam's moments exist), the floor's
    parts and the bytes of every storage alive then that was not alive before the run."""
    # Held, so no storage of theirs is freed during the run and its address reused.
    before = memory_floor.live_tensors()
    old = set(memory_floor.live_tensor_storages())
    seen: dict = {}
    fit = Trainer.fit

    def capturing_fit(self, *args, **kwargs):
        seen["trainer"] = self
        return fit(self, *args, **kwargs)

    def snapshot():
        trainer = seen["trainer"]
        if trainer.step == 1:
            seen["parts"] = memory_floor.trainer_floor(trainer)
            live = memory_floor.live_tensor_storages()
            seen["live"] = sum(n for a, n in live.items() if a not in old)

    clip = Accelerator.clip_grad_norm_
    grad_norm = Bf16MasterWeights.grad_norm
    folded_norm = clip_step.grad_norm

    def clip_after_snapshot(self, *args, **kwargs):
        snapshot()
        return clip(self, *args, **kwargs)

    def norm_after_snapshot(self):
        snapshot()
        return grad_norm(self)

    def folded_norm_after_snapshot(params):
        snapshot()
        return folded_norm(params)

    monkeypatch.setattr(Trainer, "fit", capturing_fit)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_after_snapshot)
    monkeypatch.setattr(Bf16MasterWeights, "grad_norm", norm_after_snapshot)
    monkeypatch.setattr(clip_step, "grad_norm", folded_norm_after_snapshot)
    config = load_config(
        PreferenceConfig,
        None,
        [
            f"model.name_or_path={tiny['model']}",
            f"data.path={tiny['pairs']}",
            f"trainer.out_dir={out}",
            "trainer.batch_size=4",
            "trainer.max_steps=2",
            "trainer.progress=false",
            "trainer.malloc_mmap_threshold_kib=0",
            *extra,
        ],
    )
    run_preference(config, log=lambda *_: None)
    del before
    return seen


CASES = {
    "frozen, cached": (),
    "frozen, scored live": ("speed.reference_cache=off",),
    "soft": ("reference.mode=soft", "reference.alpha=0.5"),
    "soft, bf16 weights": ("reference.mode=soft", "trainer.mixed_precision=bf16"),
    "soft, LoRA": ("reference.mode=soft", "model.lora={r: 4, alpha: 8}"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_floor_counts_every_tensor_alive_at_the_end_of_backward(
    tiny, tmp_path, monkeypatch, case
):
    seen = at_end_of_backward(tiny, tmp_path, monkeypatch, *CASES[case])
    parts, live = seen["parts"], seen["live"]
    counted = sum(parts.values())
    print(case, parts, live)
    # What else is alive then is the batch, the loss and the cached reference log-probs: far
    # less than the smallest part a floor could leave out.
    assert counted <= live < counted + 0.05 * parts["weights"]


def test_without_clipping_only_the_largest_gradient_counts_and_a_tied_weight_counts_once():
    from conftest import tiny_gpt2

    model = tiny_gpt2()  # lm_head is wte: one storage
    optimizer = torch.optim.AdamW(model.parameters())
    grads = [p.numel() * p.element_size() for p in model.parameters()]  # tied: listed once
    clipped = memory_floor.state_floor(model, optimizer, clipping=True)
    stepped_inside = memory_floor.state_floor(model, optimizer, clipping=False)
    assert (
        clipped["gradients"]
        == sum(grads)
        == clipped["weights"] - sum(b.numel() * b.element_size() for b in model.buffers())
    )
    assert stepped_inside["gradients"] == max(grads) < sum(grads)
