"""The sandbox's child process: defines candidate functions and checks them dynamically.

Run as a script (`python -I sandbox_worker.py`), it imports nothing of prefalign: only the
standard library and torch. Protocol, one JSON object per line: the parent sends a config line,
the worker answers {"ready": true}; then for each {"code", "function", "cpu_s"} request it
answers {"ok", "reason", "flags"}. The parent enforces the wall clock and reads deaths by
signal (SIGXCPU: the per-candidate CPU limit set here).

The parent also imports `define_function` from here, and so does the proxy-training worker
(`proxy_worker.py`), so a validated candidate runs with the same restricted globals in
training as in the sandbox.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import inspect
import json
import math
import os
import resource
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch

BATCH = 16
MAX_REASON_CHARS = 400


class CheckFailed(Exception):
    """A dynamic check failed; the message is the reason sent back to the proposer."""

    def __init__(self, reason: str, flag: str | None = None) -> None:
        super().__init__(reason)
        self.flag = flag


def _guarded_import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> Any:
    """`__import__` for torch's C code, which imports torch through the calling frame's
    builtins (e.g. in Tensor.clamp(min=...)). Candidate code cannot name it (no dunders); it
    returns torch modules that are already loaded and refuses everything else."""
    if level == 0 and name.partition(".")[0] == "torch" and name in sys.modules:
        return sys.modules[name] if fromlist else sys.modules["torch"]
    raise ImportError(f"import of {name!r} is not allowed in objective code")


def restricted_globals(builtin_names: Iterable[str]) -> dict[str, Any]:
    """Globals for candidate code: torch, F, math, Tensor and a few harmless builtins only."""
    safe = {name: getattr(builtins, name) for name in builtin_names}
    safe["__import__"] = _guarded_import
    return {
        "__builtins__": safe,
        "__name__": "prefalign_candidate",
        "torch": torch,
        "F": torch.nn.functional,
        "math": math,
        "Tensor": torch.Tensor,
    }


def define_function(code: str, function: str, builtin_names: Iterable[str]) -> Callable[..., Any]:
    """Execute statically checked `code` in restricted globals and return `function`, wrapped
    so that it receives copies of its tensor arguments: whatever it writes in place (through
    an alias the static check cannot see) stays in the copy."""
    namespace = restricted_globals(builtin_names)
    exec(compile(code, "<candidate>", "exec"), namespace)
    return with_copies(namespace[function])


def with_copies(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` called on clones of its tensor arguments (clone keeps the autograd graph)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        return fn(*copies, **kwargs)

    return call


# ---------------------------------------------------------------- inputs


def random_inputs(seed: int, batch: int = BATCH) -> list[torch.Tensor]:
    """Summed log-probs of a policy close to its reference, as early in training."""
    g = torch.Generator().manual_seed(seed)
    rc = -(10 + 90 * torch.rand(batch, generator=g))
    rr = -(10 + 90 * torch.rand(batch, generator=g))
    pc = rc + torch.randn(batch, generator=g)
    pr = rr + torch.randn(batch, generator=g)
    return [pc, pr, rc, rr]


def extreme_inputs() -> list[torch.Tensor]:
    """Rows of (pc, pr, rc, rr): zeros, margins of +-1000 and +-540, log-probs near -1e4."""
    rows = [
        (0.0, 0.0, 0.0, 0.0),
        (-1.0, -1001.0, -500.0, -500.0),
        (-1001.0, -1.0, -500.0, -500.0),
        (-1e4, -1e4 + 1, -1e4, -1e4),
        (-1e-6, -1e4, -1e-6, -1e4),
        (-300.0, -30.0, -30.0, -300.0),
        (-30.0, -300.0, -300.0, -30.0),
        (-5.0, -5.0, -5.0, -5.0),
    ]
    return list(torch.tensor(rows, dtype=torch.float32).T.contiguous())


# ---------------------------------------------------------------- checks


def evaluate(
    fn: Callable[..., Any], inputs: list[torch.Tensor], label: str
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """(loss [B], gradients w.r.t. the four inputs, or None when the loss has no graph)."""
    batch = inputs[0].shape[0]
    xs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    if not isinstance(out, torch.Tensor):
        raise CheckFailed(
            f"returns {type(out).__name__}, expected a tensor of shape [B]", "not_a_tensor"
        )
    if tuple(out.shape) != (batch,):
        raise CheckFailed(
            f"returns shape {list(out.shape)} on a batch of {batch} pairs; expected a per-pair "
            f"loss of shape [{batch}] (do not reduce with mean or sum)",
            "wrong_shape",
        )
    if not out.is_floating_point():
        raise CheckFailed(f"returns dtype {out.dtype}, expected a floating-point loss", "dtype")
    if not torch.isfinite(out).all():
        raise CheckFailed(f"non-finite loss (nan or inf) on {label} inputs", "non_finite")
    if not out.requires_grad:
        return out.detach(), None
    grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True)]
    if not all(torch.isfinite(g).all() for g in grads):
        raise CheckFailed(f"non-finite gradient on {label} inputs", "non_finite")
    return out.detach(), grads


def run_checks(fn: Callable[..., Any], seed: int = 0) -> list[str]:
    """Raise CheckFailed on a broken objective; return informational flags otherwise.

    The random inputs come from `seed`, which the parent draws afresh for every check, so a
    candidate cannot recognize the check by its inputs."""
    a_in, b_in = random_inputs(seed), random_inputs(seed + 1)
    a, grads_a = evaluate(fn, a_in, "random")
    b, grads_b = evaluate(fn, b_in, "random")
    if torch.allclose(a, a[0].expand_as(a)) and torch.allclose(b, a[0].expand_as(b)):
        raise CheckFailed(f"constant loss ({a[0].item():.4g} for every input)", "constant")
    if grads_a is None or grads_b is None:
        raise CheckFailed(
            "no gradient: the loss does not depend on the policy log-probs (detached?)",
            "no_gradient",
        )
    policy_grads = [g for grads in (grads_a, grads_b) for g in grads[:2]]
    if all(bool((g == 0).all()) for g in policy_grads):
        raise CheckFailed(
            "no gradient reaches policy_chosen_logps or policy_rejected_logps", "no_gradient"
        )
    evaluate(fn, extreme_inputs(), "extreme (margins of +-1000, log-probs near -1e4)")
    _check_direction(fn, a_in)
    flags = []
    if all(bool((g == 0).all()) for g in grads_a[2:] + grads_b[2:]):
        flags.append("ignores_reference")
    if _batch_dependent(fn, a_in, a):
        flags.append("batch_dependent")
    return flags


# Margin changes |d| at which the loss is compared; a wide range, as the objective's own scale
# (beta) is unknown: DiscoPOP rises for small positive margins and falls beyond.
DIRECTION_SCALES = (0.5, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def _check_direction(fn: Callable[..., Any], inputs: list[torch.Tensor]) -> None:
    """Reject a loss that is higher when the chosen response gains log-probability.

    At each scale d, the loss with the chosen/rejected margin raised by d (rejected log-prob
    lowered) is compared with the loss with it lowered by d (chosen log-prob lowered), on
    average over the batch; the loss must not be higher for the raised margin at most scales.
    """
    pc, pr, rc, rr = inputs
    worse = []
    with torch.no_grad():
        for d in DIRECTION_SCALES:
            up = fn(pc, pr - d, rc, rr).mean().item()
            down = fn(pc - d, pr, rc, rr).mean().item()
            if not (up <= down):  # also catches nan
                worse.append((d, up, down))
    if len(worse) > len(DIRECTION_SCALES) // 2:
        d, up, down = worse[-1]
        raise CheckFailed(
            "rewards lowering the chosen log-ratio: the loss is higher when the chosen "
            "response gains log-probability over the rejected one at "
            f"{len(worse)} of {len(DIRECTION_SCALES)} margin scales (margin +{d:g}: "
            f"{up:.4g}, margin -{d:g}: {down:.4g}); a preference loss must decrease as the "
            "chosen response gains probability",
            "rewards_lowering_chosen",
        )


def _batch_dependent(
    fn: Callable[..., Any], inputs: list[torch.Tensor], full: torch.Tensor
) -> bool:
    """Whether a pair's loss changes when the rest of its batch changes (AQL-style statistics)."""
    half = BATCH // 2
    try:
        with torch.no_grad():
            part = fn(*[x[:half] for x in inputs])
        return not torch.allclose(part, full[:half], rtol=1e-4, atol=1e-5)
    except Exception:
        return True


def fingerprint(fn: Callable[..., Any], call_params: dict[str, Any] | None = None) -> str | None:
    """A hash of what the objective computes when called as the fitness evaluation calls it
    (with those of `call_params` its signature takes): losses and gradients on the check's two
    random batches, to 5 significant digits. Two codes with one fingerprint train alike, so the
    loop need not train the second. None when the objective fails on these inputs."""
    signature = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    kwargs = {k: v for k, v in (call_params or {}).items() if takes_any or k in signature}
    digest = hashlib.sha256()
    try:
        for inputs in (random_inputs(0), random_inputs(1)):
            loss, grads = evaluate(lambda *xs: fn(*xs, **kwargs), inputs, "fingerprint")
            for tensor in [loss, *(grads or [])]:
                digest.update(" ".join(_rounded(v) for v in tensor.tolist()).encode() + b";")
    except Exception:
        return None
    return digest.hexdigest()[:16]


def _rounded(value: float) -> str:
    # Below 1e-6 float32 keeps few digits (-logsigmoid(100) is a denormal that softplus(-100)
    # rounds otherwise), so such values count as 0; 0.0 also stands for -0.0.
    return "0" if abs(value) < 1e-6 else f"{value:.5g}"


def check(
    code: str,
    function: str,
    builtin_names: Iterable[str],
    call_params: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Define and check one candidate; never raises (except on the limits' signals)."""
    try:
        fn = define_function(code, function, builtin_names)
    except BaseException as e:  # any failure is the candidate's
        return _failure(f"defining the function failed: {_describe(e)}", "definition")
    try:
        flags = run_checks(fn, seed)
        return {
            "ok": True,
            "reason": None,
            "flags": flags,
            "fingerprint": fingerprint(fn, call_params),
        }
    except CheckFailed as e:
        return _failure(str(e), e.flag)
    except MemoryError:
        return _failure("memory limit exceeded (MemoryError)", "memory")
    except BaseException as e:
        text = _describe(e)
        if "allocate" in text and "memory" in text:
            return _failure(f"memory limit exceeded: {text}", "memory")
        return _failure(f"calling the objective raised {text}", "exception")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _failure(reason: str, flag: str | None) -> dict[str, Any]:
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return {"ok": False, "reason": reason, "flags": [flag] if flag else []}


# ---------------------------------------------------------------- process


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limit_cpu(cpu_s: float) -> None:
    """Soft CPU limit `cpu_s` from now: exceeding it sends SIGXCPU, which ends the process."""
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(_cpu_seconds() + cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _limit_memory(memory_mb: int) -> None:
    """Address space = what the interpreter and torch map now, plus `memory_mb` for the
    candidate."""
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (not Linux): keep the parent's outer cap
        return
    limit = mapped + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    # The protocol gets a private copy of stdout; fd 1 goes to /dev/null so that anything the
    # candidate (or torch) prints cannot corrupt it.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    config = json.loads(sys.stdin.readline())
    builtin_names = config["builtins"]
    torch.set_num_threads(1)
    _limit_memory(int(config["memory_mb"]))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        _limit_cpu(float(request["cpu_s"]))
        result = check(
            request["code"],
            request["function"],
            builtin_names,
            request.get("call_params"),
            int(request.get("seed", 0)),
        )
        protocol.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
