"""SmolLM2 itself as the real demo's frozen reference, loaded once per process.

Every SmolLM2 row measures KL to the untrained model and GenARM decodes on it; one copy per
(path, dtype) serves them all. Its own module so the rows that share it do not import each other.
"""

from __future__ import annotations

import functools

import torch

from prefalign.modeling import load_model


@functools.lru_cache(maxsize=2)
def frozen_model(path: str, dtype: str) -> torch.nn.Module:
    """The model at `path` in `dtype`, in eval mode with gradients off (it is never trained)."""
    from prefalign.demo.genarm import frozen

    return frozen(load_model(path, dtype=dtype, device="cpu"))
