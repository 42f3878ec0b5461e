"""Shared tiny fixtures: a word-level tokenizer, a tiny Llama saved to disk, miniature toy worlds.

Nothing here touches the network: the tokenizer's vocabulary is written out by hand and models
are built from configs with random weights. Session fixtures are shared by every test, so treat
the objects they return as read-only (``copy.deepcopy`` them before changing anything).
"""

from __future__ import annotations

import json
import random
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from prefalign.toy.corpus import review, review_pairs
from prefalign.toy.tokenizer import train_tokenizer
from prefalign.toy.world import ToyConfig, ToyModelSize, ToyWorld, get_world

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
WORDS = (
    "the a an one two three four five six seven eight nine ten zero plus minus equals is "
    "good bad great awful movie film book story i you we they it was were and or not very "
    "really so what how why who hello hi yes no ok answer question ? . , ! :"
).split()
VOCAB = SPECIAL_TOKENS + ROLE_TOKENS + WORDS
# The tiny models' vocabulary; equal to the tokenizer's, so every id has an embedding row.
VOCAB_SIZE = len(VOCAB)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(
    pad: bool = True, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `VOCAB` with BOS/EOS (and optionally a pad token)."""
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD if pad else None,
        additional_special_tokens=ROLE_TOKENS,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def trained_word_tokenizer(
    corpus: list[str], bos: bool = True, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on `corpus` (one token per word, so expected token counts
    are easy to read), pad/unk/BOS/EOS ids 0-3, BOS prepended unless `bos` is false."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    if chat_template:
        fast.chat_template = chat_template
    return fast


# The tiny test models' sizes, shared by the Llama and Qwen2 builders.
TINY_DIMS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        **TINY_DIMS,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(out: Path, tokenizer: Any, **overrides) -> Path:
    """A tiny random Llama sized to `tokenizer` (its vocabulary and special ids), saved with it
    in `out`; `overrides` go to its config."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    """Biased q/k/v projections and grouped-query attention, at the tiny Llama's sizes."""
    kwargs = dict(vocab_size=VOCAB_SIZE, **TINY_DIMS)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """Learned positions, tied embeddings, Conv1D layers; no dropout, so two passes agree."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, **overrides) -> GPT2LMHeadModel:
    """A tiny random GPT-2 (lm_head tied to wte) built after `torch.manual_seed(seed)`, with
    `dropout` on residuals, embeddings and attention; `overrides`: GPT2Config fields."""
    torch.manual_seed(seed)
    drops = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(tiny_gpt2_config(**{**drops, **overrides}))


@pytest.fixture(scope="session")
def make_tiny_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """Factory for fresh tokenizers: `make_tiny_tokenizer(pad=False, chat_template=None)`."""
    return build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with pad, eos, bos and a chat template (read-only: shared)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> Path:
    """Directory holding a saved tiny random LlamaForCausalLM (seed 0) and `tiny_tokenizer`."""
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


# A miniature toy world (a 40k-parameter policy, seconds to build) for end-to-end demo tests.
MINI_WORLD = dict(
    model=ToyModelSize(hidden_size=32, layers=2, heads=4, intermediate_size=64),
    corpus_size=800,
    pretrain_steps=8,
    sft_steps=4,
    batch_size=16,
    n_pair_prompts=48,
    samples_per_prompt=2,
    n_eval_pairs=16,
    n_train_prompts=16,
    n_eval_prompts=8,
    max_new_tokens=8,
)
# Long enough that the sentiment policy writes multi-clause reviews: the genarm row's brevity ARM
# learns from responses against their own first clause (26 such pairs, 3.5 s of build).
MINI_WORLD_STEPS = {"sentiment": dict(pretrain_steps=150, sft_steps=30), "arith": {}}


@pytest.fixture(scope="session")
def mini_worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ToyWorld]:
    """Both toy tasks as miniature worlds, built once per session (read-only: shared)."""
    root = tmp_path_factory.mktemp("mini_worlds")
    return {
        task: get_world(
            task,
            replace(ToyConfig.for_task(task), **{**MINI_WORLD, **MINI_WORLD_STEPS[task]}),
            out=root / task,
            log=lambda *_: None,
        )
        for task in ("sentiment", "arith")
    }


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine its spin-waits
    cost several times the work; restores the setting for the other modules. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_review_model(
    out: Path, rng: random.Random, n_texts: int = 400, vocab_size: int = 300
) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on `n_texts` toy reviews drawn
    from `rng` (which the caller goes on using for its data), saved in `out`."""
    tokenizer = train_tokenizer(
        ["".join(review(rng)) for _ in range(n_texts)], vocab_size=vocab_size
    )
    tiny_llama_for(tokenizer, num_key_value_heads=4, max_position_embeddings=128).save_pretrained(
        out
    )
    tokenizer.save_pretrained(out)
    return out


def save_tiny_review_world(root: Path, n_pairs: int) -> dict[str, Path]:
    """`save_tiny_review_model` (seed 0) in root/model and `n_pairs` toy review preference pairs
    (two different reviews of one prompt) in root/pairs.jsonl."""
    rng = random.Random(0)
    save_tiny_review_model(root / "model", rng)
    pairs = review_pairs(rng, n_pairs)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"model": root / "model", "pairs": root / "pairs.jsonl"}


def tiny_llama_for(tokenizer: Any, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama (seed 0) sized to `tokenizer`'s vocabulary, eos and pad ids."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            **TINY_DIMS,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    return LlamaForCausalLM(config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """The command prefix that starts `processes` local processes under torchrun (a free port:
    tests may run side by side); append `-m module` or a script and its arguments."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
    ]
