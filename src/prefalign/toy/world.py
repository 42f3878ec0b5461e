"""The embedded toy world: corpus, tokenizer, a small Llama pretrained + SFT'd here, and its data.

`build_world(task)` makes everything a method needs, once, and caches it in a directory keyed by
the config (and the world's format version), so the demo, tests and benchmarks reuse it:

    policy/              the SFT policy and tokenizer (save_pretrained; loads with load_model)
    sft.jsonl            the supervised corpus (prompt, completion)
    pairs.jsonl          preference pairs from SFT samples, ranked by gold reward with BT noise
    pairs_eval.jsonl     held-out pairs on held-out prompts (pair accuracy of policies and RMs)
    unpaired.jsonl       KTO data (prompt, completion, label) from the same scores
    prompts_train.jsonl  prompts for online methods (ReST grows on these)
    prompts_eval.jsonl   held-out prompts for evaluation, disjoint from every prompt above
    world.json           the config and the measured figures of the build
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from prefalign.io import cache_root, read_prompts, write_jsonl
from prefalign.toy.corpus import (
    ArithSpec,
    arith_prompt,
    noisy_answer,
    review,
    split_arith,
    split_openings,
)
from prefalign.toy.determinism import deterministic_build
from prefalign.toy.rewards import arith_correct, gold_reward_fn
from prefalign.toy.tokenizer import train_tokenizer

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# 2: disjoint train/eval prompts (a larger opening space), deterministic builds.
WORLD_VERSION = 2
TASKS = ("sentiment", "arith")


@dataclass
class ToyModelSize:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384


@dataclass
class ToyConfig:
    task: Literal["sentiment", "arith"] = "sentiment"
    seed: int = 0
    model: ToyModelSize = field(default_factory=ToyModelSize)
    corpus_size: int = 16000
    vocab_size: int = 1024
    pretrain_steps: int = 300  # language modelling on whole texts
    sft_steps: int = 100  # then loss on completions only
    batch_size: int = 64
    lr: float = 1e-3  # 3e-3 stalls this model on arithmetic; 1e-3 learns the table
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    n_pair_prompts: int = 512  # prompts sampled to build preference pairs
    samples_per_prompt: int = 4
    n_eval_pairs: int = 128
    n_train_prompts: int = 256
    n_eval_prompts: int = 128
    bt_temperature: float = 0.15  # Bradley-Terry noise of the simulated labeller, in reward units
    max_new_tokens: int = 24
    arith: ArithSpec = field(default_factory=ArithSpec)

    @classmethod
    def for_task(cls, task: str) -> ToyConfig:
        """Defaults tuned per task: arithmetic texts are short, so it takes more, cheaper steps."""
        if task == "arith":
            # Arithmetic is learnt after a plateau (loss ~1.0 per token until step ~400): 300 steps
            # left the policy right 7% of the time, 600 with a cosine decay 51%, measured.
            return cls(
                task="arith",
                pretrain_steps=50,
                sft_steps=600,
                batch_size=128,
                lr=1e-3,
                max_new_tokens=6,
            )
        return cls(task=task)


def config_key(config: ToyConfig) -> str:
    fields = asdict(config)
    if config.task != "arith":
        fields.pop("arith")  # arithmetic settings do not change the other worlds
    blob = json.dumps({"version": WORLD_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class ToyWorld:
    task: str
    root: Path

    @property
    def policy_path(self) -> Path:
        return self.root / "policy"

    def file(self, name: str) -> Path:
        return self.root / name

    def info(self) -> dict:
        return json.loads((self.root / "world.json").read_text())

    def prompts(self, split: Literal["train", "eval"]) -> list[str]:
        return read_prompts(self.file(f"prompts_{split}.jsonl"))


def world_dir(config: ToyConfig) -> Path:
    return cache_root() / "toy" / f"{config.task}-{config_key(config)}"


def get_world(
    task: str = "sentiment",
    config: ToyConfig | None = None,
    out: str | Path | None = None,
    log=print,
) -> ToyWorld:
    """The cached world for this config, built first if missing (or if `out` is given and empty)."""
    config = config or ToyConfig.for_task(task)
    root = Path(out) if out else world_dir(config)
    if (root / "world.json").exists():
        return ToyWorld(config.task, root)
    return build_world(config, root, log=log)


@dataclass
class ToyCorpus:
    """The texts of a world. Training and evaluation prompts never meet: the supervised
    examples, the preference pairs and the training prompts come from one part of the prompt
    space (review openings, or sums), the evaluation prompts and held-out pairs from the other."""

    examples: list[tuple[str, str]]  # supervised (prompt, completion); pairs are sampled on these
    train_prompts: list[str]  # prompts for online methods (ReST grows on these)
    eval_prompts: list[str]  # distinct held-out prompts
    eval_pair_prompts: list[str]  # prompts of the held-out pairs, from the held-out part


def corpus(config: ToyConfig) -> ToyCorpus:
    rng = random.Random(config.seed)
    eval_rng = random.Random(config.seed + 1)
    if config.task == "sentiment":
        train_openings, eval_openings = split_openings(config.seed)
        examples = [review(rng, train_openings) for _ in range(config.corpus_size)]
        train = [review(rng, train_openings)[0] for _ in range(config.n_train_prompts)]
        if config.n_eval_prompts > len(eval_openings):
            raise ValueError(
                f"n_eval_prompts={config.n_eval_prompts} exceeds the "
                f"{len(eval_openings)} held-out openings"
            )
        held_out = eval_rng.sample(eval_openings, config.n_eval_prompts)
    else:
        train_problems, eval_problems = split_arith(
            config.arith, config.seed, config.n_eval_prompts
        )
        examples = []
        for _ in range(config.corpus_size):
            a, b = rng.choice(train_problems)
            examples.append(
                (arith_prompt(a, b), noisy_answer(rng, a, b, config.arith.teacher_error_rate))
            )
        k = min(config.n_train_prompts, len(train_problems))
        train = [arith_prompt(a, b) for a, b in rng.sample(train_problems, k)]
        held_out = [arith_prompt(a, b) for a, b in eval_problems]
    pair_prompts = [held_out[i % len(held_out)] for i in range(config.n_eval_pairs)]
    return ToyCorpus(examples, train, held_out, pair_prompts)


def tokenizer_corpus(seed: int) -> list[str]:
    """The tokenizer is trained on both tasks so every toy model shares one vocabulary."""
    rng = random.Random(seed)
    reviews = ["".join(review(rng)) for _ in range(8000)]
    sums = [f"{a}+{b}={a + b}" for a in range(0, 1000, 7) for b in range(0, 1000, 11)]
    return reviews + sums


def make_model(config: ToyConfig, vocab_size: int, eos_id: int, pad_id: int) -> LlamaForCausalLM:
    size = config.model
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def build_world(config: ToyConfig, root: Path, log=print) -> ToyWorld:
    """Build the world in `root`: the same files and weights on one machine whatever its load."""
    with deterministic_build():
        return _build_world(config, root, log)


def _build_world(config: ToyConfig, root: Path, log) -> ToyWorld:
    from prefalign.training.loop import TrainerConfig
    from prefalign.training.sft import train_sft

    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    log(f"building the toy world '{config.task}' in {root}")
    texts = corpus(config)
    examples, train_prompts, eval_prompts = texts.examples, texts.train_prompts, texts.eval_prompts
    tokenizer = train_tokenizer(tokenizer_corpus(config.seed), vocab_size=config.vocab_size)
    eos = tokenizer.eos_token_id
    prompt_ids = [tokenizer(p)["input_ids"] for p, _ in examples]
    response_ids = [tokenizer(c)["input_ids"] + [eos] for _, c in examples]
    write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in examples])
    write_jsonl(root / "prompts_train.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(root / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])

    model = make_model(config, len(tokenizer), eos, tokenizer.pad_token_id)
    stages = (("pretrain", config.pretrain_steps, True), ("sft", config.sft_steps, False))
    for name, steps, on_prompt in stages:
        trainer_config = TrainerConfig(
            out_dir=str(root / "runs" / name),
            batch_size=config.batch_size,
            max_steps=steps,
            lr=config.lr,
            warmup_ratio=0.05,
            schedule=config.schedule,
            seed=config.seed,
            log_every=50,
            progress=False,
        )
        result = train_sft(
            model, tokenizer, prompt_ids, response_ids, trainer_config, loss_on_prompt=on_prompt
        )
        log(
            f"  {name}: {steps} steps, loss {result.history[-1]['loss']:.3f}, {result.seconds:.0f}s"
        )
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")

    figures = build_preference_data(config, root, model, tokenizer, texts, log)
    figures["build_seconds"] = round(time.perf_counter() - started, 1)
    figures["parameters"] = sum(p.numel() for p in model.parameters())
    (root / "world.json").write_text(
        json.dumps({"config": asdict(config), "figures": figures}, indent=2)
    )
    log(f"  built in {figures['build_seconds']:.0f}s: {json.dumps(figures)}")
    return ToyWorld(config.task, root)


def build_preference_data(
    config: ToyConfig, root: Path, model, tokenizer, texts: ToyCorpus, log
) -> dict:
    """Sample the SFT policy, score with the gold reward, label pairs like a noisy human would."""
    from prefalign.generation import SamplingParams, generate

    rng = random.Random(config.seed + 2)
    reward = gold_reward_fn(config.task)
    # Training pairs on training prompts; held-out pairs on held-out prompts.
    train_pool = [p for p, _ in texts.examples[: config.n_pair_prompts]]
    pool = train_pool + texts.eval_pair_prompts
    params = SamplingParams(
        max_new_tokens=config.max_new_tokens, temperature=1.0, seed=config.seed, batch_size=256
    )
    prompts = [p for p in pool for _ in range(config.samples_per_prompt)]
    samples = generate(model, tokenizer, prompts, params)
    by_prompt: dict[int, list[tuple[str, float]]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(i // config.samples_per_prompt, []).append(
            (s.text, reward(prompts[i], s.text))
        )
    train_pairs, eval_pairs, unpaired = [], [], []
    scores = [r for group in by_prompt.values() for _, r in group]
    median = sorted(scores)[len(scores) // 2]
    for k, group in by_prompt.items():
        prompt = pool[k]
        distinct = list({text: r for text, r in group if text.strip()}.items())
        if len(distinct) >= 2:
            (a, ra), (b, rb) = rng.sample(distinct, 2)
            # Bradley-Terry labeller: prefers a with probability sigmoid((ra - rb) / T).
            a_wins = rng.random() < 1 / (1 + math.exp(-(ra - rb) / config.bt_temperature))
            (chosen, rc), (rejected, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
            row = {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_reward": rc,
                "rejected_reward": rr,
            }
            (eval_pairs if k >= len(train_pool) else train_pairs).append(row)
        for text, r in (
            group[:2] if k < len(train_pool) else ()
        ):  # KTO trains: training prompts only
            if text.strip():
                good = rng.random() < 1 / (1 + math.exp(-(r - median) / config.bt_temperature))
                unpaired.append({"prompt": prompt, "completion": text, "label": good, "reward": r})
    pairs = train_pairs + eval_pairs
    extra = {}
    if config.task == "arith":  # the SFT policy's exact-answer rate, sampling at temperature 1
        extra["sft_sample_accuracy"] = round(
            sum(arith_correct(p, s.text) for p, s in zip(prompts, samples, strict=True))
            / len(samples),
            4,
        )
    write_jsonl(root / "pairs.jsonl", train_pairs)
    write_jsonl(root / "pairs_eval.jsonl", eval_pairs)
    write_jsonl(root / "unpaired.jsonl", unpaired)
    agree = sum(p["chosen_reward"] > p["rejected_reward"] for p in pairs) / max(1, len(pairs))
    log(
        f"  {len(pairs)} pairs ({agree:.0%} agree with the gold reward), "
        f"{len(unpaired)} unpaired examples"
    )
    return {
        "pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "unpaired": len(unpaired),
        "pair_label_agreement": round(agree, 3),
        "sft_sample_reward": round(sum(scores) / len(scores), 4),
        **extra,
    }
