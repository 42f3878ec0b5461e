"""`prefalign arm train` and `prefalign generate`, as functions of parsed arguments.

`prefalign.cli` owns the parser and wires these in; they raise ValueError / ConfigError /
FileNotFoundError for mistakes a user can fix, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefalign import io
from prefalign.config import ConfigError, load_config
from prefalign.io import FileContentError


def run_arm_train_cli(args: argparse.Namespace, config=None) -> int:
    """Train an ARM from `--config` and `key=value` overrides; print the result as JSON."""
    from prefalign.genarm.arm import ArmConfig, train_arm

    config = config or load_config(
        ArmConfig, args.config, list(getattr(args, "overrides", None) or [])
    )
    # stdout carries the JSON result only: progress lines go to stderr.
    resume = bool(getattr(args, "resume", False))
    result = train_arm(config, resume=resume, log=lambda *a: print(*a, file=sys.stderr))
    last = result.train.history[-1] if result.train.history else {}
    print(
        json.dumps(
            {
                "steps": result.train.steps,
                "seconds": round(result.train.seconds, 1),
                "final": str(result.model_path),
                "pair_accuracy": result.pair_accuracy,
                "initial_pair_accuracy": result.initial_pair_accuracy,
                **last,
            },
            indent=2,
        )
    )
    return 0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file of {"prompt": ...} rows, or a text file with one per line."""
    return io.read_prompts(path, label="--prompts")


def arm_weights(arms: list[str], alphas: list[float]) -> list[float]:
    """One weight per ARM: given in the same order, or 1.0 for every ARM when none is given."""
    if not alphas:
        return [1.0] * len(arms)
    if len(alphas) != len(arms):
        raise ConfigError(
            f"got {len(arms)} --arm and {len(alphas)} --alpha: "
            "give one --alpha per --arm (or none for 1.0 each)"
        )
    return alphas


def run_generate_cli(args: argparse.Namespace) -> int:
    """Guided (or plain, with no --arm) generation of a prompts file into a JSONL of responses."""
    from prefalign.genarm.decoding import guided_generate, load_arm
    from prefalign.generation import SamplingParams, check_prompts
    from prefalign.modeling import load_model, load_tokenizer

    arm_paths = list(args.arm or [])
    alphas = arm_weights(arm_paths, [float(a) for a in (args.alpha or [])])
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise FileContentError(f"prompts file {args.prompts} holds no prompts")
    tokenizer = load_tokenizer(args.model)
    check_prompts(tokenizer, prompts, args.prompts)
    base = load_model(args.model).eval()
    device = str(next(base.parameters()).device)
    arms = [
        load_arm(path, alpha, device=device) for path, alpha in zip(arm_paths, alphas, strict=True)
    ]
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    check_params(params)
    generations = guided_generate(base, arms, tokenizer, prompts, params)
    out = io.write_jsonl(
        args.out,
        ({"prompt": p, "response": g.text} for p, g in zip(prompts, generations, strict=True)),
    )
    print(f"wrote {len(generations)} responses to {out}", file=sys.stderr)
    return 0


def check_params(params) -> None:
    if params.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if params.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 disables), got {params.top_k}")
    if not 0 < params.top_p <= 1:
        raise ConfigError(f"--top-p must lie in (0, 1], got {params.top_p}")
    if params.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {params.batch_size}")
