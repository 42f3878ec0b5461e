"""ARM training with the preference trainer, its held-out pair accuracy, brevity relabelling,
and the two command-line functions (called directly)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from conftest import save_tiny_review_model

from prefalign.config import ConfigError, load_config
from prefalign.errors import UserError
from prefalign.genarm import Arm, guided_generate, load_arm
from prefalign.genarm.arm import (
    ArmConfig,
    arm_beta,
    arm_pair_accuracy,
    check_arm_config,
    concise_pairs,
    first_clause,
    rerank_pairs,
    train_arm,
)
from prefalign.genarm.cli import read_prompts, run_arm_train_cli, run_generate_cli
from prefalign.generation import SamplingParams
from prefalign.modeling import load_model, load_tokenizer
from prefalign.toy.corpus import FILMS, review, review_clause
from prefalign.toy.rewards import brevity_reward


def sentiment_pairs(rng: random.Random, n: int) -> list[dict]:
    """Twin reviews that differ only in tone: the same grammar choices with positive words
    (chosen) or negative words (rejected), so length cannot explain a ranking."""
    rows = []
    for _ in range(n):
        prompt = f"i watched {rng.choice(FILMS)}"
        seed = rng.random()
        chosen, rejected = (
            " " + review_clause(random.Random(seed), tone) + " ." for tone in ("pos", "neg")
        )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genarm_toy")
    rng = random.Random(0)
    save_tiny_review_model(root / "model", rng)
    return {
        "root": root,
        "model": root / "model",
        "pairs": write_jsonl(root / "pairs.jsonl", sentiment_pairs(rng, 160)),
        "eval": write_jsonl(root / "pairs_eval.jsonl", sentiment_pairs(rng, 96)),
    }


def arm_overrides(toy, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={toy['model']}",
        f"data.path={toy['pairs']}",
        f"data.eval_path={toy['eval']}",
        f"trainer.out_dir={out}",
        "trainer.batch_size=16",
        "trainer.max_steps=20",
        "trainer.lr=1e-2",
        "trainer.schedule=constant",
        "trainer.progress=false",
        "trainer.log_every=10",
        *extra,
    ]


def test_arm_config_defaults_to_genarm_without_reference():
    config = load_config(ArmConfig, None, ["model.name_or_path=m", "data.path=p"])
    assert (config.objective.name, config.reference.mode) == ("genarm", "none")
    check_arm_config(config)
    with pytest.raises(ValueError, match="objective.name"):
        check_arm_config(load_config(ArmConfig, None, ["objective.name=dpo"]))
    with pytest.raises(ValueError, match="reference.mode"):
        check_arm_config(load_config(ArmConfig, None, ["reference.mode=frozen"]))
    with pytest.raises(ConfigError, match="objective.nme"):
        load_config(ArmConfig, None, ["objective.nme=genarm"])


def test_trained_arm_ranks_held_out_pairs_above_chance(toy, tmp_path):
    result = train_arm(
        load_config(ArmConfig, None, arm_overrides(toy, tmp_path / "arm")), log=lambda *_: None
    )
    assert result.model_path.is_dir() and result.train.steps == 20
    assert result.initial_pair_accuracy is not None
    # 96 held-out pairs: chance is 0.5 with a standard error of about 0.05.
    assert result.pair_accuracy >= 0.65, result
    assert result.pair_accuracy > result.initial_pair_accuracy + 0.1, result
    # The same figure from the public function, with the ARM's beta_r (any positive beta agrees).
    arm, tokenizer = load_model(result.model_path), load_tokenizer(result.model_path)
    assert arm_pair_accuracy(arm, tokenizer, toy["eval"], beta_r=0.5) == pytest.approx(
        result.pair_accuracy
    )


def test_rerank_pairs_by_brevity(tmp_path):
    rng = random.Random(1)
    rows = [
        {"prompt": p, "chosen": a, "rejected": review(rng)[1]}
        for p, a in (review(rng) for _ in range(160))
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    stats = rerank_pairs(src, tmp_path / "brevity.jsonl", brevity_reward, temperature=0.05, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "brevity.jsonl").read_text().splitlines()]
    assert stats["pairs"] == len(rows) > 100
    shorter = sum(len(r["chosen"].split()) < len(r["rejected"].split()) for r in rows) / len(rows)
    assert shorter == pytest.approx(stats["label_agreement"]) and shorter > 0.7


def test_concise_pairs_share_their_start(tmp_path):
    assert first_clause(" quite poor , i liked the pacing .") == " quite poor ."
    assert first_clause(" is fast and fun .") == " is fast ."
    assert first_clause(" film .") is None
    rows = [
        {
            "prompt": "the film",
            "chosen": " was great , i loved the music .",
            "rejected": " was bad .",
        }
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows * 20)
    stats = concise_pairs(src, tmp_path / "concise.jsonl", brevity_reward, temperature=0.01, seed=0)
    out = [json.loads(line) for line in (tmp_path / "concise.jsonl").read_text().splitlines()]
    # One candidate per row (" was bad ." has a single clause); a near-noiseless labeller keeps
    # the short one.
    assert stats == {"pairs": 20, "label_agreement": 1.0}
    assert {(r["chosen"], r["rejected"]) for r in out} == {
        (" was great .", " was great , i loved the music .")
    }


def test_arm_train_cli_with_lora(toy, tmp_path, capsys):
    """`prefalign arm train` with a LoRA ARM; the saved adapter then guides the base."""
    config = tmp_path / "arm.yaml"
    config.write_text(
        f"model:\n  name_or_path: {toy['model']}\n  lora: {{r: 4}}\ndata:\n  path: {toy['pairs']}\n"
    )
    out = tmp_path / "cli_arm"
    overrides = [
        f"trainer.out_dir={out}",
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "trainer.lr=1e-2",
        "trainer.progress=false",
    ]
    assert (
        run_arm_train_cli(argparse.Namespace(config=str(config), overrides=overrides, resume=False))
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 2 and printed["pair_accuracy"] is None
    final = Path(printed["final"])
    assert (final / "adapter_config.json").is_file()
    arm = load_arm(final, alpha=1.0)
    base, tokenizer = load_model(toy["model"]).eval(), load_tokenizer(toy["model"])
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    # The adapter changed the ARM, so at a large weight the guided text differs from the base's.
    plain = guided_generate(base, [], tokenizer, ["i watched the movie"] * 2, params)
    guided = guided_generate(
        base, [Arm(arm.model, 50.0, arm.tokenizer)], tokenizer, ["i watched the movie"] * 2, params
    )
    assert [g.response_ids for g in plain] != [g.response_ids for g in guided]


def generate_args(toy, tmp_path: Path, prompts: Path, **kw) -> argparse.Namespace:
    values = dict(
        model=str(toy["model"]),
        arm=[str(toy["model"])],
        alpha=[0.5],
        prompts=str(prompts),
        out=str(tmp_path / "out.jsonl"),
        max_new_tokens=6,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        batch_size=2,
    )
    values.update(kw)
    return argparse.Namespace(**values)


def test_generate_cli(toy, tmp_path):
    jsonl = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "the movie was"}, {"prompt": "i loved"}, {"prompt": "this film"}],
    )
    text = tmp_path / "prompts.txt"
    text.write_text("the movie was\ni loved\n\nthis film\n")
    assert read_prompts(jsonl) == read_prompts(text) == ["the movie was", "i loved", "this film"]
    assert run_generate_cli(generate_args(toy, tmp_path, jsonl)) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == read_prompts(jsonl) and all(
        isinstance(r["response"], str) for r in rows
    )
    # No --arm: plain greedy decoding of the base; with an ARM of weight 0, the very same text.
    run_generate_cli(
        generate_args(toy, tmp_path, text, arm=[], alpha=[], out=str(tmp_path / "plain.jsonl"))
    )
    run_generate_cli(
        generate_args(toy, tmp_path, text, alpha=[0.0], out=str(tmp_path / "zero.jsonl"))
    )
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "zero.jsonl").read_text()


def test_generate_cli_errors(toy, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the movie"}])
    with pytest.raises(ValueError, match="one --alpha per --arm"):
        run_generate_cli(generate_args(toy, tmp_path, prompts, alpha=[1.0, 2.0]))
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        run_generate_cli(generate_args(toy, tmp_path, tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        run_generate_cli(generate_args(toy, tmp_path, bad))
    with pytest.raises(ValueError, match="top-p"):
        run_generate_cli(generate_args(toy, tmp_path, prompts, top_p=0.0))


def test_arm_trains_a_user_objective_at_its_own_scale(toy, tmp_path):
    """`objective.code` is an ARM objective (no reference); its `beta_r` default is its scale."""
    code = tmp_path / "arm_loss.py"
    code.write_text(
        "import torch.nn.functional as F\n\n"
        "def arm_sharp(pc, pr, rc, rr, beta_r=0.5):\n"
        "    return -F.logsigmoid(beta_r * (pc - pr))\n"
    )
    user = f"objective.code={code}:arm_sharp"
    overrides = arm_overrides(toy, tmp_path / "arm", user, "trainer.max_steps=4")
    config = load_config(ArmConfig, None, overrides)
    assert arm_beta(config) == 0.5
    result = train_arm(config, log=lambda *_: None)
    assert result.train.steps == 4 and result.pair_accuracy is not None


def test_arm_train_from_the_cli_reads_its_config_once(toy, tmp_path, capsys):
    """The CLI loads a config command's file once and hands the config to the command (it used
    to parse it again after training, to find where to write the report)."""
    import sys

    from prefalign.cli import main

    config = tmp_path / "arm.yaml"
    config.write_text(f"model:\n  name_or_path: {toy['model']}\ndata:\n  path: {toy['pairs']}\n")
    reads = []
    watching = [True]

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and str(args[0]) == str(config):
            reads.append(args[1])

    sys.addaudithook(audit)  # hooks cannot be removed: `watching` switches this one off
    try:
        code = main(
            [
                "arm",
                "train",
                "--config",
                str(config),
                f"trainer.out_dir={tmp_path / 'arm'}",
                "trainer.max_steps=1",
                "trainer.batch_size=4",
                "trainer.progress=false",
            ]
        )
    finally:
        watching[0] = False
    assert code == 0 and (tmp_path / "arm" / "report.html").is_file()
    assert len(reads) == 1, reads
