"""YAML configs checked against dataclass schemas, with `a.b=value` overrides from the command line.

Every key is validated: an unknown key, a value of the wrong type or out of its bounds
(`bounded(8, min=1)`) is a `ConfigError` whose one line names the key and what is allowed, e.g.
`config key 'trainer.schedule': got 'cosin', allowed: 'constant', 'linear', 'cosine'`.

YAML is read strictly: a key given twice in one mapping, nesting deeper than `MAX_DEPTH`, or
aliases that expand to more than `MAX_YAML_NODES` values (an "alias bomb": a few hundred bytes
that expand to gigabytes) are refused at load time, naming the file and line.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from prefalign.errors import UserError
from prefalign.io import MAX_DEPTH

T = TypeVar("T")

# A real config has a few hundred values; the bound leaves room for long lists of them.
MAX_YAML_NODES = 10_000


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message is one line meant for the user."""


def bounded(
    default: Any,
    *,
    min: float | None = None,
    gt: float | None = None,
    max: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose config value must be >= `min`, > `gt`, <= `max`, < `lt`
    (those given), checked on load with an error naming the key."""
    return dataclasses.field(default=default, metadata={"min": min, "gt": gt, "max": max, "lt": lt})


BOUNDS = (
    ("min", lambda v, b: v >= b, "at least"),
    ("gt", lambda v, b: v > b, "greater than"),
    ("max", lambda v, b: v <= b, "at most"),
    ("lt", lambda v, b: v < b, "less than"),
)


def check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return  # None for an optional field; the type check has run already
    for name, holds, words in BOUNDS:
        bound = f.metadata.get(name)
        if bound is not None and not holds(value, bound):  # NaN holds no bound
            raise ConfigError(f"config key '{key}': must be {words} {bound}, got {value!r}")


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: T | None = None,
) -> T:
    """Read YAML from `path` (if given) over `base` (a schema instance giving other defaults),
    apply `key.sub=value` overrides, validate into `schema`."""
    raw: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
        loaded = read_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        merge(raw, loaded or {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. trainer.lr=1e-5)")
        key = key.lstrip("-")
        set_dotted(raw, key, read_yaml(value, f"override {key}") if value != "" else None)
    return build(schema, raw, prefix="")


class StrictYamlError(yaml.YAMLError):
    def __init__(self, problem: str, node: yaml.Node) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, node.start_mark


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last
    silently, dropping a whole block of a config)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if first is not None:
                raise StrictYamlError(f"key {key!r} given twice (first on line {first})", key_node)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML strictly (see the module docstring); errors are `ConfigError`s naming `where`
    (a file, or an override) and the line."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark and not where.startswith("override") else ""
        problem = getattr(err, "problem", None) or err
        what = problem if isinstance(err, StrictYamlError) else f"not valid YAML ({problem})"
        raise ConfigError(f"{where}{line}: {what}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand beyond `MAX_YAML_NODES` values or `MAX_DEPTH`
    levels, or refer to themselves. The parser shares aliased nodes, so the bomb only goes
    off later (copying, saving config.json): count the values as if written out."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise StrictYamlError(f"nested deeper than {MAX_DEPTH} levels", node)
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise StrictYamlError("an alias refers to the value that contains it", node)
        active.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        active.discard(id(node))
        if total > MAX_YAML_NODES:
            raise StrictYamlError(
                f"aliases expand to more than {MAX_YAML_NODES} values; write the values out", node
            )
        sizes[id(node)] = total
        return total

    size(root, 0)


def merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep-merge `update` into `tree` (mappings merge, anything else replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge(tree[key], value)
        else:
            tree[key] = value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def build(schema: type[T], raw: Any, prefix: str, base: Any = None) -> T:
    """Recursively turn a mapping into the dataclass `schema`, checking every key and value.
    Keys the mapping leaves out come from `base` (the enclosing field's default instance) when
    given, else from the schema's own defaults."""
    where = prefix.rstrip(".") or "<root>"
    if isinstance(raw, schema):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}': expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}', "
            f"allowed keys{' in ' + where if prefix else ''}: " + ", ".join(sorted(fields))
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in raw
        and base is None
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config key '{prefix}{missing[0]}' is required")
    kwargs = {}
    for name, value in raw.items():
        # A partial mapping for a nested config starts from this field's default: ArmConfig's
        # objective is genarm, so `objective.params=...` must not fall back to ObjectiveSpec's dpo.
        default = getattr(base, name) if base is not None else field_default(fields[name])
        kwargs[name] = coerce(hints[name], value, f"{prefix}{name}", default)
        check_bounds(fields[name], kwargs[name], f"{prefix}{name}")
    if base is not None:
        kwargs.update(
            {name: copy.deepcopy(getattr(base, name)) for name in fields if name not in raw}
        )
    return schema(**kwargs)


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def coerce(annotation: Any, value: Any, key: str, default: Any = None) -> Any:
    """Check `value` against a type annotation; return it converted (int->float,
    dict->dataclass)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key, default)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"config key '{key}': {value!r} fits none of {describe(annotation)}"
        )
    if origin is Literal:
        allowed = get_args(annotation)
        if isinstance(value, bool) and value not in allowed:
            # YAML 1.1 reads a bare no/off/yes/on as a bool: take back the word the Literal allows
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            matches = [a for a in allowed if isinstance(a, str) and a.lower() in words]
            if len(matches) == 1:
                return matches[0]
        if not any(type(value) is type(a) and value == a for a in allowed):  # True is not 1
            raise ConfigError(
                f"config key '{key}': got {value!r}, allowed: "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if dataclasses.is_dataclass(annotation):
        return build(
            annotation,
            value,
            prefix=f"{key}.",
            base=default if isinstance(default, annotation) else None,
        )
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        return [coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        (_, value_type) = get_args(annotation) or (Any, Any)
        return {k: coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def describe(annotation: Any) -> str:
    return typing._type_repr(annotation) if hasattr(typing, "_type_repr") else str(annotation)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
