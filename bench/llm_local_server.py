"""What a local llama.cpp server with SmolLM2-135M-Instruct does as discovery proposer and judge.

    python bench/llm_local_server.py [--proposals 12] [--prompts 10] [--out DIR]

Starts the server on 127.0.0.1 (prefalign.llm_server: 1 thread, n_ctx 4096), asks for
`--proposals` objectives (synthetic proxy, one generation, registry baselines in the prompt)
with and without JSON mode, and judges `--prompts` pairs of a clearly good and a clearly bad
answer in both orders, with and without JSON mode. Prints how many proposals became valid
candidates (and why the others failed), how many verdicts parsed, and the win rate of the good
answers (1.0 is a judge that is always right; 0.5 is chance).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefalign import llm_server  # noqa: E402
from prefalign.discovery.recipe import DiscoverConfig, ProposerSpec, ProxySpec, run_discover  # noqa: E402
from prefalign.evaluation.judge import JudgeConfig, judge_pairwise  # noqa: E402

PAIRS = [
    ("Name a fruit.", "An apple.", "I like trains."),
    ("What is 2 + 2?", "2 + 2 is 4.", "Seventeen, probably."),
    ("Say hello.", "Hello!", "No."),
    ("Name a colour.", "Blue.", "The number nine."),
    ("What is the capital of France?", "Paris.", "Bananas are yellow."),
    ("Translate 'thank you' into French.", "Merci.", "Dog."),
    ("What day comes after Monday?", "Tuesday.", "Purple."),
    ("How many legs does a cat have?", "Four.", "Cats are birds with two legs."),
    ("Spell the word 'cat'.", "C-A-T.", "Ninety."),
    ("What is water made of?", "Hydrogen and oxygen (H2O).", "Cheese."),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proposals", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="llm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = llm_server.start(port=port, log_path=out / "server.log", alias="smollm2")
    url = f"http://127.0.0.1:{port}/v1"
    report: dict = {}
    try:
        for json_mode in (True, False):
            start = time.perf_counter()
            config = DiscoverConfig(
                out_dir=str(out / f"discover-json{int(json_mode)}"), generations=1,
                candidates_per_generation=args.proposals,
                proposer=ProposerSpec(kind="llm", base_url=url, model="smollm2",
                                      api_key_env="NONE", max_retries=1, timeout_s=180,
                                      max_tokens=384, json_mode=json_mode, max_prompt_chars=9000),
                proxy=ProxySpec(task="synthetic"),
            )  # fmt: skip
            archive = run_discover(config, log=lambda *_: None)
            proposals = [r for r in archive.load() if r["generation"] == 0]
            reasons = Counter(_kind(r["reason"]) for r in proposals if not r["valid"])
            report[f"proposer_json_mode_{json_mode}"] = {
                "proposals": len(proposals), "valid": sum(r["valid"] for r in proposals),
                "failures": dict(reasons), "seconds": round(time.perf_counter() - start, 1),
            }  # fmt: skip
        prompts, good, bad = (list(x) for x in zip(*PAIRS[: args.prompts], strict=True))
        for json_mode in (False, True):
            start = time.perf_counter()
            judge = JudgeConfig(base_url=url, model="smollm2", api_key_env="NONE",
                                concurrency=1, max_retries=2, timeout_s=180, max_tokens=160,
                                json_mode=json_mode, cache_dir=out / "verdicts",
                                n_bootstrap=200)  # fmt: skip
            result = judge_pairwise(prompts, good, bad, judge)
            summary = result.summary()
            report[f"judge_json_mode_{json_mode}"] = {
                "verdicts_asked": 2 * len(prompts), "parsed": 2 * len(prompts) - result.unparsed
                - result.failed, "unparsed": result.unparsed, "failed": result.failed,
                "requests": result.requests, "good_answer_win_rate": summary["win_rate"],
                "position_consistency": summary["position_consistency"],
                "seconds": round(time.perf_counter() - start, 1),
            }  # fmt: skip
    finally:
        llm_server.stop(proc)
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))


def _kind(reason: str | None) -> str:
    """A failure reason without its details, to count kinds."""
    text = (reason or "").split(":")[0]
    return text[:60]


if __name__ == "__main__":
    main()
