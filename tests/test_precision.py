"""bf16 autocast keeps log-probs and the DPO loss in fp32, close to the fp32 computation; the
bf16 recommendation follows the CPU's flags."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import tiny_model
from test_shared_prompt import random_pairs

from prefalign.objectives import compute_loss, get
from prefalign.shared_prompt import collate_shared_pairs, pair_logps
from prefalign.training.precision import cpu_bf16_matmul

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_loss_and_grad(model, batch, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        chosen, rejected = pair_logps(model, batch)
        loss = compute_loss(
            get("dpo"),
            chosen.sum,
            rejected.sum,
            chosen.sum.detach() + 1,
            rejected.sum.detach() - 1,
            beta=0.1,
        ).mean()
    loss.backward()
    return (
        chosen.sum,
        loss,
        torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]),
    )


def test_bf16_autocast_keeps_logps_and_loss_fp32_and_close():
    model = tiny_model("llama")
    batch = collate_shared_pairs(*random_pairs(3, n=6), pad_id=0)
    logps32, loss32, grad32 = dpo_loss_and_grad(model, batch, bf16=False)
    logps16, loss16, grad16 = dpo_loss_and_grad(model, batch, bf16=True)
    assert logps16.dtype == loss16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    torch.testing.assert_close(logps16, logps32, rtol=2e-2, atol=0.2)
    assert abs(float(loss16 - loss32)) < 1e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98


def test_bf16_matmul_is_detected_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bf16_matmul(info) == "avx512_bf16"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bf16_matmul(info) is None
    assert cpu_bf16_matmul(tmp_path / "missing") is None
