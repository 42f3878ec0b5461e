"""The soft LoRA mix (prefalign.lora_mix) computes in float32 for float32 factors, and stays as
close to the exact mixture of weight updates as the float64 computation did, over many updates
of near-duplicate factors (a reference that starts as a copy of the policy)."""

from __future__ import annotations

import pytest
import torch
from test_clip_step import RecordOps

from prefalign.lora_mix import mix_dtype, mix_layers_

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(96, 96), (32, 96), (256, 96), (96, 256)]  # (out, in), SmolLM2's ratios scaled down
R_POLICY, R_REF = 4, 16


def copied_layers(seed: int) -> list[tuple[torch.Tensor, ...]]:
    """(A_ref, B_ref, A, B) per layer, the reference a copy of the policy's update."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out, d_in in SHAPES * 3:
        a = torch.randn(R_POLICY, d_in, generator=g) * 0.01
        b = torch.randn(out, R_POLICY, generator=g) * 0.01
        a_ref, b_ref = torch.zeros(R_REF, d_in), torch.zeros(out, R_REF)
        a_ref[:R_POLICY], b_ref[:, :R_POLICY] = a, b
        layers.append((a_ref, b_ref, a, b))
    return layers


def test_float32_factors_mix_in_float32_and_float64_ones_in_float64():
    assert mix_dtype(torch.float32) == mix_dtype(torch.bfloat16) == torch.float32
    assert mix_dtype(torch.float64) == torch.float64
    layers = copied_layers(0)
    with RecordOps(dtypes=True) as ops:
        mix_layers_(layers, 0.6)
    assert ops.names and torch.float64 not in ops.dtypes, "no float64 work for float32 factors"


def test_the_float32_mix_tracks_the_exact_mixture_over_many_updates():
    layers, alpha = copied_layers(1), 0.6
    g = torch.Generator().manual_seed(2)
    exact = [b.double() @ a.double() for _, _, a, b in layers]
    worst = 0.0
    for _ in range(40):  # the policy drifts a little each step, as training moves it
        for _, _, a, b in layers:
            a.add_(torch.randn(a.shape, generator=g) * 1e-4)
            b.add_(torch.randn(b.shape, generator=g) * 1e-4)
        exact = [
            alpha * (b.double() @ a.double()) + (1 - alpha) * d
            for (_, _, a, b), d in zip(layers, exact, strict=True)
        ]
        assert mix_layers_(layers, alpha) < 1e-5  # rank 4 per step: 16 holds it (exact)
        for (a_ref, b_ref, _, _), d in zip(layers, exact, strict=True):
            worst = max(worst, float((b_ref.double() @ a_ref.double() - d).norm() / d.norm()))
    # A few float32 roundings of the factors, and no growth: the update is a contraction.
    assert worst < 1e-5
