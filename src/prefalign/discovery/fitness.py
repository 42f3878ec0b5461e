"""Fitness of a candidate objective: the result type, the reward/KL rule, a cache, a cheap proxy.

The real proxy (short preference training on the toy `sentiment` task, gold reward and KL on
held-out prompts) plugs in as any `fitness_fn(candidate) -> FitnessResult`; `synthetic_fitness`
is a seconds-cheap stand-in with the same shape: optimize under the candidate loss, then score
reward against drift with `score`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from prefalign.discovery.candidate import Candidate, normalize_code
from prefalign.discovery.export import compile_objective
from prefalign.io import atomic_write

# Fitness of a candidate over the KL budget: far below any reward, still ordered by overshoot.
INFEASIBLE = -1e6

FitnessFn = Callable[[Candidate], "FitnessResult"]


class CandidateRejected(Exception):
    """A fitness evaluation refused the candidate (it misbehaved in training, or ran past a
    limit); `reason` goes into the archive, `flag` tags it."""

    def __init__(self, reason: str, flag: str = "training") -> None:
        super().__init__(reason)
        self.reason, self.flag = reason, flag


@dataclass(frozen=True)
class FitnessResult:
    """`fitness`: higher is better; `metrics`: what it was computed from (gold, kl, ...)."""

    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)


def score(
    gold: float,
    kl: float,
    mode: Literal["budget", "penalty"] = "budget",
    budget: float = 1.0,
    penalty: float = 0.1,
) -> float:
    """`budget`: gold reward if kl <= budget, else INFEASIBLE - (kl - budget).
    `penalty`: gold - penalty * kl."""
    if mode == "penalty":
        return gold - penalty * kl
    if mode == "budget":
        return gold if kl <= budget else INFEASIBLE - (kl - budget)
    raise ValueError(f"fitness mode must be 'budget' or 'penalty', got {mode!r}")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able proxy configuration, independent of key order."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class FitnessCache:
    """A JSON file of fitness results keyed by sha256(normalized code) + proxy-config hash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )

    @staticmethod
    def key(code: str, proxy_config: Mapping[str, Any]) -> str:
        code_digest = hashlib.sha256(normalize_code(code).encode()).hexdigest()
        return f"{code_digest}:{config_hash(proxy_config)}"

    def get(self, code: str, proxy_config: Mapping[str, Any]) -> FitnessResult | None:
        entry = self.entries.get(self.key(code, proxy_config))
        return None if entry is None else FitnessResult(entry["fitness"], entry["metrics"])

    def put(self, code: str, proxy_config: Mapping[str, Any], result: FitnessResult) -> None:
        self.entries[self.key(code, proxy_config)] = {
            "fitness": result.fitness,
            "metrics": result.metrics,
        }
        # atomic: a crash never leaves half a cache
        atomic_write(self.path, json.dumps(self.entries, indent=1, sort_keys=True))

    def wrap(self, fitness_fn: FitnessFn, proxy_config: Mapping[str, Any]) -> FitnessFn:
        """`fitness_fn` that answers from the cache when the same code was scored before."""

        def cached(candidate: Candidate) -> FitnessResult:
            hit = self.get(candidate.code, proxy_config)
            if hit is not None:
                return hit
            result = fitness_fn(candidate)
            if math.isfinite(result.fitness):
                self.put(candidate.code, proxy_config, result)
            return result

        return cached


def synthetic_fitness(
    candidate: Candidate,
    *,
    n_pairs: int = 256,
    steps: int = 50,
    lr: float = 0.1,
    label_noise: float = 0.2,
    kl_penalty: float = 0.05,
    seed: int = 0,
) -> FitnessResult:
    """A real optimisation, no model: train free per-pair log-probs under the candidate loss.

    Policy log-probs start at the reference; `label_noise` of the pairs have their labels
    flipped (the "chosen" response is truly worse). After `steps` of Adam on the mean loss,
    gold = mean over pairs of tanh(margin gain / 4), signed by the TRUE preference;
    kl = mean squared log-ratio drift; fitness = score(gold, kl, "penalty", kl_penalty).
    """
    return optimize_synthetic(
        compile_objective(candidate.code), n_pairs=n_pairs, steps=steps, lr=lr,
        label_noise=label_noise, kl_penalty=kl_penalty, seed=seed,
    )  # fmt: skip


def optimize_synthetic(
    fn: Callable[..., torch.Tensor],
    *,
    n_pairs: int = 256,
    steps: int = 50,
    lr: float = 0.1,
    label_noise: float = 0.2,
    kl_penalty: float = 0.05,
    seed: int = 0,
) -> FitnessResult:
    """`synthetic_fitness` of an already compiled objective function."""
    # Tiny tensors: intra-op threads only add wake-up latency (F.logsigmoid on 256 values takes
    # milliseconds with 2 threads on a busy machine, microseconds with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _optimize(fn, n_pairs, steps, lr, label_noise, kl_penalty, seed)
    finally:
        torch.set_num_threads(threads)


def _optimize(
    fn: Callable[..., torch.Tensor],
    n_pairs: int,
    steps: int,
    lr: float,
    label_noise: float,
    kl_penalty: float,
    seed: int,
) -> FitnessResult:
    g = torch.Generator().manual_seed(seed)
    rc = -(20 + 80 * torch.rand(n_pairs, generator=g))
    rr = -(20 + 80 * torch.rand(n_pairs, generator=g))
    truth = torch.where(torch.rand(n_pairs, generator=g) < label_noise, -1.0, 1.0)
    params = torch.stack([rc, rr]).requires_grad_(True)  # policy log-probs start at the reference
    # Adam (Kingma & Ba), written out: torch.optim's first use imports the compiler stack.
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        loss = fn(params[0], params[1], rc, rr).mean()
        if not torch.isfinite(loss):
            return FitnessResult(float("nan"), {"diverged": True})
        (grad,) = torch.autograd.grad(loss, params)
        with torch.no_grad():
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            params -= step
    pc, pr = params.detach()
    with torch.no_grad():
        margin = (pc - rc) - (pr - rr)
        gold = (truth * torch.tanh(margin / 4)).mean().item()
        kl = (((pc - rc) ** 2 + (pr - rr) ** 2) / 2).mean().item()
    metrics = {"gold": gold, "kl": kl, "final_loss": loss.item()}
    return FitnessResult(score(gold, kl, "penalty", penalty=kl_penalty), metrics)
