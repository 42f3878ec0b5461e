"""FSDP2 on 2 CPU processes (torchrun, gloo): equal to 1 process at twice the batch for every
reference mode with a full-model and a LoRA policy; a stopped run resumed equals the run never
stopped, and its `final` loads as a plain Hugging Face model; the sharded reference's soft and
hard updates touch only local shards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_review_world, tiny_llama_config, torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from prefalign.errors import UserError
from prefalign.modeling import LoraSpec, load_model, load_tokenizer
from prefalign.training.loop import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow  # torchrun starts two fresh interpreters per run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    paths = save_tiny_review_world(root, 32)
    # A saved adapter with non-zero B, so both LoRA runs start from the same, non-trivial policy.
    torch.manual_seed(0)
    lora = load_model(root / "model", device="cpu", lora=LoraSpec(r=4))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora.save_pretrained(root / "lora")
    load_tokenizer(root / "model").save_pretrained(root / "lora")
    return {**paths, "lora": root / "lora", "runs": root / "runs"}


def train_args(tiny, out: Path, model: str, *extra: str) -> list[str]:
    return [
        "train",
        f"model.name_or_path={tiny[model]}",
        f"data.path={tiny['pairs']}",
        f"trainer.out_dir={out}",
        "trainer.max_steps=4",
        "trainer.adam_epsilon=1e-4",
        "trainer.schedule=constant",  # a run stopped at step 2 then resumed has the same lr
        "trainer.log_every=1",
        "trainer.progress=false",
        *extra,
    ]


def train_one_process(tiny, out: Path, model: str, *extra: str) -> None:
    """In this interpreter: no torch start-up to pay."""
    from prefalign.cli import main

    assert main(train_args(tiny, out, model, *extra)) == 0


def train_two_processes(tiny, jobs: list[tuple[Path, str, tuple[str, ...]]]) -> None:
    """(out_dir, model, settings) runs, one after the other, in one torchrun launch of 2
    processes with FSDP2; each run's output is in `<out_dir>.rank<R>.log`."""
    root = jobs[0][0].parent
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"jobs-{len(list(root.glob('jobs-*')))}.json"
    argvs = [
        train_args(tiny, out, model, *extra, "trainer.batch_size=4", "trainer.fsdp=true")
        for out, model, extra in jobs
    ]
    spec.write_text(json.dumps(argvs))
    worker = Path(__file__).parent / "fsdp_train_worker.py"
    proc = subprocess.run(
        [*torchrun(2), str(worker), str(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,  # all the runs of a module, on a loaded 2-core machine
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def log_of(out: Path) -> str:
    """Both processes' output of a 2-process run, and check that it succeeded."""
    logs = [out.with_name(f"{out.name}.rank{r}.log").read_text() for r in (0, 1)]
    for log in logs:
        assert log.rstrip().endswith("exit code 0"), log
    return "".join(logs)


# (policy directory, its settings): every reference mode with a full-model and a LoRA policy.
FULL, LORA = ("trainer.lr=1e-3",), ("trainer.lr=1e-2",)
CASES = {
    "full-frozen": ("model", ("reference.mode=frozen", *FULL)),  # cached, fingerprinted by shards
    "full-soft": ("model", ("reference.mode=soft", *FULL)),
    "full-hard": ("model", ("reference.mode=hard", "reference.tau=2", *FULL)),
    # A fresh adapter (B = 0): the reference is the base model with adapters disabled.
    "lora-frozen-base": ("model", ("model.lora={r: 4, alpha: 8}", "reference.mode=frozen", *LORA)),
    "lora-frozen-copy": ("lora", ("reference.mode=frozen", *LORA)),  # a trained start adapter
    "lora-soft": ("lora", ("reference.mode=soft", "reference.lora_rank=8", *LORA)),
    "lora-hard": ("lora", ("reference.mode=hard", "reference.tau=2", *LORA)),
}


RESUMED = ["full-soft", "lora-soft"]


@pytest.fixture(scope="module")
def two_process_runs(tiny) -> dict[str, Path]:
    """Every case trained by 2 FSDP2 processes, and the soft ones also stopped after 2 of their
    4 steps (for `resumed_runs`): one torchrun launch for all of them."""
    runs = tiny["runs"]
    straight = [(runs / case, model, args) for case, (model, args) in CASES.items()]
    stopped = [
        (runs / f"{case}-resumed", CASES[case][0], (*CASES[case][1], "trainer.max_steps=2"))
        for case in RESUMED
    ]
    train_two_processes(tiny, straight + stopped)
    return {out.name: out for out, _, _ in straight + stopped}


@pytest.fixture(scope="module")
def resumed_runs(tiny, two_process_runs) -> dict[str, Path]:
    """The stopped runs continued with --resume to step 4 by a fresh launch of 2 processes."""
    stopped = {case: two_process_runs[f"{case}-resumed"] for case in RESUMED}
    for out in stopped.values():
        assert (out / "checkpoints" / "step-2" / "optimizer.pt").exists(), log_of(out)
    train_two_processes(
        tiny,
        [(out, CASES[case][0], (*CASES[case][1], "--resume")) for case, out in stopped.items()],
    )
    return stopped


def weight_file(case: str) -> str:
    return "model.safetensors" if case.startswith("full") else "adapter_model.safetensors"


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_two_processes_match_one_process_with_double_batch(
    tiny, two_process_runs, tmp_path, case
):
    model, args = CASES[case]
    train_one_process(tiny, tmp_path / "one", model, *args, "trainer.batch_size=8")
    two = two_process_runs[case]
    log = log_of(two)
    assert "FSDP2:" in log and " on process 1" in log
    line = next(x for x in log.splitlines() if x.startswith("FSDP2:"))
    local, total = int(line.split()[1]), int(line.split()[3])
    assert local < total  # each process holds a shard, not the whole model
    one = metrics(tmp_path / "one")
    for a, b in zip(one, metrics(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        if "reference/truncation_error" in a:
            assert a["reference/truncation_error"] == pytest.approx(
                b["reference/truncation_error"], abs=1e-6
            )
    a, b = (
        load_file(tmp_path / "one" / "final" / weight_file(case)),
        load_file(two / "final" / weight_file(case)),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@slow
@pytest.mark.parametrize("case", RESUMED)
def test_fsdp2_run_stopped_and_resumed_equals_the_run_never_stopped(
    tiny, two_process_runs, resumed_runs, case
):
    """Stopped after 2 of 4 steps (its checkpoint: gathered weights, optimizer and reference
    state, each process's RNG), resumed by 2 processes: the same losses and final weights as
    the uninterrupted 2-process run, and `final` loads as a plain model in one process."""
    straight, out = two_process_runs[case], resumed_runs[case]
    log = log_of(out)
    assert "resumed from" in log and "step-2" in log
    for a, b in zip(metrics(straight), metrics(out), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    expected = load_file(straight / "final" / weight_file(case))
    got = load_file(out / "final" / weight_file(case))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # One process, plain Hugging Face (peft for an adapter): no FSDP needed to read `final`.
    if CASES[case][0] == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(tiny["model"])
        plain = PeftModel.from_pretrained(base, out / "final")
        state = plain.state_dict()
        lora_a = next(n for n in expected if "lora_A" in n)
        loaded = next(v for k, v in state.items() if k.startswith(lora_a.rsplit(".", 1)[0]))
        torch.testing.assert_close(loaded, expected[lora_a])
    else:
        plain = AutoModelForCausalLM.from_pretrained(out / "final")
        state = plain.state_dict()
        for name in expected:
            torch.testing.assert_close(state[name], expected[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_a_checkpoint_of_the_other_sharding(tmp_path):
    """A data-parallel checkpoint holds an optimizer state by index, an FSDP2 one by name: a run
    resumed with the other setting stops with a one-line error instead of loading it wrongly."""
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = Trainer(model, TrainerConfig(out_dir=str(tmp_path), batch_size=2), [5] * 4)
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 2, "num_processes": 1, "fsdp": True}))
    with pytest.raises(UserError, match=r"trainer.fsdp=true; resume with the same setting"):
        trainer.resume()


@slow
def test_sharded_reference_update_is_local_and_exact():
    worker = Path(__file__).parent / "fsdp_update_worker.py"
    proc = subprocess.run(
        [*torchrun(2), str(worker)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("local update ok") == 2
