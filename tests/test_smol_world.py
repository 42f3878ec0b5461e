"""The SmolLM2 world's content (prompts, rewards, pairs, tasks), built on a tiny GGUF model.

The real SmolLM2 runs in the slow test (test_smol_real.py); here the same build runs end to end
on a tiny random Llama written as a GGUF file, so every step but the model's quality is real.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from gguf_files import byte_level_bpe, tiny, write_gguf

from prefalign.smol import prompts as grammar
from prefalign.smol.rewards import arith_correct, arith_reward, brevity_reward, final_number
from prefalign.smol.world import SmolConfig, get_smol_world
from prefalign.tasks import resolve_task
from prefalign.training.precision import cpu_weights_dtype


def test_train_and_eval_films_are_disjoint():
    train, held_out = grammar.split_titles(seed=0, n_eval=48)
    assert len(held_out) == 48 and not set(train) & set(held_out)
    requests = grammar.review_requests(held_out, 32, seed=2)
    assert len(set(requests)) == 32
    assert all(any(f'"{t}"' in r for t in held_out) for r in requests)
    assert not any(f'"{t}"' in r for t in train for r in requests)


def test_arith_problems_are_disjoint_and_checked():
    train, held_out = grammar.arith_problems(2, 40, n_train=64, n_eval=32, seed=0)
    assert not set(train) & set(held_out) and len(set(train)) == 64
    prompt = "<|im_start|>user\nWhat is 23 + 45?<|im_end|>\n<|im_start|>assistant\n"
    assert final_number("23 + 45 = 68. So the answer is 68.") == 68
    assert final_number("The sum is 1,068") == 1068 and final_number("no idea") is None
    assert arith_correct(prompt, "23 + 45 = 68") and arith_reward(prompt, "68!") == 1.0
    assert arith_reward(prompt, "It is 68 or maybe 69") == 0.0  # the last number is the answer
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        arith_correct("Write a review", "5")


def test_brevity_conflicts_with_length():
    assert brevity_reward("", "") == 1.0
    assert brevity_reward("", "great " * 30) == pytest.approx(0.5)
    assert brevity_reward("", "great " * 90) == 0.0


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    bpe = byte_level_bpe()
    model = tiny("llama", bpe.get_vocab_size(), max_positions=256)
    return write_gguf(model, bpe, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def mini(task: str, model: str) -> SmolConfig:
    return SmolConfig(
        task=task,
        model=model,
        dtype="float32",
        n_train_prompts=6,
        n_eval_prompts=4,
        n_pair_prompts=6,
        n_eval_pair_prompts=2,
        max_new_tokens=8,
        pair_max_new_tokens=8,
        complete_only=False,  # the tiny random model seldom samples EOS: pair every reply
        batch_size=8,
    )


def test_sentiment_world_builds_pairs_from_the_models_own_samples(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    config = mini("sentiment", f"gguf:{tiny_gguf}")
    world = get_smol_world(config=config, log=lambda *_: None)
    assert get_smol_world(config=config, log=None).root == world.root  # cached, not rebuilt
    prompts = {split: world.prompts(split) for split in ("train", "eval")}
    assert len(prompts["train"]) == 6 and len(prompts["eval"]) == 4
    assert all(
        p.startswith("<|im_start|>system\n") and p.endswith("assistant\n") for p in prompts["eval"]
    )
    pairs = [json.loads(line) for line in world.file("pairs.jsonl").read_text().splitlines()]
    held_out = [
        json.loads(line) for line in world.file("pairs_eval.jsonl").read_text().splitlines()
    ]
    assert 0 < len(pairs) <= 6 * 2 and 0 < len(held_out) <= 2 * 2  # two pairs per prompt at most
    assert all(p["chosen"] != p["rejected"] and "review" in p["prompt"] for p in pairs)
    assert not {p["prompt"] for p in held_out} & {p["prompt"] for p in pairs}
    assert not set(prompts["eval"]) & {p["prompt"] for p in pairs + held_out}
    unpaired = [json.loads(line) for line in world.file("unpaired.jsonl").read_text().splitlines()]
    assert unpaired and {type(u["label"]) for u in unpaired} == {bool}
    figures = world.info()["figures"]
    assert figures["pairs"] == len(pairs) and -1 <= figures["start_sample_reward"] <= 1
    assert world.policy_path.parent == tmp_path / "cache" / "models"

    task = resolve_task("smol:sentiment")  # registered through the task registry
    assert task.name == "smol:sentiment"
    from prefalign.smol.tasks import world_task

    bound = world_task(world)
    assert bound.prompts("eval") == prompts["eval"]
    assert (
        bound.gold_reward(["p", "p"], ["a wonderful, great film", "an awful, terrible mess"])[0]
        > 0.5
    )
    assert set(bound.metrics(["p"], ["ok"])) == {"brevity"}


def test_sentiment_pairs_hold_only_replies_that_stopped_on_eos(tmp_path, tiny_gguf, monkeypatch):
    # The training pipeline ends every response with EOS: a reply cut at the token cap would
    # teach stopping mid-sentence. With `complete_only` (the default) such replies are dropped.
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    every = get_smol_world(config=mini("sentiment", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    config = replace(mini("sentiment", f"gguf:{tiny_gguf}"), complete_only=True)
    complete = get_smol_world(config=config, log=lambda *_: None)
    assert complete.root != every.root  # another world, cached under its own key
    unpaired = complete.file("unpaired.jsonl").read_text().splitlines()
    figures = complete.info()["figures"]
    assert figures["complete_samples"] < every.info()["figures"]["complete_samples"]
    assert len(unpaired) <= figures["complete_samples"]
    assert 2 * (figures["pairs"] + figures["eval_pairs"]) <= figures["complete_samples"]
    assert len(every.file("unpaired.jsonl").read_text().splitlines()) > figures["complete_samples"]


def test_the_world_builds_at_its_own_thread_count_whatever_the_callers(
    tmp_path, tiny_gguf, monkeypatch
):
    """Samples depend on torch's thread count (a matmul's sums are split across threads), so the
    build runs at `build_threads` and restores the caller's setting; the count is in the key."""
    import torch

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    config = mini("sentiment", f"gguf:{tiny_gguf}")
    saved = torch.get_num_threads()
    built = {}
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            out = tmp_path / f"caller-{caller}"
            built[caller] = get_smol_world(config=config, out=out, log=lambda *_: None)
            assert torch.get_num_threads() == caller  # restored
    finally:
        torch.set_num_threads(saved)
    for world in built.values():
        assert world.info()["figures"]["build_threads"] == config.build_threads == 2
    for name in ("pairs.jsonl", "pairs_eval.jsonl", "unpaired.jsonl", "prompts_train.jsonl"):
        assert built[1].file(name).read_bytes() == built[2].file(name).read_bytes(), name
    one = get_smol_world(config=replace(config, build_threads=1), log=lambda *_: None)
    assert one.info()["figures"]["build_threads"] == 1
    assert one.root != get_smol_world(config=config, log=lambda *_: None).root


def test_arith_world_measures_the_starting_accuracy(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    world = get_smol_world(config=mini("arith", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    figures = world.info()["figures"]
    assert (
        0 <= figures["start_accuracy_greedy"] <= 1 and 0 <= figures["start_accuracy_sampled"] <= 1
    )
    assert all("What is " in p for p in world.prompts("eval"))
    assert not (world.root / "pairs.jsonl").exists()
    from prefalign.smol.tasks import world_task

    task = world_task(world)
    right = task.prompts("eval")[0]
    a, b = map(int, right.split("What is ")[1].split("?")[0].split(" + "))
    assert task.gold_reward([right, right], [f"{a} + {b} = {a + b}", "7"]) == [
        1.0,
        float(a + b == 7),
    ]


def test_real_demo_writes_the_toy_demos_contract(tmp_path, tiny_gguf, monkeypatch):
    from prefalign.demo import run_demo

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    world = get_smol_world(config=mini("arith", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    out = tmp_path / "demo"
    results = run_demo(
        out,
        quick=True,
        tasks=["arith"],
        worlds={"arith": world},
        world="smollm2",
        log=lambda *_: None,
    )
    assert results["world"] == "smollm2"
    rows = results["tasks"]["arith"]["methods"]
    assert list(rows) == ["sft", "rest"]
    assert rows["sft"]["kl"] == 0.0 and rows["rest"]["reward_kind"] == "gold:smol:arith"
    assert all(0 <= row["accuracy"] <= 1 for row in rows.values())
    # Each row's wall and CPU seconds, and the run's, in results.json and in the report.
    assert all(row["seconds"] > 0 and row["cpu_seconds"] > 0 for row in rows.values())
    # Every figure is rounded to the millisecond: the rows' sum may pass the total by 0.5 ms each.
    rounding = 0.0005 * (len(rows) + 1)
    assert results["cpu_seconds"] + rounding >= sum(row["cpu_seconds"] for row in rows.values())
    assert results["threads"] >= 1
    for name in ("results.json", "report.md", "report.html"):
        assert (out / name).is_file()
    report = (out / "report.md").read_text()
    assert "| cpu_seconds |" in report and f"{results['cpu_seconds']:.0f} s CPU" in report
    # labelled by its world family, not as a toy world
    base = "bf16" if cpu_weights_dtype() == "bfloat16" else "fp32"  # what the rows trained on
    assert f"SmolLM2-135M-Instruct (LoRA on a {base} base) world: " in report
    assert "Toy world" not in report and "Smollm2 world" not in report
    assert (
        json.loads((out / "results.json").read_text())["tasks"]["arith"]["methods"].keys()
        == rows.keys()
    )
    with pytest.raises(ValueError, match="unknown demo world"):
        run_demo(out, world="mars")


def test_real_preference_rows_sweep_beta_for_the_frontier(tmp_path, tiny_gguf, monkeypatch):
    from prefalign.demo.preference import PREFERENCE_ROWS
    from prefalign.demo.smollm2 import SmolDemoSettings, run_smol_preference_row

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    world = get_smol_world(config=mini("sentiment", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    settings = SmolDemoSettings(
        quick=False, out_dir=tmp_path / "demo", steps=2, batch_size=2, sweep=True
    )
    row = PREFERENCE_ROWS["tr-dpo-soft"]
    result = run_smol_preference_row(world, settings, "tr-dpo-soft", row)
    assert result["beta"] == row.beta and row.sweep_betas
    sweep = result["sweep"]
    assert sorted(p["beta"] for p in sweep) == sorted([row.beta, *row.sweep_betas])
    assert [p["kl"] for p in sweep] == sorted(p["kl"] for p in sweep)  # along the frontier
    assert all(p["steps"] == 2 for p in sweep)
    quick = SmolDemoSettings(quick=True, out_dir=tmp_path / "quick", steps=2, batch_size=2)
    assert "sweep" not in run_smol_preference_row(world, quick, "tr-dpo-soft", row)
    # The full demo's default trains each row once (the sweep took it past 30 minutes).
    default = SmolDemoSettings.make(False, tmp_path / "default")
    default.steps, default.batch_size = 2, 2
    assert "sweep" not in run_smol_preference_row(world, default, "tr-dpo-soft", row)


def test_the_full_real_demo_trains_one_epoch_and_samples_each_prompt_twice(
    tmp_path, tiny_gguf, monkeypatch
):
    from prefalign.demo.preference import PREFERENCE_ROWS
    from prefalign.demo.smollm2 import SmolDemoSettings, run_smol_preference_row

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    world = get_smol_world(config=mini("sentiment", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    settings = SmolDemoSettings.make(quick=False, out_dir=tmp_path / "demo")
    settings.batch_size = 2  # the mini world has a dozen pairs, not 96
    pairs = len(world.file("pairs.jsonl").read_text().splitlines())
    unpaired = len(world.file("unpaired.jsonl").read_text().splitlines())
    ipo = run_smol_preference_row(world, settings, "ipo", PREFERENCE_ROWS["ipo"])
    assert ipo["steps"] == pairs // 2  # one epoch, not a fixed handful of steps
    assert ipo["n"] == 2 * len(world.prompts("eval"))  # every held-out prompt, sampled twice
    # KTO: half an epoch of its unpaired examples, as many steps as a pairwise row
    kto = run_smol_preference_row(world, settings, "kto", PREFERENCE_ROWS["kto"])
    assert kto["steps"] == math.ceil(unpaired // 2 * 0.5)
    quick = SmolDemoSettings.make(quick=True, out_dir=tmp_path / "quick")
    assert (quick.steps, quick.samples_per_prompt, quick.n_eval_prompts) == (4, 1, 8)


def test_the_arm_learning_curve_reads_unseen_pairs_per_third_of_the_epoch():
    from prefalign.demo.smol_genarm import learning_curve

    history = [
        {"step": i + 1, "loss": loss, "rewards/accuracies": acc}
        for i, (loss, acc) in enumerate(
            [(0.9, 0.25), (0.8, 0.5), (0.7, 0.5), (0.6, 0.5), (0.5, 0.75), (0.4, 1.0)]
        )
    ]
    history.append({"step": 6, "eval/pair_accuracy": 0.5})  # an eval record is not a step
    curve = learning_curve(history)
    assert curve["steps_per_third"] == 2
    assert curve["accuracy_first_third"] == pytest.approx(0.375)
    assert curve["accuracy_last_third"] == pytest.approx(0.875)
    assert curve["loss_first_third"] == pytest.approx(0.85)
    assert curve["loss_last_third"] == pytest.approx(0.45)
    assert learning_curve([])["accuracy_first_third"] is None


@pytest.mark.slow  # trains two ARMs and a reward model, decodes eight times: ~1 min
def test_real_genarm_row_decodes_each_arm_mix_once(tmp_path, tiny_gguf, monkeypatch):
    from prefalign.demo.smol_genarm import method_genarm
    from prefalign.demo.smollm2 import SmolDemoSettings
    from prefalign.io import write_jsonl

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    world = get_smol_world(config=mini("sentiment", f"gguf:{tiny_gguf}"), log=lambda *_: None)
    # The tiny random model's samples rarely have two clauses, which the brevity ARM needs.
    prompts = world.prompts("train")
    write_jsonl(
        world.file("pairs.jsonl"),
        [
            {"prompt": p, "chosen": "a fine film, warm and bright.", "rejected": "dull, flat."}
            for p in prompts
        ],
    )
    settings = SmolDemoSettings(quick=True, out_dir=tmp_path / "demo", steps=2, batch_size=2)
    row = method_genarm(world, settings, log=lambda *_: None)
    by_alpha = {p["alpha"]: p for p in row["sweep"]}
    sentiment_only = next(p for p in row["tradeoff"] if p["weights"] == [2.0, 0.0])
    # The trade-off's (2, 0) is the sweep's alpha 2: one decoding, the same samples.
    assert sentiment_only["sentiment"] == by_alpha[2.0]["gold_reward"]
    assert sentiment_only["kl"] == by_alpha[2.0]["kl"]
    assert row["base"]["gold_reward"] == by_alpha[0.0]["gold_reward"]
    assert {r["name"] for r in row["baselines"]} == {"ARGS k=2", "best-of-2"}
    # SmolLM2 guided by itself at the headline alpha: the sharpening an untrained ARM brings,
    # decoded apart from the trained ARM's point (another mix, other samples).
    untrained = row["control"]
    assert untrained["alpha"] == 1.0 and {"gold_reward", "brevity", "kl"} <= set(untrained)
    assert untrained["kl"] != by_alpha[1.0]["kl"]
    assert row["arm"]["steps_per_third"] >= 1 and row["arm"]["accuracy_first_third"] is not None


def test_rest_grows_sentiment_at_the_pair_cap_and_arith_at_its_reply_cap(tmp_path):
    """Cut samples are dropped from Improve, so sentiment's ReST grows at the cap its pairs were
    sampled at (64: 82% finish) rather than its 32-token reply cap (55% were cut)."""
    from prefalign.demo.smollm2 import SmolDemoSettings, rest_max_new_tokens
    from prefalign.smol.world import SmolWorld

    settings = SmolDemoSettings.make(False, tmp_path)
    caps = {}
    for task in ("sentiment", "arith"):
        root = tmp_path / task
        root.mkdir()
        info = {"config": vars(SmolConfig.for_task(task)), "policy": "p", "figures": {}}
        (root / "world.json").write_text(json.dumps(info))
        caps[task] = rest_max_new_tokens(SmolWorld(task, root), settings)
        own = replace(settings, rest_max_new_tokens=16)
        assert rest_max_new_tokens(SmolWorld(task, root), own) == 16
    assert caps == {"sentiment": 64, "arith": 48}
