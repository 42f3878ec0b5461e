"""Check an objective's hyper-parameters from a config before anything is loaded.

A value of the wrong kind (`beta: high`) would otherwise fail deep inside the first loss call,
after the model has loaded, with a message that names no config key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prefalign.errors import UserError

if TYPE_CHECKING:  # the registry calls check_params when it resolves an objective
    from prefalign.objectives.registry import Objective


def check_params(
    objective: Objective, params: Mapping[str, Any], key: str = "objective.params"
) -> dict[str, Any]:
    """`params` checked against `objective`'s signature and defaults; returns them with numbers
    given as strings (YAML 1.1 reads `1e-3` as one) made floats. Raises a `UserError` naming
    `key.name` for an unknown name or a value whose kind does not match its default."""
    allowed = objective.param_names
    defaults = objective.params()
    out = dict(params)
    for name, value in params.items():
        where = f"config key '{key}.{name}'"
        if allowed is not None and name not in allowed:
            raise UserError(
                f"{where}: objective '{objective.name}' has no parameter '{name}'; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
        default = defaults.get(name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            out[name] = _number(value, where, default)
    return out


def _number(value: Any, where: str, default: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number (default {default}), got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return value
