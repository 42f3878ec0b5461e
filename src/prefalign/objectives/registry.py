"""The registry of offline preference objectives, and user objectives loaded from files."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import Tensor

from prefalign.config import ConfigError
from prefalign.objectives import kto, pairwise
from prefalign.objectives.params import check_params
from prefalign.userfiles import import_python_file

Kind = Literal["pairwise", "unpaired"]

# How many leading positional arguments are data tensors; the rest are hyper-parameters.
N_INPUTS: dict[str, int] = {"pairwise": 4, "unpaired": 4}


@dataclass(frozen=True)
class Objective:
    """A registered loss and what its caller must know to feed it.

    `kind="pairwise"`: `fn(pc, pr, rc, rr, **params) -> [B]`. `kind="unpaired"` (KTO):
    `fn(policy_logps, reference_logps, labels, reference_point, **params)`, the reference point
    being the batch's KL estimate (`kto_kl_reference_point`), computed and all-reduced by the
    caller.
    `needs_reference=False`: the reference arguments are ignored and may be None.
    `length_normalized=True`: pass per-token MEAN log-probs instead of sums.
    `reward_scale`: the hyper-parameter that scales the implicit reward `log pi - log pi_ref`
    (DPO's `beta`, GenARM's `beta_r`); None when the loss has none (rewards are logged unscaled).
    `defaults`: overrides of the function's own defaults (empty for the built-ins, whose
    defaults live in their signatures only).
    """

    name: str
    fn: Callable[..., Tensor]
    kind: Kind = "pairwise"
    needs_reference: bool = True
    length_normalized: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    reward_scale: str | None = "beta"

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

    def resolve(
        self, params: Mapping[str, Any] | None = None, key: str = "objective.params"
    ) -> Resolved:
        """This objective with every hyper-parameter decided: its defaults, then `params`.

        An unknown name or a value of the wrong kind raises a `UserError` naming `key.name`.
        """
        params = check_params(self, params or {}, key)
        return Resolved(self, MappingProxyType({**self.params(), **params}))


@dataclass(frozen=True)
class Resolved:
    """An objective and the hyper-parameters of one run, resolved once and passed down."""

    objective: Objective
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def kind(self) -> Kind:
        return self.objective.kind

    @property
    def needs_reference(self) -> bool:
        return self.objective.needs_reference

    @property
    def length_normalized(self) -> bool:
        return self.objective.length_normalized

    @property
    def reward_scale(self) -> float:
        """The factor of the logged implicit rewards: the run's value of the objective's
        `reward_scale` parameter, 1.0 when the objective has none."""
        name = self.objective.reward_scale
        value = self.params.get(name) if name else None
        return 1.0 if value is None else float(value)

    def loss(self, *inputs: Tensor | None) -> Tensor:
        """Per-example loss [B] with the resolved hyper-parameters."""
        return compute_loss(self.objective, *inputs, **self.params)


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
        raise ConfigError(
            f"objective '{name}': kind must be 'pairwise' or 'unpaired', got {kind!r}"
        )
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    takes_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if len(positional) < N_INPUTS[kind] and not takes_varargs:
        raise ConfigError(
            f"objective '{name}': a {kind} objective takes {N_INPUTS[kind]} positional tensors, "
            f"{getattr(fn, '__name__', fn)!s} accepts {len(positional)}"
        )
    allowed = _hyperparameters(fn, kind)[0]
    unknown = sorted(set(defaults) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ConfigError(
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
    reward_scale: str | None = "",
    overwrite: bool = False,
) -> Objective:
    """Add `fn` to the registry under `name` and return its `Objective`.

    `reward_scale` names the hyper-parameter that scales the implicit reward; left out, it is
    `beta` or `beta_r`, whichever `fn` takes (None if neither).
    """
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
    scale = _reward_scale(name, fn, kind, reward_scale)
    objective = Objective(name, fn, kind, needs_reference, length_normalized, defaults, scale)
    _REGISTRY[name] = objective
    return objective


def get(name: str) -> Objective:
    """The registered objective called `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown objective '{name}'; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Sorted names of the registered objectives."""
    return sorted(_REGISTRY)


def _check_params(objective: Objective, params: Mapping[str, Any], key: str) -> None:
    allowed = objective.param_names
    unknown = sorted(set(params) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ConfigError(
            f"{key}: objective '{objective.name}' got unknown parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )


def compute_loss(
    objective: Objective | Resolved | str, *inputs: Tensor | None, **params: Any
) -> Tensor:
    """Per-example loss [B] of `objective` on its input tensors, `defaults` merged under `params`.

    Pairwise: `compute_loss(obj, pc, pr, rc, rr, beta=...)`; unpaired: `compute_loss(obj,
    policy_logps, reference_logps, labels, reference_point, beta=...)`.
    Unknown parameter names raise a ValueError instead of being silently ignored.
    """
    if isinstance(objective, Resolved):
        objective, params = objective.objective, {**objective.params, **params}
    if isinstance(objective, str):
        objective = get(objective)
    n_inputs = N_INPUTS[objective.kind]
    if len(inputs) != n_inputs:
        raise ValueError(
            f"objective '{objective.name}' ({objective.kind}) takes {n_inputs} input tensors, "
            f"got {len(inputs)}"
        )
    _check_params(objective, params, "params")
    return objective.fn(*inputs, **{**objective.defaults, **params})


def load_user_objective(
    spec: str,
    *,
    kind: Kind = "pairwise",
    needs_reference: bool = True,
    length_normalized: bool = False,
    defaults: dict[str, Any] | None = None,
    reward_scale: str | None = "",
) -> Objective:
    """Load `"path/to/file.py:function"` as an (unregistered) `Objective` named `spec`.

    The file is imported by path and executed as ordinary Python: only load files you trust.
    """
    path_text, sep, fn_name = spec.rpartition(":")  # rpartition: Windows paths contain ':'
    if not sep or not path_text or not fn_name:
        raise ConfigError(f"user objective spec must be 'path/to/file.py:function', got {spec!r}")
    module = import_python_file(path_text, "user objective", "_prefalign_user_objective")
    if not hasattr(module, fn_name):
        raise ConfigError(f"user objective file {path_text} has no function '{fn_name}'")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ConfigError(
            f"user objective {path_text}:{fn_name} is not callable ({type(fn).__name__})"
        )
    defaults = dict(defaults or {})
    _check_signature(spec, fn, kind, defaults)
    scale = _reward_scale(spec, fn, kind, reward_scale)
    return Objective(spec, fn, kind, needs_reference, length_normalized, defaults, scale)


def _reward_scale(name: str, fn: Callable[..., Any], kind: str, given: str | None) -> str | None:
    """The reward-scale parameter: `given` ("" means infer it: beta, else beta_r, else None)."""
    accepted = _hyperparameters(fn, kind)[0]
    if given == "":
        if accepted is None:  # **kwargs: beta is passed through, as the built-ins name it
            return "beta"
        return next((p for p in ("beta", "beta_r") if p in accepted), None)
    if given is not None and accepted is not None and given not in accepted:
        raise ConfigError(
            f"objective '{name}': reward_scale '{given}' is not one of its parameters"
        )
    return given


def resolve(
    name: str = "dpo",
    code: str | None = None,
    params: Mapping[str, Any] | None = None,
    key: str = "objective",
) -> Resolved:
    """The objective of one run, resolved once: a registry `name` or a user file `code`
    ("path/to/file.py:function"), with `params` over its defaults. Errors name config `key`."""
    if code:
        objective = load_user_objective(code)
    else:
        try:
            objective = get(name)
        except ValueError as e:
            raise ConfigError(f"config key '{key}.name': {e}") from None
    return objective.resolve(params, key=f"{key}.params")


def _register_builtins() -> None:
    # Hyper-parameter defaults are the functions' own (their signatures); nothing overrides them.
    register("dpo", pairwise.dpo_loss)
    register("robust", pairwise.robust_dpo_loss)
    register("ipo", pairwise.ipo_loss, length_normalized=True)
    register("hinge", pairwise.hinge_loss)
    register("discopop", pairwise.discopop_loss)
    register("padll", pairwise.padll_loss)
    register("cell", pairwise.cell_loss)
    register("pfl", pairwise.pfl_loss)
    register("genarm", pairwise.genarm_loss, needs_reference=False)
    register("kto", kto.kto_loss, kind="unpaired")


_register_builtins()
