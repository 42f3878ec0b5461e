"""The SmolLM2 world: SmolLM2-135M-Instruct (imported from its GGUF wheel) and its two tasks.

`get_smol_world(task)` builds once and caches, keyed by the config and the model file's hash:

    prompts_train.jsonl  chat-rendered prompts for online methods (ReST grows on these)
    prompts_eval.jsonl   held-out prompts (disjoint films / operand pairs)
    pairs.jsonl          sentiment: preference pairs from SmolLM2's own samples, ranked by the
    pairs_eval.jsonl       gold reward with Bradley-Terry noise (Rafailov et al., 2023, sec. 6.1)
    unpaired.jsonl       sentiment: KTO data (Ethayarajh et al., 2024) from the same samples
    world.json           the config and the measured figures (starting reward, accuracy, seconds)

The policy is the imported checkpoint itself (`policy_path`): SmolLM2-Instruct is already an SFT
model, so it is both the starting policy and the KL reference, as the SFT model is in the paper.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from prefalign.io import cache_root, read_prompts, write_jsonl
from prefalign.smol import prompts as grammar
from prefalign.smol.rewards import arith_correct, brevity_reward, sentiment_reward
from prefalign.tasks import TaskError
from prefalign.training.precision import cpu_weights_dtype

WORLD_VERSION = 2  # 2: pairs and KTO data from replies that stopped on EOS only
TASKS = ("sentiment", "arith")
MODEL = "smollm2"


@dataclass
class SmolConfig:
    task: Literal["sentiment", "arith"] = "sentiment"
    seed: int = 0
    model: str = MODEL  # any model source: smollm2, gguf:PATH, a checkpoint directory
    # Sampling dtype: bf16 where the CPU multiplies it natively (AMX made it ~3x faster than
    # fp32), else fp32. Part of the cache key: the samples, so the world, depend on it.
    dtype: str = field(default_factory=cpu_weights_dtype)
    # Short: the chat template's default system prompt adds 20 tokens to every sequence.
    system_prompt: str = "You are a helpful assistant."
    n_train_prompts: int = 64
    n_eval_prompts: int = 32
    # Sentiment: prompts sampled for training and held-out preference pairs. About 80% of the
    # replies stop within 64 tokens, 1.5 pairs a prompt: about 96 training pairs, 24 held-out.
    n_pair_prompts: int = 64
    n_eval_pair_prompts: int = 16
    samples_per_prompt: int = 4  # two pairs per prompt from four samples
    bt_temperature: float = 0.15  # Bradley-Terry noise of the simulated labeller, reward units
    max_new_tokens: int = 32  # evaluation and ReST replies
    # Preference and KTO samples: room to finish, and only replies that stopped on EOS are kept.
    # The training pipeline ends every response with EOS, so a reply cut at the cap (55% of
    # them at 32 tokens) would teach stopping mid-sentence, the largest term of its log-prob.
    pair_max_new_tokens: int = 64
    complete_only: bool = True  # False pairs every reply (a tiny random model seldom stops)
    arith_low: int = 2  # operand range of smol:arith (measured accuracy in world.json)
    arith_high: int = 40
    batch_size: int = 32
    # torch's intra-op threads while building: a matmul's float sums depend on how many threads
    # split it, so the samples do (measured: 1 thread gave 257 replies that stopped on EOS, 92
    # pairs; 2 threads 267, 93). Fixed, and part of the cache key, so one config builds one world
    # whatever the caller's setting; 2 is torch's default on the 2-core machine the demo targets.
    build_threads: int = 2

    @classmethod
    def for_task(cls, task: str) -> SmolConfig:
        if task not in TASKS:
            raise TaskError(f"unknown SmolLM2 task {task!r}, allowed: {', '.join(TASKS)}")
        if task == "arith":  # it explains before it answers: 48 tokens reach the answer
            return cls(task="arith", max_new_tokens=48, n_pair_prompts=0, n_eval_pair_prompts=0)
        return cls(task=task)


@dataclass
class SmolWorld:
    """A built SmolLM2 world; the same shape as the toy world, so demo rows run on either."""

    task: str
    root: Path

    @property
    def policy_path(self) -> Path:
        return Path(self.info()["policy"])

    def file(self, name: str) -> Path:
        return self.root / name

    def info(self) -> dict:
        return json.loads((self.root / "world.json").read_text())

    def prompts(self, split: Literal["train", "eval"]) -> list[str]:
        return read_prompts(self.file(f"prompts_{split}.jsonl"))


def get_smol_world(
    task: str = "sentiment",
    config: SmolConfig | None = None,
    out: str | Path | None = None,
    log=print,
) -> SmolWorld:
    """The cached world for this config, built first if missing."""
    from prefalign.models import resolve_model_source

    config = config or SmolConfig.for_task(task)
    policy = Path(resolve_model_source(config.model))  # imports the GGUF once (cached)
    key = hashlib.sha256(
        json.dumps(
            {"v": WORLD_VERSION, "policy": policy.name, **asdict(config)}, sort_keys=True
        ).encode()
    ).hexdigest()[:12]
    root = Path(out) if out else cache_root() / "smol" / f"{config.task}-{key}"
    if (root / "world.json").exists():
        return SmolWorld(config.task, root)
    return build_smol_world(config, policy, root, log=log)


def render(tokenizer, config: SmolConfig, request: str) -> str:
    from prefalign.modeling import apply_chat_template

    messages = [
        {"role": "system", "content": config.system_prompt},
        {"role": "user", "content": request},
    ]
    return apply_chat_template(tokenizer, messages, add_generation_prompt=True)


def task_requests(config: SmolConfig) -> dict[str, list[str]]:
    """User messages per split: train prompts, evaluation prompts, and (sentiment) pair prompts."""
    if config.task == "sentiment":
        train_titles, eval_titles = grammar.split_titles(config.seed, n_eval=48)
        n_train_side = config.n_train_prompts + config.n_pair_prompts + config.n_eval_pair_prompts
        train_side = grammar.review_requests(train_titles, n_train_side, config.seed + 1)
        return {
            "train": train_side[: config.n_train_prompts],
            "pairs": train_side[config.n_train_prompts :],
            "eval": grammar.review_requests(eval_titles, config.n_eval_prompts, config.seed + 2),
        }
    train, held_out = grammar.arith_problems(
        config.arith_low,
        config.arith_high,
        config.n_train_prompts,
        config.n_eval_prompts,
        config.seed,
    )
    return {
        "train": [grammar.arith_request(a, b) for a, b in train],
        "eval": [grammar.arith_request(a, b) for a, b in held_out],
    }


def build_smol_world(config: SmolConfig, policy: Path, root: Path, log=print) -> SmolWorld:
    import torch

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.toy.determinism import deterministic_build

    started = time.perf_counter()
    log(f"building the SmolLM2 world '{config.task}' in {root}")
    tokenizer = load_tokenizer(policy)
    model = load_model(policy, dtype=config.dtype, device="cpu").eval()
    requests = task_requests(config)
    rendered = {
        split: [render(tokenizer, config, r) for r in rows] for split, rows in requests.items()
    }
    staging = root.with_name(root.name + ".building")
    for split in ("train", "eval"):
        write_jsonl(staging / f"prompts_{split}.jsonl", [{"prompt": p} for p in rendered[split]])
    with deterministic_build(config.build_threads):
        threads = torch.get_num_threads()
        if config.task == "sentiment":
            figures = build_pairs(config, staging, model, tokenizer, rendered["pairs"], log)
        else:
            figures = measure_arith(config, model, tokenizer, rendered["eval"], log)
    figures["build_threads"] = threads  # as torch reported it while sampling
    figures["build_seconds"] = round(time.perf_counter() - started, 1)
    figures["parameters"] = sum(p.numel() for p in model.parameters())
    info = {"config": asdict(config), "policy": str(policy), "figures": figures}
    (staging / "world.json").write_text(json.dumps(info, indent=2))
    if root.exists():  # a half-built directory from an interrupted build
        import shutil

        shutil.rmtree(root)
    staging.rename(root)
    log(f"  built in {figures['build_seconds']:.0f}s: {json.dumps(figures)}")
    return SmolWorld(config.task, root)


def sample(
    model,
    tokenizer,
    prompts: list[str],
    config: SmolConfig,
    temperature: float,
    seed: int,
    max_new_tokens: int | None = None,
):
    from prefalign.generation import SamplingParams, generate

    params = SamplingParams(
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=config.batch_size,
    )
    return generate(model, tokenizer, prompts, params)


def stopped_on_eos(generation, eos_id: int | None) -> bool:
    """Whether a sampled reply ended on EOS rather than at the token cap."""
    return eos_id is not None and generation.response_ids[-1:] == [eos_id]


def bradley_terry_prefers_first(
    rng: random.Random, first: float, second: float, temperature: float
) -> bool:
    """A noisy labeller: prefers `first` with probability sigmoid((first - second) / T)."""
    return rng.random() < 1 / (1 + math.exp(-(first - second) / temperature))


def build_pairs(config: SmolConfig, root: Path, model, tokenizer, prompts: list[str], log) -> dict:
    """Sample SmolLM2 `samples_per_prompt` times per prompt, score with VADER, label pairs of
    the replies that stopped on EOS."""
    t0 = time.perf_counter()
    k = config.samples_per_prompt
    expanded = [p for p in prompts for _ in range(k)]
    samples = sample(
        model,
        tokenizer,
        expanded,
        config,
        temperature=1.0,
        seed=config.seed,
        max_new_tokens=config.pair_max_new_tokens,
    )
    sample_seconds = time.perf_counter() - t0
    rewards = [sentiment_reward(p, s.text) for p, s in zip(expanded, samples, strict=True)]
    complete = [
        stopped_on_eos(s, tokenizer.eos_token_id) or not config.complete_only for s in samples
    ]
    median = sorted(rewards)[len(rewards) // 2]
    rng = random.Random(config.seed + 3)
    train_pairs, eval_pairs, unpaired = [], [], []
    n_train_prompts = len(prompts) - config.n_eval_pair_prompts
    for i, prompt in enumerate(prompts):
        rows = range(i * k, (i + 1) * k)
        scored = {samples[j].text: rewards[j] for j in rows if complete[j]}
        group = [(text, r) for text, r in scored.items() if text.strip()]  # distinct, non-empty
        rng.shuffle(group)
        for (a, ra), (b, rb) in zip(group[0::2], group[1::2], strict=False):
            a_wins = bradley_terry_prefers_first(rng, ra, rb, config.bt_temperature)
            (chosen, rc), (rejected, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
            row = {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_reward": rc,
                "rejected_reward": rr,
            }
            (train_pairs if i < n_train_prompts else eval_pairs).append(row)
        if i < n_train_prompts:
            for text, r in group:
                good = bradley_terry_prefers_first(rng, r, median, config.bt_temperature)
                unpaired.append({"prompt": prompt, "completion": text, "label": good, "reward": r})
    write_jsonl(root / "pairs.jsonl", train_pairs)
    write_jsonl(root / "pairs_eval.jsonl", eval_pairs)
    write_jsonl(root / "unpaired.jsonl", unpaired)
    pairs = train_pairs + eval_pairs
    agree = sum(p["chosen_reward"] > p["rejected_reward"] for p in pairs) / max(1, len(pairs))
    tokens = sum(len(s.response_ids) for s in samples)
    log(
        f"  {len(pairs)} pairs ({agree:.0%} agree with the gold reward), {len(unpaired)} unpaired, "
        f"{len(samples)} samples ({sum(complete)} stopped on EOS) in {sample_seconds:.0f}s"
    )
    brevity = [brevity_reward(p, s.text) for p, s in zip(expanded, samples, strict=True)]
    return {
        "pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "unpaired": len(unpaired),
        "pair_label_agreement": round(agree, 3),
        # stopped on EOS: the only ones paired (every sample without `complete_only`)
        "complete_samples": sum(complete),
        "start_sample_reward": round(sum(rewards) / len(rewards), 4),
        "start_sample_reward_min": round(min(rewards), 4),
        "start_sample_reward_max": round(max(rewards), 4),
        "start_sample_brevity": round(sum(brevity) / len(brevity), 4),
        "samples": len(samples),
        "sample_tokens_per_second": round(tokens / sample_seconds, 1),
        "sample_seconds": round(sample_seconds, 1),
    }


def measure_arith(config: SmolConfig, model, tokenizer, prompts: list[str], log) -> dict:
    """The starting policy's exact-answer rate on the held-out sums, greedy and sampled."""
    figures = {}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        t0 = time.perf_counter()
        samples = sample(
            model, tokenizer, prompts, config, temperature=temperature, seed=config.seed
        )
        right = sum(arith_correct(p, s.text) for p, s in zip(prompts, samples, strict=True))
        figures[f"start_accuracy_{name}"] = round(right / len(prompts), 4)
        figures[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  {name}: {right}/{len(prompts)} exact answers in {figures[f'{name}_seconds']:.0f}s")
    return figures
