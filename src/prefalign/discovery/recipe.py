"""`prefalign discover`: propose objectives, sandbox them, score each by short toy training.

The proxy trains the toy sentiment SFT policy with the candidate objective for a few dozen
seeded steps and scores gold reward on held-out prompts under a KL budget (or with a KL
penalty); the registry's objectives are scored the same way as baselines. Results are cached
by code hash, so a resumed or repeated run trains nothing twice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate
from prefalign.discovery.export import save_objective
from prefalign.discovery.fitness import FitnessCache, FitnessResult, score, synthetic_fitness
from prefalign.discovery.llm import LLMProposer
from prefalign.discovery.loop import run_discovery
from prefalign.discovery.offline import OfflineProposer, baseline_codes
from prefalign.discovery.sandbox import SandboxLimits
from prefalign.tasks import Task, resolve_task


@dataclass
class ProposerSpec:
    kind: Literal["offline", "llm"] = "offline"
    seed: int = 0
    base_url: str = "http://localhost:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    max_retries: int = 3
    timeout_s: float = 30.0
    backoff_s: float = 1.0
    temperature: float = 0.8
    max_tokens: int | None = 1024  # bound on each reply (a local server otherwise fills its context)
    json_mode: bool = False  # response_format {"type": "json_object"}: grammar-constrained JSON
    max_prompt_chars: int = 12_000  # system + user prompt; the archive is summarized to fit


@dataclass
class FitnessSpec:
    mode: Literal["budget", "penalty"] = "budget"
    kl_budget: float = 4.0  # nats per sequence
    kl_penalty: float = 0.05


@dataclass
class ProxySpec:
    task: Literal["sentiment", "synthetic"] = "sentiment"  # synthetic: seconds, no model
    steps: int = 24
    batch_size: int = 16
    lr: float = 5e-4
    beta: float = 0.1
    reference: Literal["frozen", "soft", "hard"] = "frozen"
    n_eval_prompts: int = 48
    samples_per_prompt: int = 2
    seed: int = 0
    fitness: FitnessSpec = field(default_factory=FitnessSpec)


@dataclass
class SandboxSpec:
    timeout_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 1024


@dataclass
class DiscoverConfig:
    out_dir: str = "runs/discover"
    generations: int = 3
    candidates_per_generation: int = 4
    baselines: bool = True
    proposer: ProposerSpec = field(default_factory=ProposerSpec)
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    proxy: ProxySpec = field(default_factory=ProxySpec)


def make_proposer(spec: ProposerSpec, call_params: dict | None = None, log=print):
    if spec.kind == "offline":
        return OfflineProposer(seed=spec.seed, call_params=call_params)
    return LLMProposer(
        base_url=spec.base_url, model=spec.model, api_key_env=spec.api_key_env, max_retries=spec.max_retries,
        timeout_s=spec.timeout_s, backoff_s=spec.backoff_s, temperature=spec.temperature,
        max_tokens=spec.max_tokens, json_mode=spec.json_mode, max_prompt_chars=spec.max_prompt_chars, log=log,
    )


def toy_proxy_fitness(proxy: ProxySpec, out_dir: Path, log=print, task: Task | None = None):
    """fitness_fn(candidate): train the task's policy on its preference pairs with the candidate,
    score gold vs KL. `task` defaults to toy:sentiment (its cached world)."""
    from prefalign.config import load_config
    from prefalign.evaluation.core import evaluate_policy
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.training.preference import PreferenceConfig, run_preference

    task = task or resolve_task(f"toy:{proxy.task}")
    policy_path = task.policy_path()
    tokenizer = load_tokenizer(policy_path)
    sft = load_model(policy_path, device="cpu")
    prompts = task.prompts("eval")[: proxy.n_eval_prompts]

    def fitness(candidate: Candidate) -> FitnessResult:
        start = time.perf_counter()
        spec = save_objective(candidate, out_dir / "objectives" / f"{candidate.code_hash[:12]}.py")
        run_dir = out_dir / "proxy_runs" / candidate.code_hash[:12]
        config = load_config(PreferenceConfig, None, [
            f"model.name_or_path={policy_path}", f"data.path={task.file('pairs')}",
            f"objective.code={spec}", f"reference.mode={proxy.reference}", "reference.period=4", "reference.tau=12",
            f"trainer.out_dir={run_dir}", f"trainer.batch_size={proxy.batch_size}", f"trainer.max_steps={proxy.steps}",
            f"trainer.lr={proxy.lr}", f"trainer.seed={proxy.seed}", "trainer.progress=false", "trainer.log_every=1000",
            "data.max_length=64", "data.max_prompt_length=16",
        ])
        # Candidates without a beta parameter take none; those with one get the proxy's.
        from prefalign import objectives

        objective = objectives.load_user_objective(spec)  # imported once, passed down resolved
        if objective.accepts("beta"):
            config.objective.params = {"beta": proxy.beta}
        resolved = objective.resolve(config.objective.params)
        run_preference(config, log=lambda *_: None, objective=resolved)
        policy = load_model(run_dir / "final", device="cpu")
        result = evaluate_policy(
            policy, tokenizer, task, prompts, reference=sft,
            samples_per_prompt=proxy.samples_per_prompt, seed=proxy.seed,
        )
        fit = proxy.fitness
        value = score(result.gold_reward, result.kl, fit.mode, fit.kl_budget, fit.kl_penalty)
        return FitnessResult(value, {"gold": result.gold_reward, "kl": result.kl, "seconds": round(time.perf_counter() - start, 1)})

    return fitness


def run_discover(
    config: DiscoverConfig, resume: bool = False, log=print, task: Task | None = None
) -> Archive:
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.proxy.task == "synthetic":
        def raw(c: Candidate) -> FitnessResult:
            return synthetic_fitness(c, kl_penalty=config.proxy.fitness.kl_penalty, seed=config.proxy.seed)
    else:
        raw = toy_proxy_fitness(config.proxy, out_dir, log=log, task=task)
    fitness = FitnessCache(out_dir / "fitness_cache.json").wrap(raw, asdict(config.proxy))
    limits = SandboxLimits(timeout_s=config.sandbox.timeout_s, memory_mb=config.sandbox.memory_mb, cpu_s=config.sandbox.cpu_s)
    # How the fitness calls a candidate: the toy proxy passes its beta to those that take one;
    # the synthetic proxy uses the candidate's defaults.
    call_params = None if config.proxy.task == "synthetic" else {"beta": config.proxy.beta}
    archive = run_discovery(
        make_proposer(config.proposer, call_params, log=log), fitness,
        generations=config.generations, candidates_per_generation=config.candidates_per_generation,
        archive_path=out_dir / "archive.jsonl", resume=resume,
        baselines=baseline_codes() if config.baselines else None, limits=limits, log=log,
        call_params=call_params,
    )
    record = archive.best_proposed()
    if record is not None:
        spec = save_objective(Candidate(record["name"], record["code"], record.get("thought", "")), out_dir / "best_objective.py")
        log(f"best discovered objective: {record['name']} (fitness {record['fitness']:.4f}); use it with\n"
            f"  prefalign train ... objective.code={spec}")
    return archive
