"""The ReST recipe end to end on a tiny model: records, artifacts, and resuming after a stop."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prefalign.rest.loop as loop
from prefalign.config import ConfigError, load_config
from prefalign.errors import UserError
from prefalign.rest.cli import run_rest_cli
from prefalign.rest.grow import load_prompts
from prefalign.rest.loop import RestConfig, run_rest
from prefalign.rest.state import step_key

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["initial", "grow-0", "improve-0-0", "improve-0-1", "grow-1", "improve-1-0", "improve-1-1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rest")
    (root / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ["the movie was", "i think", "hello , what is"]
        )
    )
    # Longer answers score higher: a reward the tiny random model's samples spread over.
    (root / "reward.py").write_text(
        "def length(prompt, completion):\n    return len(completion.split()) / 6\n"
    )
    return {"prompts": root / "prompts.jsonl", "reward": root / "reward.py"}


def overrides(files, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        f"out_dir={out}",
        "grow_steps=2",
        "reward.kind=function",
        f"reward.function={files['reward']}:length",
        f"grow.prompts={files['prompts']}",
        "grow.samples_per_prompt=4",
        "grow.max_new_tokens=6",
        "improve.steps_per_grow=2",
        "improve.thresholds=[0.3, 0.6]",
        "improve.normalize=per_prompt_percentile",
        "improve.max_per_prompt=2",
        # The random model seldom stops within 6 tokens: train on its cut samples too.
        "improve.unfinished=keep",
        "improve.trainer.batch_size=2",
        "improve.trainer.max_steps=2",
        "improve.trainer.lr=1e-3",
        f"eval.prompts={files['prompts']}",
        "eval.n_prompts=2",
        "eval.samples_per_prompt=2",
        "eval.max_new_tokens=6",
        *extra,
    ]


def config(files, model_dir, out, *extra) -> RestConfig:
    return load_config(RestConfig, None, overrides(files, model_dir, out, *extra))


class Stop(Exception):
    """Stands in for the process being killed."""


def fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_stopped_run_resumes_at_the_right_step_without_regrowing(
    files, tiny_llama_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    calls = {"grow": 0, "improve": 0}
    real_grow, real_improve, real_write = loop.grow, loop.improve, loop.write_samples

    def counting_grow(*a, **k):
        calls["grow"] += 1
        return real_grow(*a, **k)

    def improve_stopping_at(n):
        def fn(*a, **k):
            calls["improve"] += 1
            if calls["improve"] == n:
                raise Stop("killed inside an Improve step")
            return real_improve(*a, **k)

        return fn

    monkeypatch.setattr(loop, "grow", counting_grow)
    # 1) Stopped inside Improve step 0.1: Grow 0 and Improve 0.0 are finished.
    monkeypatch.setattr(loop, "improve", improve_stopping_at(2))
    with pytest.raises(Stop):
        run_rest(config(files, tiny_llama_dir, out), log=lambda *_: None)
    assert calls == {"grow": 1, "improve": 2}
    state = json.loads((out / "state.json").read_text())
    assert [step_key(r) for r in state["records"]] == ORDER[:3]
    grown0 = fingerprint(out / "grown" / "grow_000.jsonl")

    # 2) Resumed, then stopped between writing Grow 1's data and recording the step.
    def write_then_stop(path, samples):
        real_write(path, samples)
        if path.name == "grow_001.jsonl":
            raise Stop("killed after the data file was written")

    calls.update(grow=0, improve=0)
    monkeypatch.setattr(loop, "improve", improve_stopping_at(0))
    monkeypatch.setattr(loop, "write_samples", write_then_stop)
    with pytest.raises(Stop):
        run_rest(config(files, tiny_llama_dir, out), resume=True, log=lambda *_: None)
    assert calls == {"grow": 1, "improve": 1}  # only Grow 1 and Improve 0.1 ran
    assert fingerprint(out / "grown" / "grow_000.jsonl") == grown0
    grown1 = fingerprint(out / "grown" / "grow_001.jsonl")

    # 3) Resumed to the end: Grow 1's data file is reused, not regenerated.
    calls.update(grow=0, improve=0)
    lines: list[str] = []
    result = run_rest(config(files, tiny_llama_dir, out), resume=True, log=lines.append)
    assert calls == {"grow": 0, "improve": 2}
    assert any("reusing" in line and "grow_001.jsonl" in line for line in lines)
    assert fingerprint(out / "grown" / "grow_000.jsonl") == grown0
    assert fingerprint(out / "grown" / "grow_001.jsonl") == grown1
    assert [step_key(r) for r in result.records] == ORDER
    assert [
        json.loads(line)["kind"] for line in (out / "steps.jsonl").read_text().splitlines()
    ] == [k.split("-")[0] for k in ORDER]
    assert result.final_model == str(out / "improve" / "g001_i01" / "final")
    assert (out / "steps.png").exists() and result.plot == out / "steps.png"
    assert not (
        out / "improve" / "g000_i00" / "checkpoints"
    ).exists()  # only final/ is kept per step

    # Each record carries what a user needs to judge the step.
    improve_rec = result.records[2]
    # the cap: 2 per prompt, 3 prompts
    assert improve_rec["threshold"] == 0.3 and 0 < improve_rec["kept"] <= 2 * 3
    assert {"reward", "kl"} <= set(improve_rec["eval"]) and improve_rec["eval"]["kl"] != 0.0
    assert result.records[1]["reward"]["p90"] >= result.records[1]["reward"]["p10"]
    assert result.records[0]["eval"]["kl"] == 0.0  # the initial policy against itself


def test_cli_run_and_restart_from_base(files, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = argparse.Namespace(
        config=None,
        resume=False,
        overrides=overrides(
            files,
            tiny_llama_dir,
            out,
            "grow_steps=1",
            "improve.restart_from_base=true",
            "improve.losses=[bc, dpo]",
            "improve.objective_params={beta: 0.5}",
            "improve.reference.mode=soft",
            "improve.thresholds=[0.4, 0.7]",
        ),
    )
    assert run_rest_cli(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert summary["final_model"] == str(out / "improve" / "g000_i01" / "final")
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert records[2]["start"] == str(tiny_llama_dir) and records[3]["start"] == records[2]["model"]
    # the loss may change from step to step
    assert (records[2]["loss"], records[3]["loss"]) == (
        "bc",
        "dpo",
    )
    assert records[3]["examples"] <= records[3]["kept"]  # dpo trains on (kept, worse) pairs
    with pytest.raises(ValueError, match="pass --resume"):
        run_rest_cli(args)  # the same out_dir again, without --resume


def test_rest_paper_options(files, tiny_llama_dir, tmp_path):
    """ReST's own choices as config keys: the original SFT rows join each Improve step's mixture,
    rewards are min-max scaled to [0, 1] before thresholding, and later steps train at a lower
    learning rate; a raw-reward floor keeps failures out whatever their scaled score."""
    sft = tmp_path / "sft.jsonl"
    rows = [{"prompt": p, "completion": " yes ."} for p in ["hi", "what is", "ok"]]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_rest(
        config(
            files,
            tiny_llama_dir,
            tmp_path / "out",
            "grow_steps=1",
            "improve.normalize=min_max",
            "improve.thresholds=[0.0, 0.5]",
            "improve.max_per_prompt=0",
            f"improve.original_data={sft}",
            "improve.lr_decay=0.5",
            "improve.min_reward=0.34",
        ),
        log=lambda *_: None,
    )
    grown_file = tmp_path / "out" / "grown" / "grow_000.jsonl"
    grown = [json.loads(line) for line in grown_file.read_text().splitlines()]
    rewards = [g["reward"] for g in grown]
    lo, hi = min(rewards), max(rewards)
    steps = [r for r in result.records if r["kind"] == "improve"]
    for step in steps:
        expected = sum(1 for r in rewards if (r - lo) / (hi - lo) > step["threshold"] and r > 0.34)
        assert step["kept"] == expected and step["original_examples"] == 3
        assert step["examples"] == step["kept"] + 3
    assert [s["lr"] for s in steps] == pytest.approx([1e-3, 5e-4])
    for step in steps:  # the step's trainer ran at its own rate
        metrics = Path(step["model"]).parent / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert max(r["lr"] for r in logged if "lr" in r) <= step["lr"] + 1e-12
    with pytest.raises(ValueError, match="original_data"):
        bad = config(
            files,
            tiny_llama_dir,
            tmp_path / "bad",
            f"improve.original_data={sft}",
            "improve.loss=dpo",
        )
        run_rest(bad)
    with pytest.raises(ValueError, match="lr_decay"):
        run_rest(config(files, tiny_llama_dir, tmp_path / "bad", "improve.lr_decay=0"))


def test_unfinished_samples_are_dropped_by_default_or_kept_without_eos(
    files, tiny_llama_dir, tmp_path
):
    """A sample cut at grow.max_new_tokens must not teach stopping: by default it is left out of
    the Improve step (counted in its record); `improve.unfinished=keep` trains on it as a
    truncated target whose last trained token is not EOS. Every sample passes the threshold."""
    from prefalign.modeling import load_tokenizer
    from prefalign.rest.grow import read_samples
    from prefalign.rest.improve import build_data, training_pool

    every = ["grow_steps=1", "grow.samples_per_prompt=8", "grow.max_new_tokens=40"]
    every += ["improve.steps_per_grow=1", "improve.normalize=none", "improve.thresholds=[-1.0]"]
    every += ["improve.max_per_prompt=0", "eval.n_prompts=0"]
    assert RestConfig().improve.unfinished == "drop"  # the default (the tests' config keeps)
    runs = {}
    for mode in ("drop", "keep"):
        cfg = config(files, tiny_llama_dir, tmp_path / mode, *every, f"improve.unfinished={mode}")
        runs[mode] = run_rest(cfg, log=lambda *_: None).records[-1]
    samples = read_samples(tmp_path / "keep" / "grown" / "grow_000.jsonl")
    finished = sum(s.finished for s in samples)
    assert 0 < finished < len(samples), "the sampler must make both kinds for this test"
    assert runs["drop"]["kept"] == runs["drop"]["examples"] == finished
    cut = len(samples) - finished
    assert runs["drop"]["unfinished"] == runs["drop"]["unfinished_dropped"] == cut
    assert runs["keep"]["kept"] == len(samples) and runs["keep"]["unfinished_dropped"] == 0

    tokenizer = load_tokenizer(tiny_llama_dir)
    eos = tokenizer.eos_token_id
    for mode in ("drop", "keep"):
        pool = training_pool(samples, mode)
        data = build_data("bc", pool, list(range(len(pool))), [s.reward for s in pool], -1.0)
        batch = data.collate(list(range(len(data))), tokenizer.pad_token_id)
        for sample, ids, mask in zip(pool, batch["input_ids"], batch["loss_mask"], strict=True):
            assert (ids[mask][-1] == eos) == sample.finished  # EOS only where the model stopped
        assert all(s.finished for s in pool) or mode == "keep"


def test_a_user_loss_file_is_imported_once_per_run(files, tiny_llama_dir, tmp_path):
    loss = tmp_path / "counted.py"
    loss.write_text(
        f"open({str(tmp_path / 'imports')!r}, 'a').write('x')\n\n"
        "def margin(pc, pr, rc, rr, beta=0.5):\n"
        "    return (1 - beta * ((pc - rc) - (pr - rr))).clamp(min=0)\n"
    )
    extra = ("grow_steps=2", f"improve.loss={loss}:margin", "improve.thresholds=[0.0, 0.3]")
    run_rest(config(files, tiny_llama_dir, tmp_path / "out", *extra), log=lambda *_: None)
    # 14 imports before objectives were resolved once per run (check, data, reference, loss).
    assert (tmp_path / "imports").read_text() == "x"


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["improve.loss=dpoo"], ValueError, "improve.loss"),
        (["improve.thresholds=[0.1]"], ValueError, "one per step"),
        (["improve.normalize=rank"], ConfigError, "improve.normalize"),
        (["grow_steps=0"], ValueError, "grow_steps"),
        (["improve.loss=bc", "improve.objective_params={beta: 1}"], ValueError, "objective_params"),
        (["improve.losses=[bc]"], ValueError, "one per step"),
        (["reward.kind=gold"], ValueError, "reward.task"),
        (
            ["improve.loss=ipo", "improve.objective_params={tau: 1}"],
            UserError,
            "objective_params.tau",
        ),
        (["improve.loss=dpo", "improve.reference.mode=none"], ValueError, "needs a reference"),
    ],
)
def test_bad_configs_fail_before_any_work(files, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        run_rest(config(files, tmp_path / "no-model", tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(files, tiny_llama_dir, tmp_path):
    """A real kill at an arbitrary moment (here: while Grow 1's data is on disk and Improve 1.x
    may be running), then `--resume`: the same records and final weights as a run never stopped."""
    script = (
        "import argparse, sys; from prefalign.rest.cli import run_rest_cli; "
        "a = sys.argv[1:]; "
        "sys.exit(run_rest_cli(argparse.Namespace(config=None, resume='--resume' in a, "
        "overrides=[x for x in a if x != '--resume'])))"
    )
    extra = ("improve.trainer.max_steps=6", "improve.trainer.save_every=1")

    def launch(out: Path, *more: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", script, *overrides(files, tiny_llama_dir, out, *extra), *more],
            cwd=ROOT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # The uninterrupted run in this process: one interpreter start fewer.
    straight = overrides(files, tiny_llama_dir, tmp_path / "straight", *extra)
    assert run_rest_cli(argparse.Namespace(config=None, resume=False, overrides=straight)) == 0

    killed = launch(tmp_path / "killed")
    target = tmp_path / "killed" / "improve" / "g001_i00" / "checkpoints"
    deadline = time.time() + 120
    while not (target.exists() and any(target.glob("step-*"))) and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert len(state["records"]) < len(ORDER), "the kill came too late to test resuming"
    grown0 = fingerprint(tmp_path / "killed" / "grown" / "grow_000.jsonl")

    resumed = launch(tmp_path / "killed", "--resume")
    log = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, log
    if (
        len(state["records"]) == 5
    ):  # killed inside Improve 1.0: it continues from its own checkpoint
        assert "resumed from" in log and "improve/g001_i00/checkpoints" in log
    assert fingerprint(tmp_path / "killed" / "grown" / "grow_000.jsonl") == grown0
    for name in ("grow_000.jsonl", "grow_001.jsonl"):
        assert (tmp_path / "killed" / "grown" / name).read_bytes() == (
            tmp_path / "straight" / "grown" / name
        ).read_bytes()
    records = [
        json.loads(line) for line in (tmp_path / "killed" / "steps.jsonl").read_text().splitlines()
    ]
    assert [step_key(r) for r in records] == ORDER
    a = load_file(tmp_path / "straight" / "improve" / "g001_i01" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "improve" / "g001_i01" / "final" / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name


def test_a_task_as_the_model_fills_in_its_prompts_and_tasks():
    toy = ["model.name_or_path=toy:arith"]
    config = loop.task_defaults(load_config(RestConfig, None, [*toy, "reward.kind=gold"]))
    assert (config.grow.prompts, config.reward.task, config.eval.task) == ("toy:arith",) * 3
    given = loop.task_defaults(
        load_config(RestConfig, None, [*toy, "grow.prompts=p.jsonl", "eval.task=sentiment"])
    )
    # what the user set stays
    assert (given.grow.prompts, given.eval.task) == (
        "p.jsonl",
        "sentiment",
    )


@pytest.mark.parametrize(
    "fails",
    [
        lambda: run_rest(load_config(RestConfig, None, ["reward.kind=function"])),  # no model
        lambda: run_rest(
            load_config(RestConfig, None, ["model.name_or_path=m", "reward.kind=gold"])
        ),
        lambda: load_prompts(""),
    ],
    ids=["model.name_or_path", "reward.task", "grow.prompts"],
)
def test_rest_errors_list_every_registered_task_not_only_the_toy_ones(fails, monkeypatch, tmp_path):
    """The messages named only toy:sentiment / toy:arith, though the smol:* tasks work too."""
    from prefalign import tasks

    monkeypatch.chdir(tmp_path)  # the default out_dir is relative
    with pytest.raises(ConfigError) as err:
        fails()
    message = str(err.value)
    assert "smol:arith" in message, message
    assert set(tasks.task_names()) <= set(re.findall(r"[\w:]+", message)), message


def test_a_missing_model_leaves_no_run_directory_so_the_fixed_command_runs(
    files, tiny_llama_dir, tmp_path
):
    """run.json was written before the model was loaded: after a typo in the model path the
    corrected command was refused ("out_dir ... is not empty; pass --resume")."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no-such-model"):
        run_rest(config(files, tmp_path / "no-such-model", out), log=lambda *_: None)
    assert not out.exists()
    run_rest(config(files, tiny_llama_dir, out, "grow_steps=1"), log=lambda *_: None)
    assert (out / "state.json").exists()
