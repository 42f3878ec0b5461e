"""The bf16 recommendation and `mixed_precision: auto` follow the CPU's flags (the accuracy of
both bf16 paths is tested in test_bf16_weights)."""

from __future__ import annotations

from prefalign.training.precision import (
    cpu_bf16_matmul,
    cpu_weights_dtype,
    native_bf16,
    resolve_mixed_precision,
)


def test_bf16_matmul_is_detected_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bf16_matmul(info) == "avx512_bf16"
    assert native_bf16(on_gpu=False, cpuinfo=info)
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bf16_matmul(info) is None
    assert not native_bf16(on_gpu=False, cpuinfo=info)
    assert cpu_bf16_matmul(tmp_path / "missing") is None


def test_auto_precision_is_bf16_exactly_where_the_machine_multiplies_bf16():
    assert resolve_mixed_precision("auto") == ("bf16" if native_bf16() else "no")
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit) == explicit


def test_untrained_weights_are_bf16_only_where_the_cpu_multiplies_bf16(tmp_path):
    from prefalign.demo.smollm2 import SmolDemoSettings
    from prefalign.smol.world import SmolConfig

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_weights_dtype(info) == "bfloat16"
    info.write_text("flags\t\t: fpu sse2 fma avx avx2\n")  # an AVX2 AMD EPYC's
    assert cpu_weights_dtype(info) == "float32"
    # The real-model world samples, and the demo trains its LoRA base, in this machine's choice.
    here = cpu_weights_dtype()
    settings = SmolDemoSettings.make(quick=True, out_dir=tmp_path)
    assert SmolConfig().dtype == settings.dtype == here
    assert f"model.dtype={here}" in settings.model_overrides()
