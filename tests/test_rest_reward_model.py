"""`prefalign rm train`: a tiny Bradley-Terry reward model beats chance on held-out toy pairs,
and scores through the `Reward` interface ReST filters with."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_for
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefalign.rest.rewards import RewardSpec, load_reward
from prefalign.reward_models import RewardModel
from prefalign.reward_models.cli import run_rm_train_cli
from prefalign.toy import corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def toy_words() -> list[str]:
    return corpus.grammar_words()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *toy_words()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Review openings; chosen continues with a positive clause, rejected with a negative one."""
    rng = random.Random(seed)
    return [
        {
            "prompt": corpus.review(rng)[0],
            "chosen": " " + corpus.review_clause(rng, "pos") + " .",
            "rejected": " " + corpus.review_clause(rng, "neg") + " .",
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def rm_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm")
    tokenizer = word_tokenizer()
    tiny_llama_for(tokenizer, num_key_value_heads=4).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    for name, n, seed in (("pairs.jsonl", 192, 0), ("pairs_eval.jsonl", 64, 1)):
        (root / name).write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(n, seed)))
    return {"root": root, "policy": root / "policy"}


def test_reward_model_beats_chance_on_held_out_toy_pairs(rm_setup, capsys):
    root = rm_setup["root"]
    args = argparse.Namespace(
        config=None,
        resume=False,
        overrides=[
            f"model.name_or_path={rm_setup['policy']}",
            f"data.path={root / 'pairs.jsonl'}",
            f"data.eval_path={root / 'pairs_eval.jsonl'}",
            f"trainer.out_dir={root / 'rm'}",
            "trainer.batch_size=16",
            "trainer.max_steps=12",
            "trainer.lr=3e-3",
            "trainer.progress=false",
            "trainer.log_every=4",
        ],
    )
    assert run_rm_train_cli(args) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") :])
    assert printed["model"] == str(root / "rm" / "final")
    metrics = json.loads((root / "rm" / "rm_metrics.json").read_text())
    assert metrics["n_eval_pairs"] == 64
    # Chance is 0.5 (+-0.06 for 64 pairs); the positive/negative words make this easy to learn.
    assert metrics["held_out_pair_accuracy"] >= 0.8, metrics
    assert printed["held_out_pair_accuracy"] == pytest.approx(
        metrics["held_out_pair_accuracy"], abs=1e-4
    )

    # the run dir works as well as final/
    reward = load_reward(RewardSpec(kind="model", model_path=str(root / "rm")))
    assert isinstance(reward, RewardModel)
    prompts = [p["prompt"] for p in toy_pairs(32, 2)]
    good = reward.score(prompts, [" the plot was wonderful and brilliant ."] * 32)
    bad = reward.score(prompts, [" the plot was dreadful and boring ."] * 32)
    assert sum(g > b for g, b in zip(good, bad, strict=True)) >= 24


def test_untrained_reward_model_is_near_chance(rm_setup, tmp_path):
    """The accuracy above is learned, not an artefact of the pair layout."""
    from prefalign.data import load_preference_data, tokenize_preference
    from prefalign.modeling import load_tokenizer
    from prefalign.reward_models.train import build_reward_model, pair_accuracy

    tokenizer = load_tokenizer(rm_setup["policy"])
    model = build_reward_model(rm_setup["policy"], tokenizer.pad_token_id)
    records = load_preference_data(rm_setup["root"] / "pairs_eval.jsonl").records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=64, max_prompt_length=32)
    accuracy, _ = pair_accuracy(model, pairs, tokenizer.pad_token_id)
    assert 0.2 <= accuracy <= 0.8


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="reward.model_path"):
        load_reward(RewardSpec(kind="model"))
    with pytest.raises(ValueError, match="holds no model"):
        load_reward(RewardSpec(kind="model", model_path=str(tmp_path)))


def test_reward_model_training_resumes_bit_exactly(rm_setup, tmp_path, capsys):
    # The checkpoint holds the classifier as save_pretrained writes it (no "classifier." prefix):
    # resume must find every trained weight there.
    from safetensors.torch import load_file

    root = rm_setup["root"]

    def rm_train(out: Path, steps: int, resume: bool) -> None:
        args = argparse.Namespace(
            config=None,
            resume=resume,
            overrides=[
                f"model.name_or_path={rm_setup['policy']}",
                f"data.path={root / 'pairs.jsonl'}",
                f"trainer.out_dir={out}",
                "trainer.batch_size=16",
                f"trainer.max_steps={steps}",
                "trainer.lr=3e-3",
                "trainer.schedule=constant",
                "trainer.save_every=2",
                "trainer.progress=false",
            ],
        )
        assert run_rm_train_cli(args) == 0

    rm_train(tmp_path / "straight", 4, False)
    rm_train(tmp_path / "resumed", 2, False)
    rm_train(tmp_path / "resumed", 4, True)
    assert "resumed from" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
