"""`prefalign discover`: propose objectives, sandbox them, score each by short toy training.

The proxy trains the toy sentiment SFT policy with the candidate objective for a few dozen
seeded steps and scores gold reward on held-out prompts under a KL budget (or with a KL
penalty); the registry's objectives are scored the same way as baselines. Each candidate
trains in a confined worker process (discovery.proxy: CPU, memory and wall-clock limits,
restricted globals, behaviour checks on every batch). Results are cached by code hash, proxy
settings and task, so a resumed or repeated run trains nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefalign.config import bounded
from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate
from prefalign.discovery.export import save_objective
from prefalign.discovery.fitness import FitnessCache, FitnessResult, score
from prefalign.discovery.llm import LLMProposer
from prefalign.discovery.loop import run_discovery
from prefalign.discovery.offline import OfflineProposer, baseline_codes
from prefalign.discovery.proxy import ConfinedFitness, TrainingLimits
from prefalign.discovery.sandbox import SandboxLimits
from prefalign.manifest import make_run_dir, write_manifest
from prefalign.tasks import Task, resolve_task


@dataclass
class ProposerSpec:
    kind: Literal["offline", "llm"] = "offline"
    seed: int = 0
    base_url: str = "http://localhost:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    max_retries: int = bounded(3, min=0)
    timeout_s: float = bounded(30.0, gt=0)
    backoff_s: float = bounded(1.0, min=0)
    temperature: float = bounded(0.8, min=0)
    # bound on each reply (a local server otherwise fills its context)
    max_tokens: int | None = bounded(1024, min=1)
    json_mode: bool = False  # response_format {"type": "json_object"}: grammar-constrained JSON
    max_prompt_chars: int = bounded(12_000, min=1)  # system + user; the archive is cut to fit


@dataclass
class FitnessSpec:
    mode: Literal["budget", "penalty"] = "budget"
    kl_budget: float = bounded(4.0, min=0)  # nats per sequence
    kl_penalty: float = bounded(0.05, min=0)


@dataclass
class ProxySpec:
    task: Literal["sentiment", "synthetic"] = "sentiment"  # synthetic: seconds, no model
    steps: int = bounded(24, min=1)
    batch_size: int = bounded(16, min=1)
    lr: float = bounded(5e-4, gt=0)
    beta: float = bounded(0.1, gt=0)
    reference: Literal["frozen", "soft", "hard"] = "frozen"
    n_eval_prompts: int = bounded(48, min=1)
    samples_per_prompt: int = bounded(2, min=1)
    seed: int = 0
    fitness: FitnessSpec = field(default_factory=FitnessSpec)


@dataclass
class SandboxSpec:
    timeout_s: float = bounded(10.0, gt=0)  # the check of one candidate
    cpu_s: float = bounded(5.0, gt=0)
    memory_mb: int = bounded(1024, min=1)
    # the proxy training of one candidate, in its own worker
    train_timeout_s: float = bounded(900.0, gt=0)
    train_cpu_s: float = bounded(600.0, gt=0)
    train_memory_mb: int = bounded(4096, min=1)


@dataclass
class DiscoverConfig:
    out_dir: str = "runs/discover"
    generations: int = bounded(3, min=0)
    candidates_per_generation: int = bounded(4, min=1)
    baselines: bool = True
    proposer: ProposerSpec = field(default_factory=ProposerSpec)
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    proxy: ProxySpec = field(default_factory=ProxySpec)


def make_proposer(spec: ProposerSpec, call_params: dict | None = None, log=print):
    if spec.kind == "offline":
        return OfflineProposer(seed=spec.seed, call_params=call_params)
    return LLMProposer(
        base_url=spec.base_url,
        model=spec.model,
        api_key_env=spec.api_key_env,
        max_retries=spec.max_retries,
        timeout_s=spec.timeout_s,
        backoff_s=spec.backoff_s,
        temperature=spec.temperature,
        max_tokens=spec.max_tokens,
        json_mode=spec.json_mode,
        max_prompt_chars=spec.max_prompt_chars,
        log=log,
    )


# The toy proxy's fitness, computed here from what the worker sends back.
Scorer = Callable[[dict[str, Any]], FitnessResult]


def proxy_settings(
    config: DiscoverConfig, out_dir: Path, log=print, task: Task | None = None
) -> tuple[Literal["synthetic", "toy"], dict, Scorer | None]:
    """(kind, settings, score) of the confined proxy training (`ConfinedFitness`). The toy
    proxy trains the task's policy on its preference pairs (`task` defaults to
    toy:<proxy.task>); the worker sends back KL and held-out responses, and `score` rates them
    with the task's gold reward in this process, so any task works, one registered only here
    included."""
    proxy = config.proxy
    if proxy.task == "synthetic":
        settings = {"kl_penalty": proxy.fitness.kl_penalty, "seed": proxy.seed, "threads": 1}
        return "synthetic", settings, None
    task = task or resolve_task(f"toy:{proxy.task}")
    prompts = task.prompts("eval")[: proxy.n_eval_prompts]
    settings = {
        "proxy": asdict(proxy),
        "task": task.name,  # a label: the worker does not resolve it
        "policy_path": str(task.policy_path()),
        "pairs_path": str(task.file("pairs")),
        "prompts": prompts,
        "out_dir": str(out_dir.resolve()),
    }
    return "toy", settings, gold_scorer(task, prompts, proxy)


def gold_scorer(task: Task, prompts: list[str], proxy: ProxySpec) -> Scorer:
    """Fitness from the worker's metrics: the mean gold reward of its responses (each prompt
    sampled `proxy.samples_per_prompt` times, in order) scored against its KL."""
    expanded = [p for p in prompts for _ in range(proxy.samples_per_prompt)]
    fit = proxy.fitness

    def scored(metrics: dict[str, Any]) -> FitnessResult:
        responses = metrics.pop("responses")
        if len(responses) != len(expanded):
            raise RuntimeError(f"proxy worker sent {len(responses)} responses for {len(expanded)}")
        rewards = task.gold_reward(expanded, responses)
        gold = sum(rewards) / len(rewards)
        value = score(gold, metrics["kl"], fit.mode, fit.kl_budget, fit.kl_penalty)
        return FitnessResult(value, {"gold": gold, **metrics})

    return scored


def cache_identity(proxy: ProxySpec, settings: dict[str, Any]) -> dict[str, Any]:
    """What a cached fitness depends on: the proxy's settings and, for a task proxy, the task
    (its name, policy and pairs), so a candidate scored on one task is trained again on
    another."""
    task_keys = ("task", "policy_path", "pairs_path")
    return {**asdict(proxy), **{k: settings[k] for k in task_keys if k in settings}}


def run_discover(
    config: DiscoverConfig, resume: bool = False, log=print, task: Task | None = None
) -> Archive:
    out_dir = Path(config.out_dir)
    # The proposer first: a bad proposer config fails before any world is built or trained.
    # How the fitness calls a candidate: the toy proxy passes its beta to those that take one;
    # the synthetic proxy uses the candidate's defaults.
    call_params = None if config.proxy.task == "synthetic" else {"beta": config.proxy.beta}
    proposer = make_proposer(config.proposer, call_params, log=log)
    box = config.sandbox
    limits = SandboxLimits(timeout_s=box.timeout_s, memory_mb=box.memory_mb, cpu_s=box.cpu_s)
    training = TrainingLimits(
        timeout_s=box.train_timeout_s, cpu_s=box.train_cpu_s, memory_mb=box.train_memory_mb
    )
    kind, settings, scorer = proxy_settings(config, out_dir, log=log, task=task)
    make_run_dir(out_dir)  # only once the config has passed its checks
    write_manifest(out_dir, "discover")
    # Every candidate trains in a confined worker, never in this process.
    with ConfinedFitness(kind, settings, training, cwd=out_dir, score=scorer) as raw:
        fitness = FitnessCache(out_dir / "fitness_cache.json").wrap(
            raw, cache_identity(config.proxy, settings)
        )
        archive = run_discovery(
            proposer,
            fitness,
            generations=config.generations,
            candidates_per_generation=config.candidates_per_generation,
            archive_path=out_dir / "archive.jsonl",
            resume=resume,
            baselines=baseline_codes() if config.baselines else None,
            limits=limits,
            log=log,
            call_params=call_params,
        )
    record = archive.best_proposed()
    if record is not None:
        spec = save_objective(
            Candidate(
                record["name"],
                record["code"],
                record.get("thought", ""),
                origin=record.get("origin", "unknown"),
            ),
            out_dir / "best_objective.py",
        )
        log(
            f"best discovered objective: {record['name']} "
            f"(fitness {record['fitness']:.4f}); use it with\n"
            f"  prefalign train ... objective.code={spec}"
        )
    return archive
