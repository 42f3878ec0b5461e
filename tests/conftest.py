"""Shared tiny fixtures: a word-level tokenizer and a tiny Llama saved to disk.

Nothing here touches the network: the tokenizer's vocabulary is written out by hand and models
are built from configs with random weights. Session fixtures are shared by every test, so treat
the objects they return as read-only (``copy.deepcopy`` them before changing anything).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def build_tiny_tokenizer(pad: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
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


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def make_tiny_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """Factory for fresh tokenizers: `make_tiny_tokenizer(pad=False, chat_template=None)`."""
    return build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with pad, eos, bos and a chat template (read-only: shared)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """Directory holding a saved tiny random LlamaForCausalLM (seed 0) and `tiny_tokenizer`."""
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
