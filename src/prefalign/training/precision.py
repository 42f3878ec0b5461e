"""Which precision to recommend: bf16 autocast where the CPU multiplies bf16 matrices natively.

bf16 autocast keeps fp32 master weights and optimizer state (only matmul inputs are rounded to
bf16) and prefalign keeps log-probs and the loss in fp32; on CPUs with AVX-512 BF16 or AMX
its matmuls run 2-4x faster than fp32, so it is the largest single lever there.
"""

from __future__ import annotations

from pathlib import Path

BF16_MATMUL_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_matmul(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU flag that gives native bf16 matmul (amx_bf16, avx512_bf16), or None."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return next((flag for flag in BF16_MATMUL_FLAGS if flag in flags), None)


def precision_hint(mixed_precision: str, on_gpu: bool) -> str | None:
    """A one-line recommendation for an fp32 run on a CPU with bf16 matmul, else None."""
    if mixed_precision != "no" or on_gpu:
        return None
    flag = cpu_bf16_matmul()
    if flag is None:
        return None
    return (
        f"this CPU multiplies bf16 natively ({flag}): trainer.mixed_precision=bf16 keeps fp32 "
        "weights and log-probs and trains faster (README: Performance)"
    )
