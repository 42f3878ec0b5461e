"""Which attention kernel a bf16 run on the CPU takes: eager attention for short rows.

PyTorch's CPU flash-attention kernel (what SDPA runs with an explicit mask, as prefalign's
packed rows have) is slow in bf16 backward on short rows: forward+backward of one SmolLM2-135M
attention layer (9 heads of 64, 1 thread, AVX-512 BF16/AMX) took 18.4 ms in bf16 against 10.2
ms in fp32 at 4 rows of 123 tokens, while eager attention (two bf16 matmuls and an fp32
softmax) took 7.7 ms; at 2 rows of 384 tokens the two were even (24 ms). Eager attention holds
every layer's [rows, heads, T, T] softmax for backward, so it is taken only where rows are at
most `EAGER_MAX_WIDTH` tokens and those weights fit in `EAGER_MEMORY_BYTES`. Both kernels
compute the same attention (eager with the additive form of the same mask); GPUs keep SDPA.
"""

from __future__ import annotations

import torch

EAGER_MAX_WIDTH = 256
EAGER_MEMORY_BYTES = 256 * 2**20
# Bytes per attention weight eager attention keeps for backward: the fp32 softmax output and
# its bf16 copy that multiplies the values.
EAGER_BYTES_PER_WEIGHT = 6


def eager_attention_bytes(config, rows: int, width: int) -> int:
    """Softmax weights eager attention keeps for backward over one batch, all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1)
    return rows * heads * width * width * EAGER_BYTES_PER_WEIGHT * layers


def use_eager_attention_for_bf16(model: torch.nn.Module, rows: int, width: int) -> bool:
    """Switch an SDPA model to eager attention where that is faster in bf16 on the CPU and its
    attention weights fit the memory budget; returns whether it switched. Call before any copy
    of the model (a reference) is made, so the copy runs the same kernel."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if width > EAGER_MAX_WIDTH or eager_attention_bytes(config, rows, width) > EAGER_MEMORY_BYTES:
        return False
    if next(inner.parameters()).device.type != "cpu":
        return False
    inner.set_attn_implementation("eager")
    return inner.config._attn_implementation == "eager"
