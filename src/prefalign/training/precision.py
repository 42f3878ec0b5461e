"""Which precision a run trains in, and how bf16 is carried out.

`trainer.mixed_precision`: "no" (fp32), "bf16", "fp16", or "auto" (bf16 where the hardware
multiplies bf16 natively: a CUDA GPU with bf16 support, or a CPU with AMX or AVX-512 BF16, whose
bf16 matmuls run 2-5x faster than fp32; fp32 elsewhere).

`trainer.bf16_path` says how bf16 runs:
- "weights": bf16 working weights with fp32 master weights (`prefalign.training.bf16_weights`):
  no per-op casts, fp32 optimizer state and updates; one process without FSDP;
- "autocast": fp32 weights under torch autocast (accelerate's bf16), where only matmul inputs
  are rounded to bf16; works with any process count and FSDP;
- "auto" (default): "weights" where it applies, "autocast" otherwise.
Either way prefalign's log-probs take an fp32 log-sum-exp and the loss is computed in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefalign.config import ConfigError

BF16_MATMUL_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_PATHS = ("auto", "weights", "autocast")


def cpu_bf16_matmul(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU flag that gives native bf16 matmul (amx_bf16, avx512_bf16), or None."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return next((flag for flag in BF16_MATMUL_FLAGS if flag in flags), None)


def cpu_weights_dtype(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The dtype for weights a CPU run does not train in fp32 (a LoRA base, a frozen reference,
    a sampler): "bfloat16" where the CPU multiplies bf16 natively, else "float32". Without AMX
    or AVX-512 BF16, torch's bf16 matmul is emulated and far slower than fp32: 1.3 against
    64.0 GFLOP/s on an AVX2 AMD EPYC (`bench/matmul_peak.py --size 512 --threads 1`)."""
    return "bfloat16" if cpu_bf16_matmul(cpuinfo) is not None else "float32"


def native_bf16(on_gpu: bool | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the training device multiplies bf16 natively."""
    import torch

    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if on_gpu:
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_matmul(cpuinfo) is not None


def resolve_mixed_precision(mixed_precision: str, on_gpu: bool | None = None) -> str:
    """ "auto" as "bf16" or "no" for this machine; other values unchanged."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16(on_gpu) else "no"


def world_size() -> int:
    """Processes of the run as the launcher (torchrun, accelerate launch) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_bf16_path(
    mixed_precision: str, bf16_path: str, num_processes: int, fsdp: bool
) -> str | None:
    """ "weights" or "autocast" for a bf16 run (None for any other precision)."""
    if bf16_path not in BF16_PATHS:
        raise ConfigError(
            f"config key trainer.bf16_path must be one of {BF16_PATHS}, got {bf16_path!r}"
        )
    if resolve_mixed_precision(mixed_precision) != "bf16":
        return None
    weights_apply = num_processes == 1 and not fsdp
    if bf16_path == "weights" and not weights_apply:
        raise ConfigError(
            "config key trainer.bf16_path: 'weights' runs in one process without FSDP "
            f"(this run: {num_processes} processes, fsdp={fsdp}); use 'autocast' or 'auto'"
        )
    if bf16_path == "auto":
        return "weights" if weights_apply else "autocast"
    return bf16_path


def precision_hint(mixed_precision: str, on_gpu: bool) -> str | None:
    """A one-line recommendation for an fp32 run on a CPU with bf16 matmul, else None."""
    if mixed_precision != "no" or on_gpu:
        return None
    flag = cpu_bf16_matmul()
    if flag is None:
        return None
    return (
        f"this CPU multiplies bf16 natively ({flag}): trainer.mixed_precision=bf16 (or auto) "
        "keeps fp32 master weights and log-probs and trains faster (README: Performance)"
    )
