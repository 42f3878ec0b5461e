"""The registry of offline preference objectives, and user objectives loaded from files."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from prefalign.objectives import kto, pairwise
from prefalign.userfiles import import_python_file

Kind = Literal["pairwise", "unpaired"]

# How many leading positional arguments are data tensors; the rest are hyper-parameters.
N_INPUTS: dict[str, int] = {"pairwise": 4, "unpaired": 5}


@dataclass(frozen=True)
class Objective:
    """A registered loss and what its caller must know to feed it.

    `kind="pairwise"`: `fn(pc, pr, rc, rr, **params) -> [B]`. `kind="unpaired"` (KTO):
    `fn(policy_logps, reference_logps, labels, kl_policy_logps, kl_reference_logps, **params)`.
    `needs_reference=False`: the reference arguments are ignored and may be None.
    `length_normalized=True`: pass per-token MEAN log-probs instead of sums.
    `defaults`: parameter values that override the function's own defaults.
    """

    name: str
    fn: Callable[..., Tensor]
    kind: Kind = "pairwise"
    needs_reference: bool = True
    length_normalized: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def param_names(self) -> tuple[str, ...] | None:
        """Names of the hyper-parameters `fn` accepts; None when it takes **kwargs."""
        return _hyperparameters(self.fn, self.kind)[0]

    def accepts(self, param: str) -> bool:
        """Whether `fn` takes the hyper-parameter `param` (any, with **kwargs)."""
        names = self.param_names
        return names is None or param in names

    def params(self) -> dict[str, Any]:
        """Effective default hyper-parameters: the function's defaults, then `defaults`."""
        return {**_hyperparameters(self.fn, self.kind)[1], **self.defaults}


_REGISTRY: dict[str, Objective] = {}


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _hyperparameters(
    fn: Callable[..., Any], kind: str
) -> tuple[tuple[str, ...] | None, dict[str, Any]]:
    """(accepted hyper-parameter names, or None for any, and their defaults) from fn's signature.

    The first N_INPUTS[kind] positional parameters are the data tensors; every other parameter
    that can be passed by keyword is a hyper-parameter.
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return None, {}
    data = {p.name for p in [p for p in parameters if p.kind in _POSITIONAL][: N_INPUTS[kind]]}
    hyper = [p for p in parameters if p.name not in data and p.kind in _KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    names = None if takes_any else tuple(p.name for p in hyper)
    return names, {p.name: p.default for p in hyper if p.default is not p.empty}


def _check_signature(
    name: str, fn: Callable[..., Any], kind: str, defaults: dict[str, Any]
) -> None:
    """Fail early, at registration, on a kind or signature a trainer could not call."""
    if kind not in N_INPUTS:
        raise ValueError(f"objective '{name}': kind must be 'pairwise' or 'unpaired', got {kind!r}")
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    takes_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if len(positional) < N_INPUTS[kind] and not takes_varargs:
        raise ValueError(
            f"objective '{name}': a {kind} objective takes {N_INPUTS[kind]} positional tensors, "
            f"{getattr(fn, '__name__', fn)!s} accepts {len(positional)}"
        )
    allowed = _hyperparameters(fn, kind)[0]
    unknown = sorted(set(defaults) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(
            f"objective '{name}': defaults name unknown parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )


def register(
    name: str,
    fn: Callable[..., Tensor],
    *,
    kind: Kind = "pairwise",
    needs_reference: bool = True,
    length_normalized: bool = False,
    defaults: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Objective:
    """Add `fn` to the registry under `name` and return its `Objective`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"objective '{name}': fn is not callable ({type(fn).__name__})")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"objective '{name}' is already registered; pass overwrite=True to replace it"
        )
    defaults = dict(defaults or {})
    _check_signature(name, fn, kind, defaults)
    objective = Objective(name, fn, kind, needs_reference, length_normalized, defaults)
    _REGISTRY[name] = objective
    return objective


def get(name: str) -> Objective:
    """The registered objective called `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective '{name}'; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Sorted names of the registered objectives."""
    return sorted(_REGISTRY)


def compute_loss(objective: Objective | str, *inputs: Tensor | None, **params: Any) -> Tensor:
    """Per-example loss [B] of `objective` on its input tensors, `defaults` merged under `params`.

    Pairwise: `compute_loss(obj, pc, pr, rc, rr, beta=...)`; unpaired: `compute_loss(obj,
    policy_logps, reference_logps, labels, kl_policy_logps, kl_reference_logps, beta=...)`.
    Unknown parameter names raise a ValueError instead of being silently ignored.
    """
    if isinstance(objective, str):
        objective = get(objective)
    n_inputs = N_INPUTS[objective.kind]
    if len(inputs) != n_inputs:
        raise ValueError(
            f"objective '{objective.name}' ({objective.kind}) takes {n_inputs} input tensors, got {len(inputs)}"
        )
    allowed = objective.param_names
    if allowed is not None:
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"objective '{objective.name}' got unknown parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
    return objective.fn(*inputs, **{**objective.defaults, **params})


def load_user_objective(
    spec: str,
    *,
    kind: Kind = "pairwise",
    needs_reference: bool = True,
    length_normalized: bool = False,
    defaults: dict[str, Any] | None = None,
) -> Objective:
    """Load `"path/to/file.py:function"` as an (unregistered) `Objective` named `spec`.

    The file is imported by path and executed as ordinary Python: only load files you trust.
    """
    path_text, sep, fn_name = spec.rpartition(":")  # rpartition: Windows paths contain ':'
    if not sep or not path_text or not fn_name:
        raise ValueError(f"user objective spec must be 'path/to/file.py:function', got {spec!r}")
    module = import_python_file(path_text, "user objective", "_prefalign_user_objective")
    if not hasattr(module, fn_name):
        raise ValueError(f"user objective file {path_text} has no function '{fn_name}'")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ValueError(
            f"user objective {path_text}:{fn_name} is not callable ({type(fn).__name__})"
        )
    defaults = dict(defaults or {})
    _check_signature(spec, fn, kind, defaults)
    return Objective(spec, fn, kind, needs_reference, length_normalized, defaults)


def _register_builtins() -> None:
    register("dpo", pairwise.dpo_loss, defaults={"beta": 0.1, "label_smoothing": 0.0})
    register("robust", pairwise.robust_dpo_loss, defaults={"beta": 0.1, "label_smoothing": 0.0})
    register("ipo", pairwise.ipo_loss, length_normalized=True, defaults={"beta": 0.1})
    register("hinge", pairwise.hinge_loss, defaults={"beta": 0.1})
    register("discopop", pairwise.discopop_loss, defaults={"beta": 0.05, "tau": 0.05})
    register("padll", pairwise.padll_loss, defaults={"beta": 0.05})
    register("cell", pairwise.cell_loss, defaults={"beta": 0.05})
    register("pfl", pairwise.pfl_loss, defaults={"beta": 0.05})
    register("genarm", pairwise.genarm_loss, needs_reference=False, defaults={"beta_r": 1.0})
    register(
        "kto",
        kto.kto_loss,
        kind="unpaired",
        defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    )


_register_builtins()
