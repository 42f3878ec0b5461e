"""The proxy-training worker: trains candidates in a child process under limits (`proxy.py`).

A candidate that passed the sandbox check is trained here, never in the `prefalign discover`
process: compiled through the same restricted globals as in the check (`define_function`),
under a per-candidate CPU limit and a memory cap (set here) and a wall clock (enforced by
the parent), and watched on every training batch by `GuardedObjective`:
- the loss must be a finite tensor of shape [B] with finite gradients;
- the loss must not reward lowering the chosen response where the policy does not yet
  prefer it: when most pairs whose log-ratio margin is <= 0 have d loss / d
  policy_chosen_logps > 0, the sandbox's direction test runs on those pairs (the loss with
  their margin raised by d against lowered by d, at margin scales 0.5 to 300) and must pass
  at most scales. Every preference loss passes (DiscoPOP, whose gradient at margin 0 is
  positive, passes the scale test); a candidate that behaved in the check and reverses the
  training direction on real batches does not.
A violation ends that candidate's training with a reason; the worker goes on to the next one.

Protocol (one JSON object per line): config {"kind": "synthetic" | "toy", "proxy", ...} ->
{"ready": true}; then {"code", "function", "key", "cpu_s"} -> {"ok", "fitness", "metrics"}
or {"ok": false, "reason", "flag"}. The toy proxy's fitness is null: its metrics hold the KL
and the held-out responses, which the parent scores with the task's gold reward.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prefalign.discovery.sandbox_worker import (
    DIRECTION_SCALES,
    _limit_cpu,
    _limit_memory,
    define_function,
)
from prefalign.discovery.static_check import SAFE_BUILTINS

MAX_REASON_CHARS = 400


class BehaviourViolation(Exception):
    """The candidate misbehaved on a real training batch."""

    def __init__(self, reason: str, flag: str) -> None:
        super().__init__(reason)
        self.flag = flag


class GuardedObjective:
    """A pairwise objective that checks what it computes on every call (see the module doc)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        functools.update_wrapper(self, fn)  # the signature (hyper-parameters) stays visible
        self.fn = fn
        self.calls = 0

    def __call__(
        self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, **params: Any
    ) -> torch.Tensor:
        self.calls += 1
        loss = self.fn(pc, pr, rc, rr, **params)
        if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != tuple(pc.shape):
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise BehaviourViolation(
                f"in training (call {self.calls}) the loss is {shape}, not a per-pair tensor "
                f"of shape {list(pc.shape)}", "wrong_shape_in_training",
            )  # fmt: skip
        if not torch.isfinite(loss).all():
            raise BehaviourViolation(
                f"non-finite loss in training (call {self.calls})", "non_finite_in_training"
            )
        if pc.requires_grad and loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), [pc], retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(pc) if grad is None else grad
            if not torch.isfinite(grad).all():
                raise BehaviourViolation(
                    f"non-finite gradient in training (call {self.calls})", "non_finite_in_training"
                )
            self._check_direction(pc, pr, rc, rr, grad, params)
        return loss

    def _check_direction(
        self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
        grad: torch.Tensor, params: dict[str, Any],
    ) -> None:  # fmt: skip
        with torch.no_grad():
            margin = (pc - rc) - (pr - rr)
            behind = margin <= 0
            n = int(behind.sum())
            if n < 2:
                return
            wrong = int((grad[behind] > 0).sum())
            if wrong * 2 <= n:
                return
            inputs = [t.detach()[behind] for t in (pc, pr, rc, rr)]
            worse = []
            for d in DIRECTION_SCALES:
                up = self.fn(inputs[0], inputs[1] - d, *inputs[2:], **params).mean().item()
                down = self.fn(inputs[0] - d, *inputs[1:], **params).mean().item()
                if not (up <= down):  # also catches nan
                    worse.append(d)
        if len(worse) > len(DIRECTION_SCALES) // 2:
            raise BehaviourViolation(
                f"reverses the training direction on a real batch (call {self.calls}): for "
                f"{wrong} of the {n} pairs whose chosen response is not yet preferred, the loss "
                "rises as the chosen response gains log-probability, at "
                f"{len(worse)} of {len(DIRECTION_SCALES)} margin scales",
                "reverses_in_training",
            )


# ---------------------------------------------------------------- the two proxies


def synthetic_proxy(settings: dict[str, Any]) -> Callable[[GuardedObjective], tuple[float, dict]]:
    from prefalign.discovery.fitness import optimize_synthetic

    def run(objective: GuardedObjective) -> tuple[float, dict]:
        result = optimize_synthetic(
            objective, kl_penalty=float(settings["kl_penalty"]), seed=int(settings["seed"])
        )
        return result.fitness, dict(result.metrics)

    return run


def toy_proxy(settings: dict[str, Any]) -> Callable[[GuardedObjective], tuple[None, dict]]:
    """Train the task's policy with the objective; return its KL to the start and its samples
    on the held-out prompts. The parent scores them with the task's gold reward: a task may
    exist only in the parent (registered by user code), and the reward is not the candidate's
    to see."""
    from prefalign import objectives
    from prefalign.config import load_config
    from prefalign.evaluation.core import evaluate_policy
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.training.preference import PreferenceConfig, run_preference

    proxy = settings["proxy"]
    policy_path, pairs_path = settings["policy_path"], settings["pairs_path"]
    out_dir = Path(settings["out_dir"])
    tokenizer = load_tokenizer(policy_path)
    sft = load_model(policy_path, device="cpu")
    prompts = list(settings["prompts"])

    def unscored(prompt: str, response: str) -> float:
        return 0.0  # the gold reward is the parent's (see above)

    def run(objective: GuardedObjective, key: str) -> tuple[None, dict]:
        name = f"candidate_{key}"
        registered = objectives.register(name, objective, overwrite=True)
        run_dir = out_dir / "proxy_runs" / key
        config = load_config(PreferenceConfig, None, [
            f"model.name_or_path={policy_path}", f"data.path={pairs_path}",
            f"objective.name={name}", f"reference.mode={proxy['reference']}",
            "reference.period=4", "reference.tau=12", f"trainer.out_dir={run_dir}",
            f"trainer.batch_size={proxy['batch_size']}", f"trainer.max_steps={proxy['steps']}",
            f"trainer.lr={proxy['lr']}", f"trainer.seed={proxy['seed']}", "trainer.progress=false",
            "trainer.log_every=1000", "data.max_length=64", "data.max_prompt_length=16",
        ])  # fmt: skip
        # Candidates without a beta parameter take none; those with one get the proxy's.
        if registered.accepts("beta"):
            config.objective.params = {"beta": proxy["beta"]}
        resolved = registered.resolve(config.objective.params)
        run_preference(config, log=lambda *_: None, objective=resolved)
        policy = load_model(run_dir / "final", device="cpu")
        result = evaluate_policy(
            policy, tokenizer, settings["task"], prompts, reference=sft,
            samples_per_prompt=proxy["samples_per_prompt"], seed=proxy["seed"],
            reward_fn=unscored,
        )  # fmt: skip
        return None, {"kl": result.kl, "responses": [s["response"] for s in result.samples]}

    return run  # type: ignore[return-value]


# ---------------------------------------------------------------- process


def train_one(proxy: Callable[..., tuple[float, dict]], kind: str, request: dict) -> dict:
    """Train and score one candidate; never raises (except on the limits' signals)."""
    start = time.perf_counter()
    try:
        fn = define_function(request["code"], request["function"], SAFE_BUILTINS)
    except BaseException as e:  # noqa: BLE001 - any failure is the candidate's
        return _failure(f"defining the function failed: {type(e).__name__}: {e}", "definition")
    objective = GuardedObjective(fn)
    try:
        if kind == "toy":
            fitness, metrics = proxy(objective, request["key"])
        else:
            fitness, metrics = proxy(objective)
    except BehaviourViolation as e:
        return _failure(str(e), e.flag)
    except MemoryError:
        return _failure("memory limit exceeded in training (MemoryError)", "memory")
    except BaseException as e:  # noqa: BLE001
        cause = e.__cause__ or e.__context__
        if isinstance(cause, BehaviourViolation):  # re-raised by the training code
            return _failure(str(cause), cause.flag)
        text = f"{type(e).__name__}: {e}"
        if "allocate" in text and "memory" in text:
            return _failure(f"memory limit exceeded in training: {text}", "memory")
        return _failure(f"proxy training failed: {text}", "training_failed")
    metrics = {**metrics, "seconds": round(time.perf_counter() - start, 1),
               "checked_calls": objective.calls}  # fmt: skip
    return {"ok": True, "fitness": fitness, "metrics": metrics}


def _failure(reason: str, flag: str) -> dict[str, Any]:
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return {"ok": False, "reason": reason, "flag": flag}


def main() -> None:
    # A private copy of stdout carries the protocol; fd 1 goes to /dev/null so that nothing the
    # training prints can corrupt it.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    config = json.loads(sys.stdin.readline())
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))
    kind = config["kind"]
    proxy = toy_proxy(config) if kind == "toy" else synthetic_proxy(config)
    _limit_memory(int(config["memory_mb"]))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        _limit_cpu(float(request["cpu_s"]))
        protocol.write(json.dumps(train_one(proxy, kind, request), allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
