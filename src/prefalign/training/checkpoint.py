"""The files of a training run's checkpoints: the weights written once, `final` a link to them.

    out_dir/
      checkpoints/step-N/model/   save_pretrained (weights, config, tokenizer): the only copy
      checkpoints/step-N/         optimizer.pt, scheduler.pt, extra_state.pt, state.json, rng-R.pt
      final -> checkpoints/step-N/model   (a relative link to the newest checkpoint's model)

`final` loads with `load_model` like any model directory, and resume reads the trained weights
back from `model/`, so nothing is stored twice. A caller that deletes `checkpoints/` first calls
`keep_final`, which moves the newest model directory to `final` (a rename, not a copy).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prefalign.errors import RunDirError
from prefalign.modeling import is_peft_model
from prefalign.training.fsdp import load_full_

MODEL_DIR = "model"


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint of a run, in no particular order: the directories
    named step-N (a copy named step-3.bak, or a temporary .tmp-step-N, is none)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = (re.fullmatch(r"step-(\d+)", p.name) for p in root.iterdir() if p.is_dir())
    return [(int(m.group(1)), root / m.group(0)) for m in found if m]


# What resume reads of a checkpoint besides its state (extra_state.pt: when the run has one).
CHECKPOINT_FILES = (MODEL_DIR, "optimizer.pt", "scheduler.pt")


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """state.json of checkpoint `path`: a missing, unreadable or malformed one is a located
    one-line `RunDirError`."""
    file = path / "state.json"
    if not file.exists():
        raise missing_files(path, ["state.json"])
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunDirError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
    except (UnicodeDecodeError, OSError) as err:
        raise RunDirError(f"{file}: cannot be read ({err})") from None
    fields = {"step": int, "num_processes": int}
    bad = [
        name
        for name, kind in fields.items()
        if not isinstance(state, dict) or type(state.get(name)) is not kind
    ]
    if bad:
        raise RunDirError(f"{file}: field '{bad[0]}' must be an integer (a checkpoint's state)")
    return state


def check_checkpoint_files(path: Path, needs_extra: bool) -> None:
    """The files resume reads besides state.json are all in checkpoint `path` (a one-line
    `RunDirError` naming those missing, instead of a bare Errno from the first load)."""
    wanted = [*CHECKPOINT_FILES, "extra_state.pt"] if needs_extra else list(CHECKPOINT_FILES)
    missing = [name for name in wanted if not (path / name).exists()]
    if missing:
        raise missing_files(path, missing)


def missing_files(path: Path, names: list[str]) -> RunDirError:
    return RunDirError(
        f"checkpoint {path} lacks {', '.join(names)} (a partial copy, or files deleted): "
        f"delete {path} to resume from the checkpoint before it"
    )


def save_model(
    model: torch.nn.Module, tokenizer: Any, path: Path, state_dict: dict | None = None
) -> None:
    """The model in Hugging Face format; a peft model as its active adapter only (a trust-region
    reference adapter is checkpointed with the reference's own state). `state_dict`: the full
    weights of a sharded (FSDP2) model, gathered beforehand."""
    if is_peft_model(model):
        model.save_pretrained(
            path,
            selected_adapters=[model.active_adapter],
            safe_serialization=True,
            state_dict=state_dict,
        )
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_trained_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Copy the trainable tensors of `model` from a directory written by `save_model` (a
    sharded, FSDP2, parameter takes its own slice of the saved tensor)."""
    saved: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):  # one file, or the shards of a large model
        saved.update(load_file(file))
    adapter = model.active_adapter if is_peft_model(model) else None
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = saved_name(name, saved, adapter)
            if key is None:
                missing.append(name)
            else:
                load_full_(param, saved[key])
    if missing:
        raise RunDirError(f"checkpoint {model_dir} lacks trained weights {missing[:3]}")


def saved_name(name: str, saved: dict[str, Any], adapter: str | None) -> str | None:
    """The key under which save_pretrained stored parameter `name`: peft drops the adapter's
    name from its keys, and a wrapper module (a reward model around its classifier) saves the
    inner model, whose keys are a dotted suffix of the parameter's name."""
    if adapter is not None:
        name = name.replace(f".{adapter}.", ".")
    parts = name.split(".")
    for start in range(len(parts)):
        key = ".".join(parts[start:])
        if key in saved:
            return key
    return None


def point_final(out_dir: Path, checkpoint: Path) -> None:
    """Make `out_dir/final` a relative link to `checkpoint`'s model, replaced atomically."""
    final = out_dir / "final"
    target = os.path.relpath(checkpoint / MODEL_DIR, out_dir)
    tmp = out_dir / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    if final.is_dir() and not final.is_symlink():  # a materialized final (see keep_final)
        shutil.rmtree(final)
    os.replace(tmp, final)


def keep_final(out_dir: str | Path) -> Path:
    """Turn the `final` link into a directory of its own (so `checkpoints/` can go): a rename."""
    final = Path(out_dir) / "final"
    staged = final.with_name(".final.keep")  # a kill between the renames leaves it here
    if final.is_symlink():
        if not staged.exists():
            final.resolve().rename(staged)
        final.unlink()
    if staged.exists():
        staged.rename(final)
    return final


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
