"""One reading of a sequence reward model: every path that scores a sequence (RM training, ReST
scoring, ARGS's per-prefix reader, best-of-N) reads the head at the sequence's last attended
position, whether the tokenizer's pad token is its own or its EOS (GPT-2, Llama, SmolLM)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, VOCAB, VOCAB_SIZE, build_tiny_tokenizer, tiny_llama_config
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
)

from prefalign.data import PromptCompletionRecord, tokenize_sft
from prefalign.genarm.reward_model import load_reward_model
from prefalign.logprobs import collate_prompt_response
from prefalign.rest.reward_model import RewardModel, rewards_of

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

PROMPTS = ["the movie was", "two plus two equals", "i"]
RESPONSES = ["very good .", "four", "was not ok and the story was awful ."]


def tiny_classifier(arch: str, pad_id: int):
    if arch == "llama":
        return LlamaForSequenceClassification(tiny_llama_config(num_labels=1, pad_token_id=pad_id))
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        num_labels=1,
        bos_token_id=VOCAB.index("<s>"),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=pad_id,
    )
    return GPT2ForSequenceClassification(config)


@pytest.fixture(
    scope="module",
    params=[(a, p) for a in ("llama", "gpt2") for p in ("pad_is_eos", "pad_is_its_own")],
    ids=lambda param: "-".join(param),
)
def saved_rm(request, tmp_path_factory):
    """A random one-label classifier saved with a tokenizer whose pad is EOS or its own."""
    arch, pad = request.param
    pad_is_eos = pad == "pad_is_eos"
    out = tmp_path_factory.mktemp(f"{arch}_{pad}")
    tokenizer = build_tiny_tokenizer(pad=not pad_is_eos)  # no pad: load_tokenizer pads with EOS
    pad_id = VOCAB.index(EOS) if pad_is_eos else VOCAB.index("<pad>")
    torch.manual_seed(3)
    tiny_classifier(arch, pad_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def one_row_rewards(path, prompt_ids, response_ids) -> list[float]:
    """Each sequence alone, unpadded: the head's output at its last token."""
    classifier = AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = torch.tensor([list(p) + list(r)])
        hidden = classifier.base_model(input_ids=ids).last_hidden_state
        out.append(float(classifier.score(hidden[0, -1])))
    return out


@torch.no_grad()
def test_every_reader_reads_the_last_attended_position(saved_rm):
    scorer = RewardModel.from_pretrained(saved_rm)  # ReST's scorer, through load_tokenizer
    tok = scorer.tokenizer
    assert (tok.pad_token_id == tok.eos_token_id) == ("pad_is_eos" in saved_rm.name)
    records = [
        PromptCompletionRecord(p, " " + r, "<test>", i)
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))
    ]
    rows, _ = tokenize_sft(records, tok, max_length=None, max_prompt_length=None)
    prompt_ids, response_ids = [e.prompt_ids for e in rows], [e.completion_ids for e in rows]
    assert all(r[-1] == tok.eos_token_id for r in response_ids)
    expected = torch.tensor(one_row_rewards(saved_rm, prompt_ids, response_ids))

    # ReST scoring of texts (rows of different lengths, so the shorter ones are padded).
    torch.testing.assert_close(
        torch.tensor(scorer.score(PROMPTS, [" " + r for r in RESPONSES])), expected
    )
    # RM training's reader of a padded batch.
    batch = collate_prompt_response(prompt_ids, response_ids, tok.pad_token_id)
    classifier = AutoModelForSequenceClassification.from_pretrained(saved_rm)
    torch.testing.assert_close(rewards_of(classifier, batch), expected)
    # ARGS / best-of-N's reader.
    per_prefix = load_reward_model(saved_rm)
    torch.testing.assert_close(
        per_prefix.score(prompt_ids, response_ids, tok.pad_token_id), expected
    )


def test_old_import_paths_are_the_one_reader():
    from prefalign import reward_models
    from prefalign.genarm import reward_model as genarm_rm
    from prefalign.rest import reward_model as rest_rm

    assert genarm_rm.SequenceRewardModel is reward_models.SequenceRewardModel
    assert genarm_rm.last_rewards is reward_models.sequence_rewards
    assert rest_rm.RewardModel is reward_models.RewardModel
    assert rest_rm.train_reward_model is reward_models.train_reward_model


def test_last_attended_handles_left_and_right_padding():
    from prefalign.reward_models import last_attended

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_attended(mask).tolist() == [2, 4, 4]
