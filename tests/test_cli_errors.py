"""User errors on the command line: exit code 2 and one line on stderr naming the problem, never a
traceback. Every case fails before a model is built or a step is trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import save_tiny_llama
from test_bad_inputs import CASES as DATA_CASES
from test_bad_inputs import TOKENIZERS

from prefalign.cli import main

PREFALIGN = Path(sys.executable).with_name("prefalign")  # the console script of this venv


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> str:
    """Run `prefalign *argv` in-process; assert it is a user error and return its one stderr
    line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: some/model\ntrainer:\n  lrr: 0.1\n")
    line = run_cli(capsys, "sft", "--config", str(path))
    assert line.startswith(
        "prefalign sft: error: unknown config key 'trainer.lrr', allowed keys in trainer: "
    )
    assert "batch_size" in line and "schedule" in line and ", lr, " in line


def test_unknown_top_level_key(tmp_path, capsys):
    path = write(tmp_path, "modle:\n  name_or_path: x\n")
    assert run_cli(capsys, "sft", "--config", str(path)) == (
        "prefalign sft: error: unknown config key 'modle', allowed keys: data, model, trainer"
    )


def test_bad_literal_override(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: x\n", name="ok.yaml")
    assert run_cli(capsys, "sft", "--config", str(path), "trainer.schedule=cosin") == (
        "prefalign sft: error: config key 'trainer.schedule': got 'cosin', "
        "allowed: 'constant', 'linear', 'cosine'"
    )


def test_bad_literal_in_file(tmp_path, capsys):
    path = write(tmp_path, "data:\n  truncation: middle\n")
    assert run_cli(capsys, "sft", "--config", str(path)) == (
        "prefalign sft: error: config key 'data.truncation': got 'middle', "
        "allowed: 'keep_end', 'keep_start'"
    )


def test_wrong_type_override(capsys):
    assert run_cli(capsys, "sft", "trainer.batch_size=eight") == (
        "prefalign sft: error: config key 'trainer.batch_size': expected an integer, got 'eight'"
    )


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert run_cli(capsys, "sft", "--config", str(missing)) == (
        f"prefalign sft: error: config file {missing} does not exist"
    )


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: x\ntrainer: [1, 2\n")
    line = run_cli(capsys, "sft", "--config", str(path))
    assert re.match(
        rf"^prefalign sft: error: {re.escape(str(path))}:\d+: not valid YAML \(", line
    ), line


def test_override_without_equals_sign(capsys):
    line = run_cli(capsys, "sft", "trainer.lr", "model.name_or_path=x")
    assert line.startswith("prefalign sft: error: override 'trainer.lr' must look like key=value")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [([], "model.name_or_path"), (["model.name_or_path=some/model"], "data.path")],
)
def test_required_keys(capsys, overrides, key):
    line = run_cli(capsys, "sft", *overrides)
    assert line.startswith(f"prefalign sft: error: config key '{key}' is required")


@pytest.mark.parametrize("command", [["rest"], ["discover"], ["arm", "train"], ["rm", "train"]])
def test_every_config_command_rejects_an_unknown_key(capsys, command):
    line = run_cli(capsys, *command, "no_such_section.key=1")
    assert line.startswith(
        f"prefalign {' '.join(command)}: error: unknown config key 'no_such_section'"
    ), line


def test_train_config_errors(tmp_path, capsys):
    """`train` (implemented in issue 3) checks its config before it loads anything."""
    assert run_cli(capsys, "train", "trainer.schedule=cosin").endswith(
        "error: config key 'trainer.schedule': got 'cosin', allowed: 'constant', 'linear', 'cosine'"
    )
    path = write(tmp_path, "trainer:\n  lrr: 1\n")
    assert run_cli(capsys, "train", "--config", str(path)).startswith(
        "prefalign train: error: unknown config key 'trainer.lrr', allowed keys in trainer: "
    )
    assert run_cli(capsys, "train", "--config", str(tmp_path / "none.yaml")) == (
        f"prefalign train: error: config file {tmp_path / 'none.yaml'} does not exist"
    )


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sft", "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def run_console_script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    assert PREFALIGN.exists(), f"console script {PREFALIGN} is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [str(PREFALIGN), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a fresh interpreter imports torch: 4 s
def test_console_script_unknown_key_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "trainer:\n  schedule: cosine\n  lrr: 0.1\n")
    result = run_console_script("sft", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "prefalign sft: error: unknown config key 'trainer.lrr', allowed keys in trainer: "
    )


# --- the catalogue: bad inputs through the whole command --------------------------------------
# Every case runs `prefalign train` (or `sft`) in-process against a real tiny model and must end
# with exit code 2, one line on stderr naming the file (and line and field) or the config key,
# no traceback, and nothing trained: no checkpoint, no final model, no metrics.

ALIAS_BOMB = """objective:
  params:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""
OVERRIDE_BOMB = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], " + (
    "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], *d, *d]"
)


@dataclass
class ConfigCase:
    """`yaml` (text or bytes) is written to config.yaml and passed with --config; `expected`
    is a substring of the error line, `{config}` standing for that file's path."""

    expected: str
    overrides: tuple[str, ...] = ()
    yaml: str | bytes | None = None
    command: tuple[str, ...] = ("train",)


CONFIG_CASES = {
    # --- the YAML file itself
    "unknown_key_in_file": ConfigCase(
        "unknown config key 'trainer.lrr', allowed keys in trainer:", yaml="trainer:\n  lrr: 1\n"
    ),
    "duplicate_top_level_key": ConfigCase(
        "{config}:3: key 'trainer' given twice (first on line 1)",
        yaml="trainer:\n  lr: 1.0e-5\ntrainer:\n  batch_size: 2\n",
    ),
    "duplicate_nested_key": ConfigCase(
        "{config}:3: key 'lr' given twice (first on line 2)",
        yaml="trainer:\n  lr: 1.0e-5\n  lr: 2.0e-5\n",
    ),
    "duplicate_key_in_flow_mapping": ConfigCase(
        "{config}:1: key 'batch_size' given twice", yaml="trainer: {batch_size: 2, batch_size: 4}\n"
    ),
    "alias_bomb": ConfigCase(
        "{config}:7: aliases expand to more than 10000 values", yaml=ALIAS_BOMB
    ),
    "alias_that_contains_itself": ConfigCase(
        "{config}:3: an alias refers to the value that contains it",
        yaml="objective:\n  params:\n    loop: &x [1, *x]\n",
    ),
    "deeply_nested_yaml": ConfigCase(
        "{config}: nested deeper than 64 levels", yaml="a: " + "[" * 5000 + "]" * 5000 + "\n"
    ),
    "nested_past_the_bound": ConfigCase(
        "{config}:3: nested deeper than 64 levels",
        yaml="objective:\n  params:\n    x: " + "[" * 100 + "]" * 100 + "\n",
    ),
    "invalid_yaml": ConfigCase(
        "{config}:4: not valid YAML (", yaml="model:\n  a: 1\ntrainer: [1, 2\n"
    ),
    "config_not_a_mapping": ConfigCase(
        "{config}: a config must be a mapping of keys to values", yaml="- a\n- b\n"
    ),
    "config_not_utf8": ConfigCase(
        "{config}: not UTF-8 text", yaml=b"trainer:\n  out_dir: caf\xe9\n"
    ),
    # --- trainer bounds
    "max_steps_negative": ConfigCase(
        "config key 'trainer.max_steps': must be at least 0, got -5", ("trainer.max_steps=-5",)
    ),
    "batch_size_zero": ConfigCase(
        "config key 'trainer.batch_size': must be at least 1, got 0", ("trainer.batch_size=0",)
    ),
    "batch_size_negative": ConfigCase(
        "config key 'trainer.batch_size': must be at least 1, got -1", ("trainer.batch_size=-1",)
    ),
    "grad_accum_zero": ConfigCase(
        "config key 'trainer.grad_accum': must be at least 1, got 0", ("trainer.grad_accum=0",)
    ),
    "lr_negative": ConfigCase(
        "config key 'trainer.lr': must be greater than 0, got -1.0", ("trainer.lr=-1",)
    ),
    "lr_zero": ConfigCase("config key 'trainer.lr': must be greater than 0", ("trainer.lr=0",)),
    "lr_nan": ConfigCase(
        "config key 'trainer.lr': must be greater than 0, got nan", ("trainer.lr=.nan",)
    ),
    "epochs_zero": ConfigCase(
        "config key 'trainer.epochs': must be greater than 0", ("trainer.epochs=0",)
    ),
    "warmup_negative": ConfigCase(
        "config key 'trainer.warmup_ratio': must be at least 0", ("trainer.warmup_ratio=-0.1",)
    ),
    "log_every_zero": ConfigCase(
        "config key 'trainer.log_every': must be at least 1", ("trainer.log_every=0",)
    ),
    "adam_beta_above_one": ConfigCase(
        "config key 'trainer.adam_beta1': must be less than 1, got 1.5", ("trainer.adam_beta1=1.5",)
    ),
    "warmup_above_one": ConfigCase(
        "config key 'trainer.warmup_ratio': must be at most 1, got 2.0", ("trainer.warmup_ratio=2",)
    ),
    "lora_rank_zero": ConfigCase(
        "config key 'model.lora.r': must be at least 1, got 0", ("model.lora.r=0",)
    ),
    "lora_dropout_one": ConfigCase(
        "config key 'model.lora.dropout': must be less than 1", ("model.lora.dropout=1",)
    ),
    "reference_alpha_above_one": ConfigCase(
        "config key 'reference.alpha': must be at most 1, got 2.0",
        ("reference.mode=soft", "reference.alpha=2"),
    ),
    "reference_period_zero": ConfigCase(
        "config key 'reference.period': must be at least 1, got 0",
        ("reference.mode=soft", "reference.period=0"),
    ),
    "batch_size_a_word": ConfigCase(
        "config key 'trainer.batch_size': expected an integer, got 'eight'",
        ("trainer.batch_size=eight",),
    ),
    "max_steps_a_fraction": ConfigCase(
        "config key 'trainer.max_steps': expected an integer, got 1.5", ("trainer.max_steps=1.5",)
    ),
    "schedule_misspelt": ConfigCase(
        "config key 'trainer.schedule': got 'cosin', allowed:", ("trainer.schedule=cosin",)
    ),
    # --- data settings
    "truncation_unknown": ConfigCase(
        "config key 'data.truncation': got 'middle', allowed:", ("data.truncation=middle",)
    ),
    "max_length_one": ConfigCase(
        "config key 'data.max_length': must be at least 2, got 1", ("data.max_length=1",)
    ),
    "max_prompt_length_zero": ConfigCase(
        "config key 'data.max_prompt_length': must be at least 1, got 0",
        ("data.max_prompt_length=0",),
    ),
    "skip_invalid_not_a_bool": ConfigCase(
        "config key 'data.skip_invalid': expected true or false, got 'maybe'",
        ("data.skip_invalid=maybe",),
    ),
    "data_path_looks_like_a_hub_id": ConfigCase(
        "mydataset: no such file or directory (a Hugging Face Hub dataset? write hf:mydataset)",
        ("data.path=mydataset",),
    ),
    "data_path_missing": ConfigCase(
        "missing.jsonl: no such file or directory", ("data.path={tmp}/missing.jsonl",)
    ),
    "data_path_empty": ConfigCase(
        "config key 'data.path': expected a string, got None", ("data.path=",)
    ),
    "eval_path_missing": ConfigCase(
        "missing_eval.jsonl: no such file or directory",
        ("data.eval_path={tmp}/missing_eval.jsonl",),
    ),
    # --- model, objective, reference
    "model_directory_missing": ConfigCase(
        "model {tmp}/no_model: no such directory", ("model.name_or_path={tmp}/no_model",)
    ),
    "model_dtype_unknown": ConfigCase(
        "config key 'model.dtype': got 'float8', allowed:", ("model.dtype=float8",)
    ),
    "objective_unknown": ConfigCase(
        "config key 'objective.name': unknown objective 'nope'; known:", ("objective.name=nope",)
    ),
    "objective_param_a_word": ConfigCase(
        "config key 'objective.params.beta': expected a number (default 0.1), got 'high'",
        ("objective.params.beta=high",),
    ),
    "objective_param_unknown": ConfigCase(
        "config key 'objective.params.bogus': objective 'dpo' has no parameter 'bogus'",
        ("objective.params.bogus=1",),
    ),
    "objective_param_infinite": ConfigCase(
        "config key 'objective.params.beta': expected a finite number",
        ("objective.params.beta=.inf",),
    ),
    "objective_code_missing": ConfigCase(
        "user objective file not found: {tmp}/nope.py", ("objective.code={tmp}/nope.py:loss",)
    ),
    "reference_mode_unknown": ConfigCase(
        "config key 'reference.mode': got 'sometimes', allowed:", ("reference.mode=sometimes",)
    ),
    "reference_needed_but_none": ConfigCase(
        "objective 'dpo' needs a reference policy; reference.mode 'none'", ("reference.mode=none",)
    ),
    # --- the command line
    "override_without_equals": ConfigCase(
        "override 'trainer.lr' must look like key=value", ("trainer.lr",)
    ),
    "override_alias_bomb": ConfigCase(
        "override objective.params.x: aliases expand to more than 10000 values",
        (f"objective.params.x={OVERRIDE_BOMB}",),
    ),
    "override_unknown_section": ConfigCase(
        "unknown config key 'no_such_section', allowed keys:", ("no_such_section.key=1",)
    ),
    "sft_batch_size_zero": ConfigCase(
        "config key 'trainer.batch_size': must be at least 1, got 0",
        ("trainer.batch_size=0",),
        command=("sft",),
    ),
    "rm_train_data_hub_looking_name": ConfigCase(
        "mydataset: no such file or directory (a Hugging Face Hub dataset? write hf:mydataset)",
        ("data.path=mydataset",),
        command=("rm", "train"),
    ),
    "rm_train_lr_negative": ConfigCase(
        "config key 'trainer.lr': must be greater than 0",
        ("trainer.lr=-1",),
        command=("rm", "train"),
    ),
    "arm_train_max_steps_negative": ConfigCase(
        "config key 'trainer.max_steps': must be at least 0, got -1",
        ("trainer.max_steps=-1",),
        command=("arm", "train"),
    ),
    "arm_train_duplicate_key": ConfigCase(
        "{config}:3: key 'data' given twice (first on line 1)",
        yaml="data:\n  skip_invalid: true\ndata:\n  max_length: 64\n",
        command=("arm", "train"),
    ),
    "sft_data_hub_looking_name": ConfigCase(
        "mydataset: no such file or directory (a Hugging Face Hub dataset? write hf:mydataset)",
        ("data.path=mydataset",),
        command=("sft",),
    ),
}

DATA_COMMANDS = {
    "preference": ("train",),
    "unpaired": ("train", "objective.name=kto"),
    "sft": ("sft",),
}
CLI_DATA_CASES = {k: c for k, c in DATA_CASES.items() if c.tokenizer is not None}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama saved beside each tokenizer of the data catalogue."""
    dirs = {}
    for name, tokenizer in TOKENIZERS.items():
        dirs[name] = save_tiny_llama(tmp_path_factory.mktemp(f"model_{name}"), tokenizer)
    return dirs


@pytest.fixture
def good_pairs(tmp_path: Path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": "one two", "chosen": f"three {w}", "rejected": "four"}) + "\n"
            for w in ("five", "six", "seven", "one")
        )
    )
    return path


def assert_refused(capsys, argv: list[str], out_dir: Path, command: str | None = None) -> str:
    """Exit 2, one stderr line, no traceback, nothing trained; returns the line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured
    assert lines[0].startswith(f"prefalign {command or argv[0]}: error: ")
    for trained in ("checkpoints", "final", "metrics.jsonl"):
        assert not (out_dir / trained).exists(), trained
    return lines[0]


def base_overrides(model: Path, data: Path, out_dir: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"data.path={data}",
        f"trainer.out_dir={out_dir}",
        "trainer.batch_size=2",
        "trainer.max_steps=1",
        "trainer.progress=false",
    ]


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_is_refused_before_training(
    tmp_path: Path, capsys, monkeypatch, model_dirs, good_pairs, name: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = CONFIG_CASES[name]
    out_dir = tmp_path / "run"
    data = good_pairs
    if case.command == ("sft",):
        data = tmp_path / "sft.jsonl"
        data.write_text(json.dumps({"prompt": "one", "completion": "two"}) + "\n")
    argv = [*case.command]
    config = tmp_path / "config.yaml"
    if case.yaml is not None:
        config.write_bytes(case.yaml if isinstance(case.yaml, bytes) else case.yaml.encode())
        argv += ["--config", str(config)]
    argv += base_overrides(model_dirs["plain"], data, out_dir)
    argv += [o.replace("{tmp}", str(tmp_path)) for o in case.overrides]
    line = assert_refused(capsys, argv, out_dir, " ".join(case.command))
    expected = case.expected.replace("{config}", str(config)).replace("{tmp}", str(tmp_path))
    assert expected in line, line


@pytest.mark.parametrize("name", list(CLI_DATA_CASES))
def test_bad_data_is_refused_before_training(
    tmp_path: Path, capsys, monkeypatch, model_dirs, name: str
) -> None:
    """The data catalogue of test_bad_inputs.py, through `prefalign train` / `sft`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = CLI_DATA_CASES[name]
    path = tmp_path / case.file
    path.write_bytes(case.file_content())
    out_dir = tmp_path / "run"
    command = DATA_COMMANDS[case.kind]
    argv = [command[0], *base_overrides(model_dirs[case.tokenizer], path, out_dir), *command[1:]]
    line = assert_refused(capsys, [*argv, *case.cli], out_dir)
    assert f"error: {tmp_path}/" in line  # the file, by its full path
    assert (case.cli_expected or case.expected) in line, line


def test_the_catalogue_tries_enough_bad_inputs() -> None:
    assert len(CONFIG_CASES) + len(CLI_DATA_CASES) >= 40


@pytest.mark.slow  # three fresh interpreters import torch: about 15 s
@pytest.mark.parametrize(
    ("yaml", "overrides", "expected"),
    [
        (ALIAS_BOMB, (), "aliases expand to more than 10000 values"),
        (None, ("trainer.max_steps=-5",), "config key 'trainer.max_steps': must be at least 0"),
        (None, ("data.path={bad}",), "bad.jsonl:1: string holds a lone UTF-16 surrogate"),
    ],
)
def test_console_script_refuses_bad_inputs_in_one_line(
    tmp_path: Path, model_dirs, good_pairs, yaml, overrides, expected
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}\n')
    out_dir = tmp_path / "run"
    argv = ["train", *base_overrides(model_dirs["plain"], good_pairs, out_dir)]
    if yaml is not None:
        argv += ["--config", str(write(tmp_path, yaml))]
    argv += [o.replace("{bad}", str(bad)) for o in overrides]
    result = run_console_script(*argv, cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (out_dir / "checkpoints").exists() and not (out_dir / "final").exists()


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "one"}\n{"prompt": "two \\ud800"}\n', "prompts.jsonl:2: string holds a lone"),
        (
            '{"prompt": "one"}\n{"text": "two"}\n',
            "prompts.jsonl:2: expected an object with a string",
        ),
        (
            '{"prompt": ' + "[" * 10_000 + "]" * 10_000 + "}\n",
            "prompts.jsonl:1: JSON nested deeper",
        ),
    ],
)
def test_bad_prompt_files_are_one_line_errors(
    tmp_path: Path, capsys, model_dirs, command: str, content: str, expected: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    model = str(model_dirs["plain"])
    out = tmp_path / "out.jsonl"
    if command == "generate":
        argv = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out)]
    else:
        argv = [
            "eval",
            "--model",
            model,
            "--reference",
            model,
            "--task",
            "toy:sentiment",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
        ]
    line = assert_refused(capsys, argv, tmp_path / "run")
    assert f"{tmp_path}/{expected}" in line, line
    assert not out.exists()


@pytest.mark.parametrize("where", ["--model", "--arm", "gguf:"])
def test_a_directory_that_holds_no_model_is_a_one_line_error(
    tmp_path: Path, capsys, model_dirs, where: str
) -> None:
    """A directory without a checkpoint (an empty one, or named like a GGUF file) ended in
    transformers' ValueError traceback ("Unrecognized model in ..."); `gguf:DIR` was called
    "no such GGUF file" though it exists."""
    empty = tmp_path / "weights.gguf"
    empty.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\n")
    model = str(model_dirs["plain"])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out)]
    if where == "--model":
        argv[2] = str(empty)
    elif where == "--arm":
        argv += ["--arm", str(empty)]
    else:
        argv[2] = f"gguf:{empty}"
    line = assert_refused(capsys, argv, tmp_path / "run")
    assert str(empty) in line, line
    expected = "is a directory, not a GGUF file" if where == "gguf:" else "no model files in it"
    assert expected in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_empty_prompt_for_a_tokenizer_without_bos_names_the_file_and_prompt(
    tmp_path: Path, capsys, command: str
) -> None:
    """It was a bare "prompt '' encodes to no tokens", naming neither the file nor which, and
    came after every model had loaded."""
    from conftest import trained_word_tokenizer

    model = save_tiny_llama(tmp_path / "model", trained_word_tokenizer(["one two"], bos=False))
    capsys.readouterr()  # the save's progress bar
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": ""}\n')
    out = tmp_path / "out.jsonl"
    argv = [command, "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
    if command == "eval":
        argv += ["--reference", str(model), "--task", "toy:sentiment"]
    line = assert_refused(capsys, argv, tmp_path / "run")
    assert f"{prompts}: prompt 2 ('') encodes to no tokens" in line, line
    assert "adds no BOS" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "override,key,words",
    [
        ("generations=-1", "generations", "at least 0"),
        ("candidates_per_generation=0", "candidates_per_generation", "at least 1"),
        ("sandbox.timeout_s=0", "sandbox.timeout_s", "greater than 0"),
        ("sandbox.train_memory_mb=0", "sandbox.train_memory_mb", "at least 1"),
        ("proxy.steps=0", "proxy.steps", "at least 1"),
        ("proxy.lr=-1", "proxy.lr", "greater than 0"),
        ("proxy.samples_per_prompt=0", "proxy.samples_per_prompt", "at least 1"),
        ("proxy.fitness.kl_budget=-1", "proxy.fitness.kl_budget", "at least 0"),
        ("proposer.max_retries=-1", "proposer.max_retries", "at least 0"),
        ("proposer.max_tokens=0", "proposer.max_tokens", "at least 1"),
    ],
)
def test_out_of_range_discovery_settings_are_refused_naming_the_key(
    tmp_path: Path, capsys, override: str, key: str, words: str
) -> None:
    """These ran: a 0 s sandbox rejected every candidate, 0 proxy steps scored the untrained
    policy, a negative KL budget made every candidate infeasible; and the two counts' message
    named no key. Nothing is written for a refused config."""
    out = tmp_path / "run"
    line = assert_refused(capsys, ["discover", f"out_dir={out}", override], out)
    assert line.startswith(f"prefalign discover: error: config key '{key}': must be {words}, got")
    assert not out.exists()


def test_a_hub_dataset_that_cannot_be_loaded_is_a_one_line_error(
    tmp_path: Path, capsys, monkeypatch, model_dirs
) -> None:
    """Offline (or for a name the Hub does not have) `datasets` raised ConnectionError and the
    command ended in its traceback."""
    import datasets
    import huggingface_hub

    # Offline from the start (the variable is read at import): no wait on unreachable hosts.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out_dir = tmp_path / "run"
    hub = Path("hf:no-owner/no-such-set")  # as the config spells it
    argv = ["train", *base_overrides(model_dirs["plain"], hub, out_dir)]
    line = assert_refused(capsys, argv, out_dir)
    assert "hf:no-owner/no-such-set: cannot load it from the Hugging Face Hub" in line, line


@pytest.mark.parametrize("option", ["--samples-per-prompt", "--max-new-tokens"])
def test_eval_counts_below_one_are_refused(tmp_path: Path, capsys, model_dirs, option) -> None:
    """`--samples-per-prompt 0` printed NaN figures for n = 0 samples and exited 0."""
    model = str(model_dirs["plain"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\n")
    argv = ["eval", "--model", model, "--reference", model, "--task", "toy:sentiment",
            "--prompts", str(prompts), option, "0"]  # fmt: skip
    line = assert_refused(capsys, argv, tmp_path / "run")
    assert line == f"prefalign eval: error: {option} must be at least 1, got 0", line


def test_a_refused_discovery_proposer_leaves_no_run_directory(tmp_path: Path, capsys, monkeypatch):
    """run.json was written before the proposer was checked."""
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    out = tmp_path / "run"
    argv = ["discover", f"out_dir={out}", "proposer.kind=llm",
            "proposer.api_key_env=NO_SUCH_KEY_VARIABLE", "proxy.task=synthetic"]  # fmt: skip
    line = assert_refused(capsys, argv, out)
    assert "NO_SUCH_KEY_VARIABLE" in line, line
    assert not out.exists()
