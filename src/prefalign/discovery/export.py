"""Make a checked candidate usable: a function in this process, a registry entry, a .py file."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from prefalign import objectives
from prefalign.discovery.candidate import Candidate
from prefalign.discovery.sandbox_worker import define_function
from prefalign.discovery.static_check import SAFE_BUILTINS, check_static

_FILE_HEADER = '''"""Objective '{name}' found by prefalign discovery (origin: {origin}).

Use it in a training config as `objective: {{code: {filename}:{function}}}`.
code sha256 (normalized): {code_hash}
"""
{thought}
import math

import torch
import torch.nn.functional as F
from torch import Tensor

'''


def compile_objective(code: str) -> Callable[..., Tensor]:
    """The candidate's function, defined with the sandbox's restricted globals.

    Runs the static whitelist again (ValueError with the reason if it fails); the dynamic
    checks need a child process: run `check_candidate` first.
    """
    static = check_static(code)
    if not static.ok or static.function is None:
        raise ValueError(f"objective code rejected: {static.reason}")
    return define_function(code, static.function, SAFE_BUILTINS)


def function_name(code: str) -> str:
    """Name of the one function `code` defines (ValueError if the code fails the static check)."""
    static = check_static(code)
    if not static.ok or static.function is None:
        raise ValueError(f"objective code rejected: {static.reason}")
    return static.function


def register_objective(
    candidate: Candidate, name: str | None = None, **kwargs: Any
) -> objectives.Objective:
    """Register the candidate in the objective registry (replacing an entry of the same name)."""
    return objectives.register(
        name or candidate.name, compile_objective(candidate.code), overwrite=True, **kwargs
    )


def save_objective(candidate: Candidate, path: str | Path) -> str:
    """Write the candidate as a standalone .py module; return its `file.py:function` spec.

    The spec loads with `objectives.load_user_objective` and in configs as
    `objective: {code: spec}`.
    """
    path = Path(path)
    function = function_name(candidate.code)
    thought = "".join(f"# {line}\n" for line in textwrap.wrap(candidate.thought, 96))
    header = _FILE_HEADER.format(
        name=candidate.name,
        origin=candidate.origin,
        filename=path.name,
        function=function,
        code_hash=candidate.code_hash,
        thought="\n" + thought if thought else "",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + candidate.code.strip() + "\n")
    return f"{path}:{function}"
