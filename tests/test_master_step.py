"""The fused bf16 master step (prefalign.training.master_step) equals gradient clipping plus
torch's fused AdamW on fp32 master gradients and a refresh of the bf16 weights, and a bf16
Trainer takes it wherever it steps after backward without accumulation."""

from __future__ import annotations

import pytest
import torch
from test_trainer import train_steps

from prefalign.training.master_step import bf16_grad_norm, clip_coefficient, step_masters

pytestmark = pytest.mark.usefixtures("one_thread")

# Odd sizes: chunks of 256 end inside tensors; a strided (transposed) tensor takes one piece.
SHAPES = [(300, 77), (5,), (1000,), (64, 3, 5)]


def plain_and_fused(max_norm: float, steps: int = 3, strided: bool = False):
    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    if strided:
        plain.append(torch.nn.Parameter(torch.randn(40, 30).t()))
    fused = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    working = [p.detach().to(torch.bfloat16).requires_grad_() for p in plain]
    opt_plain = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, fused=True)
    opt_fused = torch.optim.AdamW(fused, lr=1e-2, weight_decay=0.1, fused=True)
    norms = []
    for _ in range(steps):
        grads = [torch.randn(p.shape).to(torch.bfloat16) for p in plain]
        for p, g in zip(plain, grads, strict=True):  # the plain step: fp32 master gradients
            p.grad = g.float()
        norm = torch.nn.utils.clip_grad_norm_(plain, max_norm)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        for w, g in zip(working, grads, strict=True):
            w.grad = g.clone()
        fused_norm = float(bf16_grad_norm([w.grad for w in working]))
        step_masters(opt_fused, fused, working, clip_coefficient(fused_norm, max_norm), chunk=256)
        norms.append((float(norm), fused_norm))
        assert all(w.grad is None for w in working)  # dropped once used
        for w, p in zip(working, fused, strict=True):
            assert torch.equal(w, p.detach().to(torch.bfloat16))  # refreshed in the same pass
    return plain, fused, opt_plain, opt_fused, norms


@pytest.mark.parametrize("strided", [False, True])
def test_without_clipping_the_fused_step_is_the_plain_step_bit_for_bit(strided):
    plain, fused, opt_plain, opt_fused, norms = plain_and_fused(1e9, strided=strided)
    for a, b in zip(plain, fused, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain, fused, strict=True):  # the same state, in torch AdamW's layout
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_plain.state[a][key], opt_fused.state[b][key]), key
    for norm, fused_norm in norms:
        assert fused_norm == pytest.approx(norm, rel=1e-5)


def test_with_clipping_the_fused_step_matches_the_plain_step():
    plain, fused, *_, norms = plain_and_fused(0.5)
    assert all(norm > 0.5 for norm, _ in norms)  # it clipped every step
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_clip_coefficient_is_torchs():
    assert clip_coefficient(3.0, 0) == clip_coefficient(3.0, float("inf")) == 1.0
    assert clip_coefficient(0.2, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(1 / (4.0 + 1e-6))


def test_a_bf16_trainer_steps_its_masters_in_the_fused_pass_equal_to_the_plain_step(tmp_path):
    kw = dict(mixed_precision="bf16", step_in_backward="off", max_grad_norm=1e9)
    fused, model_fused, history_fused = train_steps(tmp_path, "fused", **kw)
    assert fused.fused_master_step and fused.master is not None

    def plain_trainer(trainer):  # the same run through the plain step
        trainer.fused_master_step = False
        trainer.master.keep_bf16_grads = False

    plain, model_plain, history_plain = train_steps(
        tmp_path, "plain", before_fit=plain_trainer, **kw
    )
    for a, b in zip(fused.master.masters, plain.master.masters, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model_fused.parameters(), model_plain.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    for x, y in zip(history_fused, history_plain, strict=True):
        assert x["loss"] == y["loss"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_the_fused_step_never_makes_fp32_master_gradients(tmp_path):
    def watch(trainer):
        trainer.alive = []
        for p in trainer.master.working:
            p.register_post_accumulate_grad_hook(
                lambda _: trainer.alive.append(
                    sum(m.grad is not None for m in trainer.master.masters)
                )
            )

    trainer, *_ = train_steps(tmp_path, "run", mixed_precision="bf16", before_fit=watch)
    assert trainer.fused_master_step and trainer.alive and max(trainer.alive) == 0
    assert all(p.grad is None for p in trainer.master.working)  # dropped by the step


def test_accumulating_micro_batches_keeps_fp32_master_gradients(tmp_path):
    trainer, *_ = train_steps(tmp_path, "accum", mixed_precision="bf16", grad_accum=2)
    assert trainer.master is not None and not trainer.fused_master_step
