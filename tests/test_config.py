"""prefalign.config: YAML + dotted overrides validated against a dataclass schema, with one-line
errors that name the dotted key and what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from prefalign.config import ConfigError, dump_yaml, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Adapter:
    r: int = 8
    targets: list[str] = field(default_factory=list)


@dataclass
class Model:
    name: str = ""
    adapter: Adapter | None = None


@dataclass
class Schema:
    name: str = "run"
    steps: int = 10
    scale: float = 1.0
    verbose: bool = False
    precision: Literal["no", "bf16", "fp16"] = "no"
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    model: Model = field(default_factory=Model)
    extra: dict[str, float] = field(default_factory=dict)
    note: str | None = None


@dataclass
class Required:
    path: str
    size: int = 1


TOP_KEYS = "extra, model, name, note, optim, precision, scale, steps, tags, verbose"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expect_config_error(*args, match: str | None = None) -> str:
    """The message of the ConfigError that load_config(*args) raises; always one line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    if match is not None:
        assert re.search(match, message), message
    return message


def expect_override_error(*overrides: str, match: str | None = None) -> str:
    return expect_config_error(Schema, None, list(overrides), match=match)


def test_defaults_without_file_or_overrides():
    assert load_config(Schema) == Schema()
    assert load_config(Schema, None, []) == Schema()


def test_yaml_file_with_overrides(tmp_path):
    path = write(
        tmp_path,
        """
name: first
steps: 3
tags: [a, b]
optim:
  lr: 0.5
  schedule: cosine
model:
  name: tiny
  adapter:
    r: 4
    targets: [q_proj, v_proj]
extra:
  temperature: 0.7
""",
    )
    config = load_config(
        Schema, path, ["optim.lr=0.25", "model.adapter.r=16", "--steps=7", "verbose=true"]
    )
    assert config == Schema(
        name="first",
        steps=7,
        verbose=True,
        tags=["a", "b"],
        optim=Optim(lr=0.25, schedule="cosine"),  # betas keeps its default
        model=Model(name="tiny", adapter=Adapter(r=16, targets=["q_proj", "v_proj"])),
        extra={"temperature": 0.7},
    )
    assert isinstance(config.optim, Optim) and isinstance(config.model.adapter, Adapter)


def test_overrides_alone_build_nested_and_optional_sections():
    config = load_config(
        Schema,
        None,
        ["model.adapter.r=3", "optim.betas=[0.5, 0.6]", "extra.top_p=0.9", "tags=[x]", "name=a=b"],
    )
    assert config.model.adapter == Adapter(r=3)
    assert config.optim.betas == [0.5, 0.6]
    assert config.extra == {"top_p": 0.9}
    assert config.tags == ["x"]
    assert config.name == "a=b"  # only the first '=' separates key and value


def test_later_overrides_win_and_empty_value_is_null(tmp_path):
    path = write(tmp_path, "note: hello\nsteps: 1\n")
    config = load_config(Schema, path, ["steps=2", "steps=5", "note="])
    assert config.steps == 5 and config.note is None
    assert load_config(Schema, None, ["note=null"]).note is None
    assert load_config(Schema, path).note == "hello"


def test_int_becomes_float():
    config = load_config(
        Schema, None, ["scale=2", "optim.lr=1", "optim.betas=[1, 0.5]", "extra.k=3"]
    )
    assert config.scale == 2.0 and type(config.scale) is float
    assert type(config.optim.lr) is float
    assert [type(b) for b in config.optim.betas] == [float, float]
    assert config.extra == {"k": 3.0} and type(config.extra["k"]) is float


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; it is a number for a float field
    assert load_config(Schema, None, ["optim.lr=1e-5"]).optim.lr == pytest.approx(1e-5)
    assert load_config(Schema, write(tmp_path, "scale: 3e2\n")).scale == 300.0
    expect_override_error(
        "scale=fast", match=r"^config key 'scale': expected a number, got 'fast'$"
    )


def test_unknown_top_level_key_names_it_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, "name: x\nstepz: 3\n")
    expect_config_error(
        Schema, path, match=rf"^unknown config key 'stepz', allowed keys: {TOP_KEYS}$"
    )
    expect_override_error(
        "stepz=3", match=rf"^unknown config key 'stepz', allowed keys: {TOP_KEYS}$"
    )


def test_unknown_nested_key_names_the_dotted_key(tmp_path):
    expect_override_error(
        "optim.lrr=1",
        match=r"^unknown config key 'optim\.lrr', allowed keys in optim: betas, lr, schedule$",
    )
    path = write(tmp_path, "model:\n  adapter:\n    rank: 4\n")
    expect_config_error(
        Schema,
        path,
        match=(
            r"^unknown config key 'model\.adapter\.rank', "
            r"allowed keys in model\.adapter: r, targets$"
        ),
    )


def test_bad_literal_names_the_allowed_values(tmp_path):
    expect_override_error(
        "optim.schedule=cosin",
        match=(
            r"^config key 'optim\.schedule': got 'cosin', "
            r"allowed: 'constant', 'linear', 'cosine'$"
        ),
    )
    expect_config_error(
        Schema,
        write(tmp_path, "precision: bf32\n"),
        match=r"^config key 'precision': got 'bf32', allowed: 'no', 'bf16', 'fp16'$",
    )


def test_literal_no_is_not_read_as_false(tmp_path):
    # YAML 1.1 reads a bare `no` as false; a Literal that allows "no" takes it back
    assert load_config(Schema, None, ["precision=bf16", "precision=no"]).precision == "no"
    assert load_config(Schema, write(tmp_path, "precision: no\n")).precision == "no"
    assert load_config(Schema, None, ["optim.schedule=linear"]).optim.schedule == "linear"
    expect_override_error(
        "optim.schedule=no", match=r"^config key 'optim\.schedule': got False, allowed: "
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", r"config key 'steps': expected an integer, got 'ten'"),
        ("steps=2.5", r"config key 'steps': expected an integer, got 2\.5"),
        ("steps=true", r"config key 'steps': expected an integer, got True"),
        ("verbose=1", r"config key 'verbose': expected true or false, got 1"),
        ("verbose=maybe", r"config key 'verbose': expected true or false, got 'maybe'"),
        ("scale=false", r"config key 'scale': expected a number, got False"),
        ("name=[1]", r"config key 'name': expected a string, got \[1\]"),
        ("tags=a", r"config key 'tags': expected a list, got 'a'"),
        ("tags=[a, [b]]", r"config key 'tags\[1\]': expected a string, got \['b'\]"),
        ("optim.betas=[0.9, x]", r"config key 'optim\.betas\[1\]': expected a number, got 'x'"),
        ("optim=3", r"config key 'optim': expected a mapping, got int"),
        ("model.adapter=5", r"config key 'model\.adapter': expected a mapping, got int"),
        ("model.adapter.r=big", r"config key 'model\.adapter\.r': expected an integer, got 'big'"),
        ("extra=[1]", r"config key 'extra': expected a mapping, got \[1\]"),
        ("extra.k=hot", r"config key 'extra\.k': expected a number, got 'hot'"),
    ],
)
def test_wrong_types_name_the_key(override, message):
    expect_override_error(override, match=f"^{message}$")


def test_wrong_type_in_yaml_file(tmp_path):
    expect_config_error(
        Schema,
        write(tmp_path, "optim:\n  lr: fast\n"),
        match=r"^config key 'optim\.lr': expected a number, got 'fast'$",
    )


@pytest.mark.parametrize("bad", ["steps", "=3", "optim.lr"])
def test_override_without_equals_sign(bad):
    expect_override_error(bad, match=rf"^override '{re.escape(bad)}' must look like key=value")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    expect_config_error(
        Schema, missing, match=rf"^config file {re.escape(str(missing))} does not exist$"
    )


def test_directory_instead_of_file(tmp_path):
    expect_config_error(
        Schema, tmp_path, match=rf"^config file {re.escape(str(tmp_path))} is not a file$"
    )


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: ok\nsteps: 3\noptim: {lr: 1\n  schedule: linear: x\n")
    message = expect_config_error(Schema, path)
    assert re.match(rf"^{re.escape(str(path))}:4: not valid YAML \(.+\)$", message), message

    path = write(tmp_path, "name: ok\n\ttabbed: 1\n", name="tabs.yaml")
    assert re.match(
        rf"^{re.escape(str(path))}:2: not valid YAML", expect_config_error(Schema, path)
    )


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    expect_config_error(
        Schema,
        path,
        match=rf"^{re.escape(str(path))}: a config must be a mapping of keys to values$",
    )


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(Schema, write(tmp_path, "")) == Schema()
    assert load_config(
        Schema, write(tmp_path, "# only a comment\n", name="c.yaml"), ["steps=4"]
    ) == Schema(steps=4)


def test_missing_required_key_is_a_config_error():
    assert load_config(Required, None, ["path=data.jsonl"]) == Required(path="data.jsonl")
    expect_config_error(Required, None, ["size=2"], match=r"^config key 'path' is required$")


def test_non_string_keys_are_unknown_keys(tmp_path):
    expect_config_error(
        Schema, write(tmp_path, "1: a\nzzz: b\n"), match=r"^unknown config key '1', allowed keys: "
    )


def test_dump_yaml_round_trips(tmp_path):
    config = load_config(
        Schema, None, ["model.adapter.targets=[q]", "extra.a=0.5", "optim.lr=2e-4", "note=n"]
    )
    dump_yaml(config, tmp_path / "dumped.yaml")
    assert load_config(Schema, tmp_path / "dumped.yaml") == config


@dataclass
class Loose:
    items: list = field(default_factory=list)
    table: dict = field(default_factory=dict)


def test_bare_list_and_dict_annotations_are_still_checked():
    assert load_config(Loose, None, ["items=[1, a]", "table={k: [1]}"]) == Loose(
        items=[1, "a"], table={"k": [1]}
    )
    expect_config_error(
        Loose, None, ["items=3"], match=r"^config key 'items': expected a list, got 3$"
    )
    expect_config_error(
        Loose, None, ["table=3"], match=r"^config key 'table': expected a mapping, got 3$"
    )


@dataclass
class Inner:
    name: str = "plain"
    size: int = 1
    params: dict = field(default_factory=dict)


@dataclass
class Outer:
    tuned: Inner = field(default_factory=lambda: Inner(name="tuned", size=5, params={"a": 1}))
    optional: Inner | None = None


def test_a_partial_nested_override_starts_from_the_fields_own_default():
    config = load_config(Outer, None, ["tuned.size=7"])
    assert (config.tuned.name, config.tuned.size, config.tuned.params) == ("tuned", 7, {"a": 1})
    # A mapping-valued leaf is replaced, not merged: the user's params are the params.
    assert load_config(Outer, None, ["tuned.params={b: 2}"]).tuned.params == {"b": 2}
    # With no default instance, the schema's own defaults fill in.
    assert load_config(Outer, None, ["optional.size=3"]).optional == Inner(size=3)
    assert load_config(Outer).tuned == Inner(name="tuned", size=5, params={"a": 1})


def test_arm_config_keeps_its_objective_when_only_params_are_set():
    from prefalign.genarm.arm import ArmConfig

    config = load_config(ArmConfig, None, ["objective.params={beta_r: 0.02}"])
    assert config.objective.name == "genarm" and config.objective.params == {"beta_r": 0.02}
