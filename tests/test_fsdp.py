"""FSDP2 on 2 CPU processes (torchrun, gloo): equal to 1 process at twice the batch, for a
full-model soft and frozen reference and a LoRA policy with a hard one; the sharded
reference's soft and hard updates touch only local shards."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_review_model
from safetensors.torch import load_file
from test_train_preference import free_port

from prefalign.modeling import LoraSpec, load_model, load_tokenizer
from prefalign.toy.corpus import review

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun starts two fresh interpreters per test


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    rng = random.Random(0)
    save_tiny_review_model(root / "model", rng)
    pairs = []
    while len(pairs) < 32:
        prompt, good = review(rng)
        _, bad = review(rng)
        if good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # A saved adapter with non-zero B, so both LoRA runs start from the same, non-trivial policy.
    torch.manual_seed(0)
    lora = load_model(root / "model", device="cpu", lora=LoraSpec(r=4))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora.save_pretrained(root / "lora")
    load_tokenizer(root / "model").save_pretrained(root / "lora")
    return {"model": root / "model", "lora": root / "lora", "pairs": root / "pairs.jsonl"}


def train(tiny, out: Path, model: str, processes: int, *extra: str) -> str:
    launch = [sys.executable, "-m", "prefalign.cli"]
    if processes > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            "-m",
            "prefalign.cli",
        ]
    args = [
        f"model.name_or_path={tiny[model]}",
        f"data.path={tiny['pairs']}",
        f"trainer.out_dir={out}",
        "trainer.max_steps=4",
        "trainer.adam_epsilon=1e-4",
        "trainer.log_every=1",
        "trainer.progress=false",
        *extra,
    ]
    proc = subprocess.run(
        [*launch, "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "model,reference,lr",
    [
        ("model", "reference.mode=soft", "1e-3"),
        (
            "model",
            "reference.mode=frozen",
            "1e-3",
        ),  # with the reference cache, fingerprinted by shards
        (
            "lora",
            "reference.tau=2 reference.mode=hard",
            "1e-2",
        ),  # soft LoRA mixes whole factors: not sharded
    ],
)
def test_fsdp2_two_processes_match_one_process_with_double_batch(
    tiny, tmp_path, model, reference, lr
):
    common = (*reference.split(), f"trainer.lr={lr}")
    train(tiny, tmp_path / "one", model, 1, *common, "trainer.batch_size=8")
    log = train(
        tiny, tmp_path / "two", model, 2, *common, "trainer.batch_size=4", "trainer.fsdp=true"
    )
    assert "FSDP2:" in log and " on process 1" in log
    line = next(x for x in log.splitlines() if x.startswith("FSDP2:"))
    local, total = int(line.split()[1]), int(line.split()[3])
    assert local < total  # each process holds a shard, not the whole model
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    weights = "adapter_model.safetensors" if model == "lora" else "model.safetensors"
    a, b = (
        load_file(tmp_path / "one" / "final" / weights),
        load_file(tmp_path / "two" / "final" / weights),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sharded_reference_update_is_local_and_exact():
    worker = Path(__file__).parent / "fsdp_update_worker.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(worker),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("local update ok") == 2
