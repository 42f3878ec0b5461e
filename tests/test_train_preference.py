"""End-to-end preference training: every reference mode, KTO, resume after SIGKILL, NaN stop,
2 processes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_review_model, torchrun
from safetensors.torch import load_file

from prefalign import objectives
from prefalign.config import load_config
from prefalign.toy.corpus import review
from prefalign.training.loop import TrainingDiverged, checkpoints
from prefalign.training.preference import PreferenceConfig, reward_beta, run_preference

ROOT = Path(__file__).resolve().parents[1]
PREFALIGN = [sys.executable, "-m", "prefalign.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama + toy tokenizer on disk, and pair/unpaired files of toy reviews."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    save_tiny_review_model(root / "model", rng)
    pairs, unpaired = [], []
    for _ in range(64):
        prompt, good = review(rng)
        _, bad = review(rng)
        if good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
            unpaired += [
                {"prompt": prompt, "completion": good, "label": True},
                {"prompt": prompt, "completion": bad, "label": False},
            ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "unpaired.jsonl").write_text("".join(json.dumps(p) + "\n" for p in unpaired))
    return {
        "model": root / "model",
        "pairs": root / "pairs.jsonl",
        "unpaired": root / "unpaired.jsonl",
        "root": root,
    }


def overrides(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny['model']}",
        f"data.path={tiny['pairs']}",
        f"trainer.out_dir={out}",
        "trainer.batch_size=4",
        "trainer.max_steps=8",
        "trainer.lr=1e-3",
        "trainer.log_every=1",
        "trainer.progress=false",
        "objective.params={beta: 0.5}",
        *extra,
    ]


def train(tiny, out: Path, *extra: str):
    config = load_config(PreferenceConfig, None, overrides(tiny, out, *extra))
    return run_preference(config, log=lambda *_: None)


def preference_margin(model_dir: Path, tiny) -> float:
    """Mean log p(chosen) - log p(rejected) of the training pairs under a saved model."""
    from prefalign.data import collate_pairs, load_preference_data, tokenize_preference
    from prefalign.logprobs import sequence_logps, split_pairs
    from prefalign.modeling import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    records = load_preference_data(tiny["pairs"]).records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=128, max_prompt_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = split_pairs(
            sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        )
    return float((chosen.sum - rejected.sum).mean())


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize(
    "objective,reference",
    [
        ("dpo", "frozen"),
        ("dpo", "soft"),
        ("dpo", "hard"),
        ("ipo", "soft"),
        ("hinge", "frozen"),
        ("robust", "hard"),
        ("cell", "soft"),
    ],
)
def test_training_raises_the_margin_of_training_pairs(tiny, tmp_path, objective, reference):
    result = train(
        tiny,
        tmp_path / "run",
        f"objective.name={objective}",
        f"reference.mode={reference}",
        "reference.tau=3",
    )
    assert result.steps == 8
    assert (
        preference_margin(tmp_path / "run" / "final", tiny)
        > preference_margin(tiny["model"], tiny) + 0.1
    )
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "rewards/accuracies" in json.loads(lines[-1])


def test_kto_trains_on_unpaired_data(tiny, tmp_path):
    # The unpaired file holds each pair's chosen as desirable and rejected as undesirable.
    result = train(
        tiny,
        tmp_path / "kto",
        "objective.name=kto",
        f"data.path={tiny['unpaired']}",
        "reference.mode=soft",
    )
    assert (
        preference_margin(tmp_path / "kto" / "final", tiny)
        > preference_margin(tiny["model"], tiny) + 0.1
    )
    assert "kl" in result.history[-1]


def test_lora_policy_with_soft_reference_adapter(tiny, tmp_path):
    train(
        tiny,
        tmp_path / "lora",
        "model.lora={r: 4, alpha: 8}",
        "reference.mode=soft",
        "trainer.lr=1e-2",
    )
    assert (
        preference_margin(tmp_path / "lora" / "final", tiny)
        > preference_margin(tiny["model"], tiny) + 0.1
    )
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()


def test_user_objective_from_code_file(tiny, tmp_path):
    code = tmp_path / "my_loss.py"
    code.write_text(
        "import torch.nn.functional as F\n\n"
        "def sharp(pc, pr, rc, rr, beta=0.5):\n"
        "    return -F.logsigmoid(2 * beta * ((pc - pr) - (rc - rr)))\n"
    )
    train(
        tiny,
        tmp_path / "user",
        f"objective.code={code}:sharp",
        "reference.mode=hard",
        "reference.tau=2",
    )
    assert (
        preference_margin(tmp_path / "user" / "final", tiny)
        > preference_margin(tiny["model"], tiny) + 0.1
    )


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tiny, tmp_path):
    code = tmp_path / "nan_loss.py"
    code.write_text(
        "calls = [0]\n\n"
        "def late_nan(pc, pr, rc, rr, beta=0.5):\n"
        "    calls[0] += 1\n"
        "    z = (pc - pr) - (rc - rr)\n"
        "    return -z if calls[0] < 3 else z * float('nan')\n"
    )
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="at step 3"):
        train(tiny, out, f"objective.code={code}:late_nan", "trainer.save_every=1")
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-1", "step-2"]
    assert load_file(out / "checkpoints" / "step-2" / "model" / "model.safetensors")


@pytest.mark.slow  # a fresh interpreter imports torch: 4 s
def test_a_huge_lr_stops_with_one_line_and_only_finite_checkpoints(tiny, tmp_path):
    # lr 1e6: the loss stays finite at step 2 while the gradient norm is NaN.
    out = tmp_path / "huge"
    proc = cli_train(tiny, out, "trainer.lr=1e6", "trainer.save_every=1")
    stderr = proc.communicate(timeout=200)[0]
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and "error: gradient norm became nan at step 2" in lines[-1]
    saved = sorted(checkpoints(out))
    assert [step for step, _ in saved] == [1]
    assert f"the last finite checkpoint is {saved[-1][1]}" in lines[-1]
    for _, path in saved:
        for name, tensor in load_file(path / "model" / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), name
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


@pytest.mark.parametrize("mode", ["soft", "frozen"])
def test_held_out_pair_accuracy_is_measured_against_the_initial_policy(tiny, tmp_path, mode):
    from prefalign.evaluation.pairs import pair_metrics
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.reference import ModelReference

    out = tmp_path / mode
    result = train(
        tiny,
        out,
        f"reference.mode={mode}",
        f"data.eval_path={tiny['pairs']}",
        "trainer.max_steps=4",
    )
    last = result.history[-1]
    tokenizer = load_tokenizer(out / "final")
    config = load_config(PreferenceConfig, None, overrides(tiny, out))
    initial = ModelReference(load_model(tiny["model"]))
    expected = pair_metrics(
        load_model(out / "final"), initial, tokenizer, str(tiny["pairs"]), 0.5, config.data
    )
    assert last["eval/pair_margin"] == pytest.approx(expected["pair_margin"], rel=1e-4)
    assert last["eval/pair_accuracy"] == pytest.approx(expected["pair_accuracy"])
    if mode == "soft":  # labelled apart: the moving reference gives another margin
        assert abs(last["eval/pair_margin_vs_reference"] - last["eval/pair_margin"]) > 1e-3
    else:
        assert "eval/pair_margin_vs_reference" not in last


def test_dpo_from_a_trained_lora_adapter_starts_at_its_reference(tiny, tmp_path):
    # Stage 1 trains an adapter; stage 2 starts DPO from it with a frozen reference, which must
    # be that adapter (the initial policy), not the bare base: at step 1 policy == reference.
    train(
        tiny,
        tmp_path / "stage1",
        "model.lora={r: 4, alpha: 8}",
        "trainer.lr=1e-2",
        "trainer.max_steps=4",
    )
    result = train(
        tiny,
        tmp_path / "stage2",
        f"model.name_or_path={tmp_path / 'stage1' / 'final'}",
        "reference.mode=frozen",
        "speed.reference_cache=off",
    )
    first = result.history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


LAYOUTS = {"full": (), "lora": ("model.lora={r: 4, alpha: 8}", "trainer.lr=1e-2")}
WEIGHT_FILES = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_checkpoint_writes_the_weights_once_and_final_is_the_last_one(tiny, tmp_path, layout):
    out = tmp_path / layout
    train(
        tiny,
        out,
        *LAYOUTS[layout],
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.keep_checkpoints=3",
    )
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step}"
        weights = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.safetensors"))
        assert weights == [f"model/{WEIGHT_FILES[layout]}"], weights
    final = out / "final"
    assert (
        final.is_symlink()
        and final.resolve() == (out / "checkpoints" / "step-4" / "model").resolve()
    )
    assert not os.path.isabs(os.readlink(final))  # the run directory can move
    assert preference_margin(final, tiny) > preference_margin(tiny["model"], tiny) + 0.1


def straight_and_resumed(tiny, tmp_path, layout: str, *extra: str):
    """Final weights of a 4-step soft-reference run, and of the same run stopped after step 2
    and resumed from its checkpoint."""
    common = (
        *LAYOUTS[layout],
        "trainer.schedule=constant",
        "reference.mode=soft",
        "trainer.save_every=2",
        *extra,
    )
    train(tiny, tmp_path / "straight", *common, "trainer.max_steps=4")
    train(tiny, tmp_path / "resumed", *common, "trainer.max_steps=2")
    config = load_config(
        PreferenceConfig,
        None,
        overrides(tiny, tmp_path / "resumed", *common, "trainer.max_steps=4"),
    )
    result = run_preference(config, resume=True, log=lambda *_: None)
    assert result.steps == 4
    a = load_file(tmp_path / "straight" / "final" / WEIGHT_FILES[layout])
    b = load_file(tmp_path / "resumed" / "final" / WEIGHT_FILES[layout])
    return a, b


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_from_a_checkpoint_is_bit_exact(tiny, tmp_path, layout):
    a, b = straight_and_resumed(tiny, tmp_path, layout)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_trainer_seed_decides_the_lora_adapters_init(tiny, tmp_path):
    def adapter(name: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + len(name))  # the global RNG state before a run must not matter
        train(
            tiny,
            tmp_path / name,
            "model.lora={r: 4, alpha: 8}",
            f"trainer.seed={seed}",
            "trainer.max_steps=1",
            "trainer.lr=1e-9",
        )
        return load_file(tmp_path / name / "final" / "adapter_model.safetensors")

    a, again, other = adapter("a", 0), adapter("again", 0), adapter("other", 1)
    lora_a = [n for n in a if "lora_A" in n]
    assert lora_a and all(torch.equal(a[n], again[n]) for n in a)
    assert all(not torch.equal(a[n], other[n]) for n in lora_a)


def cli_train(tiny, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [*PREFALIGN, "train", *overrides(tiny, out, *extra)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    args = (
        "reference.mode=soft",
        "trainer.max_steps=60",
        "trainer.save_every=4",
        "trainer.log_every=10",
    )
    straight = cli_train(tiny, tmp_path / "straight", *args)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed = cli_train(tiny, tmp_path / "killed", *args)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step-8").exists() and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert 8 <= done[-1] < 60, f"the kill came too late to test resuming: {done}"

    resumed = cli_train(tiny, tmp_path / "killed", *args, "--resume")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch(tiny, tmp_path):
    # Adam turns a gradient of 1e-12 into a full-size step of either sign; a larger epsilon keeps
    # summation-order noise (one batch of 8 vs two all-reduced batches of 4) from flipping those.
    common = (
        "reference.mode=soft",
        "trainer.max_steps=4",
        "trainer.lr=1e-3",
        "trainer.adam_epsilon=1e-4",
    )
    one = cli_train(tiny, tmp_path / "one", *common, "trainer.batch_size=8")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    # torchrun starts the processes; accelerate joins them in one gloo group on CPU.
    launch = [*torchrun(2), "-m", "prefalign.cli"]
    two = subprocess.run(
        [*launch, "train", *overrides(tiny, tmp_path / "two", *common), "trainer.batch_size=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_kto_with_two_processes_whose_batches_hold_different_labels(tiny, tmp_path):
    # 3 of 4 examples desirable, 2 per process: at some steps one process holds no undesirable
    # example, so the processes' metric sets differ unless the Trainer reduces a fixed key set.
    rows = [json.loads(line) for line in tiny["unpaired"].read_text().splitlines()]
    kept = [r for i, r in enumerate(rows) if r["label"] or i % 6 == 1]
    data = tmp_path / "skewed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kept))
    launch = [*torchrun(2), "-m", "prefalign.cli"]
    args = overrides(
        tiny,
        tmp_path / "two",
        "objective.name=kto",
        f"data.path={data}",
        "reference.mode=soft",
        "trainer.batch_size=2",
        "trainer.max_steps=12",
    )
    two = subprocess.run(
        [*launch, "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert two.returncode == 0, two.stdout + two.stderr
    records = [
        json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 12
    keys = {frozenset(r) for r in records}
    assert len(keys) == 1 and {"rewards/chosen", "rewards/rejected", "kl"} <= next(iter(keys))
    assert all(r["rewards/chosen"] is not None for r in records)  # every global batch has some
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow  # a fresh interpreter imports torch: 4 s
def test_missing_data_file_is_a_one_line_cli_error(tiny, tmp_path):
    """A missing data file is a one-line user error from the CLI, exit code 2."""
    proc = subprocess.run(
        [
            *PREFALIGN,
            "train",
            f"model.name_or_path={tiny['model']}",
            "data.path=/nonexistent/pairs.jsonl",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "pairs.jsonl" in proc.stderr


def test_logged_rewards_use_the_objectives_own_scale():
    # DPO-style objectives scale implicit rewards by beta; the ARM objective by beta_r.
    assert reward_beta(objectives.get("dpo"), {"beta": 0.3}) == 0.3
    assert reward_beta(objectives.get("dpo"), {}) == objectives.get("dpo").params()["beta"]
    assert reward_beta(objectives.get("genarm"), {"beta_r": 0.02}) == 0.02
    assert reward_beta(objectives.get("genarm"), {}) == objectives.get("genarm").params()["beta_r"]


@pytest.mark.parametrize("mode", ["frozen", "soft", "hard"])
def test_a_lora_train_and_reload_emits_no_future_warning(tiny, tmp_path, mode):
    """peft asks transformers for the deprecated `is_gradient_checkpointing` in PeftModel's
    constructor too (loading a saved adapter, a trained adapter's reference copy), so every
    LoRA row of the real demo printed the FutureWarning."""
    import warnings

    from prefalign.modeling import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tmp_path / "first"
        train(tiny, first, "model.lora={r: 4, alpha: 8}", f"reference.mode={mode}",
              "reference.tau=2", "trainer.max_steps=2")  # fmt: skip
        # from the trained adapter: the policy and its reference are loaded from disk
        train(tiny, tmp_path / "again", f"model.name_or_path={first / 'final'}",
              f"reference.mode={mode}", "reference.tau=2", "trainer.max_steps=2")  # fmt: skip
        load_model(tmp_path / "again" / "final", device="cpu")
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
