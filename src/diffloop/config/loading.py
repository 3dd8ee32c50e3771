"""Reading configs: YAML (1.2 booleans), ``a.b=c`` overrides, dataclass coercion with one-line
errors, the shipped configs, and the per-key documentation ``diffloop train --help`` prints."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from diffloop.config import schema
from diffloop.config.schema import Config, ConfigError, field_types, is_dataclass_type
from diffloop.config.validation import validate
from diffloop.errors import did_you_mean


class DuplicateKeyError(yaml.YAMLError):
    """A mapping states one key twice; PyYAML would silently keep the last value."""


class _Yaml12BoolLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are YAML 1.2's (true/false only): under YAML 1.1 rules
    ``train.mixed_precision=no`` would arrive as False. Bool fields still accept yes/no/on/off
    (:func:`_coerce` converts those strings). A key stated twice in one mapping is an error
    (YAML 1.2 requires unique keys; PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are meant to be overridden by the keys beside them
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise DuplicateKeyError(
                        f"duplicate key '{key}' on line {line} (first on line {first_line[key]}): "
                        "YAML would keep only the last value; remove one of them"
                    )
                first_line[key] = line
            except TypeError:
                pass  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_yaml(text: str) -> Any:
    """YAML with YAML 1.2 booleans (see :class:`_Yaml12BoolLoader`); used for configs and
    overrides."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # a SafeLoader subclass: no arbitrary objects


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``path``.

    Only the type is checked here; ranges and enumerations are :func:`validate`'s (one place for
    configs loaded from files and configs built in code alike).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        return _coerce(value, str, path)  # membership: validate (with the closest name)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: comma-separated list
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "1",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key_error(cls: type, key: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"{path}." if path else ""
    return ConfigError(
        f"unknown config key '{where}{key}'.{did_you_mean(key, names)} Valid keys "
        f"here: {', '.join(names)}"
    )


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """A ``cls`` dataclass from a nested dict (types coerced, unknown keys refused; not
    validated)."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key_error(cls, key, path)
        kwargs[key] = _coerce(value, types_[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _expand_reward_list(data: dict[str, Any]) -> dict[str, Any]:
    """``reward: [{name: ..., weight: ...}, ...]`` is short for ``reward: {name: multi, components:
    [...]}``."""
    if isinstance(data.get("reward"), list):
        return {**data, "reward": {"name": "multi", "components": data["reward"]}}
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base`` key by key, recursively: config sections and dict-valued fields
    (``reward.kwargs``) merge, so ``reward.kwargs.a=1 reward.kwargs.b=2`` keeps the file's other
    kwargs and both overrides; any other value in ``update`` replaces ``base``'s."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.learning_rate=1e-4`` -> {"train": {"learning_rate": 1e-4}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(
            f"override '{text}': '{key}' is not a dotted key like train.learning_rate"
        )
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override '{text}': the value is not valid YAML ({_one_line(e)})"
        ) from None
    node: dict[str, Any] = {}
    cursor = node
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist.{_similar_config_name(p)}")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {_one_line(e)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"config file '{p}' must hold a mapping of keys, got {type(loaded).__name__}"
        )
    return loaded or {}


def _similar_config_name(p: Path) -> str:
    """`` Did you mean 'x'?`` for a YAML file beside ``p`` or, for a bare name, a shipped config
    (else, for a bare name, the list of shipped configs)."""
    bare = p.parent == Path(".")
    beside = (
        [str(p.with_name(f.name)) for f in p.parent.glob("*.y*ml")] if p.parent.is_dir() else []
    )
    close = did_you_mean(str(p), sorted({*beside, *(shipped_configs() if bare else [])}))
    if close or not bare:
        return close
    return f" It is not a shipped config either: {', '.join(shipped_configs())}"


def shipped_configs() -> list[str]:
    """The names of the configs in ``diffloop/configs`` (``diffloop train NAME`` finds them)."""
    return sorted(f.name for f in packaged_config("").glob("*.yaml"))


def unvalidated_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides``, types checked but not
    :func:`validate`-d."""
    data = _expand_reward_list(_read_config_file(path)) if path is not None else {}
    for text in overrides or []:
        data = merge_dicts(data, _expand_reward_list(parse_override(text)))
    return from_dict(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides``; validated before returning."""
    config = unvalidated_config(path, overrides)
    validate(config)
    return config


DEFAULT_CONFIG = "shapes.yaml"


def packaged_config(name: str) -> Path:
    """A config shipped in ``diffloop/configs`` (may not exist)."""
    return Path(str(resources.files("diffloop") / "configs" / name))


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [k=v ...]`` -> (config path, overrides): the first argument is a config file
    unless it is an override; a bare name is also looked up among the shipped configs; no file:
    shapes.yaml."""
    if args and "=" not in args[0]:
        path = args[0]
        if not Path(path).exists() and (packaged := packaged_config(path)).exists():
            path = str(packaged)  # `diffloop train sd15_aesthetic.yaml` finds shipped configs too
        return path, args[1:]
    return str(packaged_config(DEFAULT_CONFIG)), args


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, default as YAML, allowed values, docstring) of every leaf field, in declaration
    order; the docstrings are read from this module's source (ast: nothing heavy is imported)."""
    docs = _attribute_docstrings()
    out = []
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if is_dataclass_type(tp):
            out += field_docs(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default_yaml = (
            yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        )
        out.append(
            (prefix + f.name, default_yaml, _allowed(f, tp), docs.get((cls.__name__, f.name), ""))
        )
    return out


def _allowed(f: dataclasses.Field, tp: Any) -> str:
    """``in (0, 1]``, ``one of a, b`` or "" (what :func:`check_field_values` enforces)."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return f.metadata["range"].describe() if "range" in f.metadata else ""


def _attribute_docstrings() -> dict[tuple[str, str], str]:
    """{(class name, field name): the string literal right after the field} in :mod:`.schema`."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in itertools.pairwise(node.body):
            doc = (
                nxt.value.value
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                else None
            )
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(doc, str)
            ):
                out[(node.name, stmt.target.id)] = " ".join(doc.split())
    return out
