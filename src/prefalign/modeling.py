"""Load any Hugging Face causal LM and its tokenizer, optionally wrapped with a LoRA adapter."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from prefalign.config import ConfigError, bounded
from prefalign.errors import UserError
from prefalign.models import resolve_model_source

if TYPE_CHECKING:  # the model classes import in seconds: not paid by a config error
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Names under which a plain `tokenizers` tokenizer (tokenizer.json) is saved (transformers 4 / 5).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """LoRA settings; `target_modules="all-linear"` adapts every linear layer but the head."""

    r: int = bounded(8, min=1)
    alpha: int = bounded(16, gt=0)
    dropout: float = bounded(0.0, min=0, lt=1)
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelSpec:
    name_or_path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # auto (CUDA where torch sees a GPU, else the CPU), cpu, cuda, or cuda:N (GPU N; one
    # process): training and sampling run there. Checked when loaded, against this machine
    # when a run starts.
    device: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    trust_remote_code: bool = False
    # RMSNorm and SwiGLU MLP forwards that save fewer activations for backward, same values
    # (prefalign.training.lean_activations); "off": the model's own forwards.
    lean_activations: Literal["auto", "off"] = "auto"

    def __post_init__(self) -> None:
        device_index(self.device)  # the form only: the machine is checked when a run starts


DEVICE_KEY = "model.device"


def device_index(device: str, key: str = DEVICE_KEY) -> int | None:
    """N of cuda:N (None for auto, cpu, cuda); any other value is a one-line `ConfigError`."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None:
        raise ConfigError(
            f"config key '{key}': got {device!r}, allowed: 'auto', 'cpu', 'cuda', "
            "'cuda:N' (N a GPU index)"
        )
    return int(match.group(1)) if match.group(1) is not None else None


def check_device(device: str, key: str = DEVICE_KEY) -> str:
    """`device` if this machine has it; a CUDA device where torch has none is a one-line
    `ConfigError` naming the key (not an error from deep inside torch at the first tensor)."""
    index = device_index(device, key)
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "torch finds no CUDA device on this machine"
        )
        raise ConfigError(f"config key '{key}': {device!r} asked for, but {why}; use auto or cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(
            f"config key '{key}': {device!r} asked for, but this machine has {count} CUDA "
            f"device(s): cuda:0 to cuda:{count - 1}"
        )
    return device


def resolve_device(device: str = "auto", key: str = DEVICE_KEY) -> torch.device:
    check_device(device, key)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(
    name_or_path: str | Path, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    Tokenizers without a pad token (GPT-2, Llama) get the EOS token as pad: padded positions are
    always masked out, so sharing the id is harmless and keeps the vocabulary (and the
    embedding matrix) unchanged.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name_or_path = resolve_model_source(name_or_path)
    with model_source_errors(name_or_path, "tokenizer"):
        if saved_generic_tokenizer(name_or_path):
            # AutoTokenizer would pick the class from config.json's model_type for some
            # architectures (transformers 5 does so for qwen2, phi3, ...) and rebuild a different
            # tokenizer from the vocabulary; a custom tokenizer.json must be loaded as it is.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(name_or_path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer at {name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@contextlib.contextmanager
def model_source_errors(name_or_path: str | Path, what: str) -> Iterator[None]:
    """A model that is neither a local directory nor loadable is a one-line `UserError`
    (transformers raises OSError with several lines of advice, or tries the hub)."""
    path = Path(str(name_or_path))
    if not path.exists() and str(name_or_path).startswith((".", "/", "~")):
        raise UserError(f"model {name_or_path}: no such directory")
    if path.is_dir() and not any((path / name).is_file() for name in MODEL_FILES):
        raise UserError(f"model {name_or_path}: no model files in it ({', '.join(MODEL_FILES)})")
    try:
        yield
    except (OSError, ValueError) as exc:
        # A ValueError from a local directory is about its files ("Unrecognized model in ...")
        if isinstance(exc, ValueError) and not path.is_dir():
            raise
        first = first_line(exc)
        where = "" if path.exists() else ", not a local directory"
        raise UserError(f"model {name_or_path}{where}: cannot load its {what} ({first})") from None


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The gist of a library's multi-line message: its first line, or (when that line only
    introduces a list, "... from one of:") the whole message on one line, cut at `limit`."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = " ".join(str(exc).split()) if lines[0].rstrip().endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A directory holding none of these is no checkpoint (nor a saved adapter or tokenizer).
MODEL_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json")


def saved_generic_tokenizer(name_or_path: str | Path) -> bool:
    """Whether a local directory holds a tokenizer.json saved as a plain (model-agnostic)
    tokenizer."""
    path = Path(str(name_or_path))
    config = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        declared = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return declared in GENERIC_TOKENIZER_CLASSES


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    lean_activations: bool = False,
) -> PreTrainedModel:
    """Load a causal LM by hub id or local path; wrap it in a trainable LoRA adapter if asked.

    A directory holding a saved peft adapter (adapter_config.json) is loaded on top of its base.
    GGUF sources (`smollm2`, `gguf:PATH`, `PATH.gguf`) are imported once into the cache first.
    `lean_activations`: swap in RMSNorm and MLP forwards that save less for backward (training).
    """
    name_or_path = resolve_model_source(name_or_path)
    path = Path(str(name_or_path))
    torch_dtype = resolve_dtype(dtype)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        with quiet_peft_deprecation():
            model = AutoPeftModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, is_trainable=True, trust_remote_code=trust_remote_code
            )
    else:
        from transformers import AutoModelForCausalLM

        with model_source_errors(name_or_path, "weights"):
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and not is_peft_model(model):
        model = add_lora(model, lora)
    if lean_activations:  # after LoRA: the check against the plain forward sees the adapter
        from prefalign.training.lean_activations import lean_activations as make_lean

        make_lean(model)
        from prefalign.training.tied_embedding import link_tied_embeddings

        link_tied_embeddings(model)  # a tied weight's gradient in one buffer
    return model.to(resolve_device(device))


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs and LoRA both work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def add_lora(
    model: PreTrainedModel, spec: LoraSpec, adapter_name: str = "default"
) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    with quiet_peft_deprecation():
        return get_peft_model(model, config, adapter_name=adapter_name)


@contextlib.contextmanager
def quiet_peft_deprecation() -> Iterator[None]:
    """Around a call into peft that builds a PeftModel (a new adapter, a saved one loaded):
    its constructor asks transformers for the old `is_gradient_checkpointing` name, which
    warns on every LoRA run. The call is peft's, so that message alone is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool
) -> str:
    """Render a conversation with the tokenizer's chat template as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "conversational data needs a tokenizer with a chat template; this tokenizer has none "
            "(give prompt/completion strings instead, or set tokenizer.chat_template)"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
