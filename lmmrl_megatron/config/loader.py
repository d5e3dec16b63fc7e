"""Typed loading of the run configuration from YAML files and dotted command-line overrides.

    cfg = load_config(RunConfig, "configs/rloo_tiny.yaml", ["algorithm.kl_coef=0.01", "parallel.tp=2"])

Sections are dataclasses; a field's annotation is its type. Supported types: int, float, str, bool, `X | None`,
`Literal[...]`, `list[X]`, `dict[str, X]` and nested dataclasses. An unknown key or a value of the wrong type is
a `ValueError` naming the dotted key and where it came from (`file:line`, or the command-line override).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


@dataclass(frozen=True)
class _Origin:
    """Where a value came from, for error messages."""

    where: str

    def __str__(self) -> str:
        return self.where


def _compose_with_lines(text: str, filename: str) -> tuple[Any, dict[str, _Origin]]:
    """Parse YAML and record `file:line` for every dotted key path."""
    node = yaml.compose(text)
    origins: dict[str, _Origin] = {}

    def build(n: yaml.Node, path: str) -> Any:
        origins[path] = _Origin(f"{filename}:{n.start_mark.line + 1}")
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in n.value:
                key = str(yaml.safe_load(yaml.serialize(key_node)))
                child = f"{path}.{key}" if path else key
                if key in out:
                    raise ValueError(f"{filename}:{key_node.start_mark.line + 1}: duplicate key {child!r}")
                out[key] = build(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(item, f"{path}[{i}]") for i, item in enumerate(n.value)]
        return yaml.safe_load(yaml.serialize(n))

    return (build(node, "") if node is not None else {}), origins


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted}=...: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str, origins: dict[str, _Origin]) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses; raise naming the key."""
    where = origins.get(path) or next((o for p, o in origins.items() if path.startswith(p + ".")), None)

    def fail(expected: str) -> ValueError:
        return ValueError(f"{where or '<config>'}: key {path!r} expects {expected}, got {value!r}")

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, origins)
            except ValueError as exc:
                errors.append(exc)
        raise fail(" or ".join(_type_name(o) for o in options))
    if origin is Literal:
        if value not in get_args(tp):
            raise fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"a list of {_type_name(get_args(tp)[0])}")
        return [_convert(get_args(tp)[0], item, f"{path}[{i}]", origins) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {str(k): _convert(get_args(tp)[1], v, f"{path}.{k}", origins) for k, v in value.items()}
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(f"a {tp.__name__} section (a mapping)")
        return _build_dataclass(tp, value, path, origins)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; every user writes learning rates that way.
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field {path!r} has unsupported annotation {tp!r}")


def _build_dataclass(cls: type[T], data: dict[str, Any], path: str, origins: dict[str, _Origin]) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            dotted = f"{path}.{key}" if path else key
            where = origins.get(dotted) or origins.get(path) or "<config>"
            raise ValueError(f"{where}: unknown key {dotted!r}; {cls.__name__} has: {', '.join(sorted(known))}")
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}" if path else name, origins)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        where = origins.get(path) or "<config>"
        raise ValueError(f"{where}: section {path or '<root>'!r}: {exc}") from exc


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build a config dataclass from a plain nested dict (every key checked)."""
    return _build_dataclass(cls, data, "", {"": _Origin(source)})


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional) and apply `key.sub=value` overrides in order."""
    data: dict[str, Any] = {}
    origins: dict[str, _Origin] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        data, origins = _compose_with_lines(path.read_text(), str(path))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides or []:
        if "=" not in assignment:
            raise ValueError(f"override {assignment!r} must look like key.sub=value")
        key, raw = assignment.split("=", 1)
        key = key.strip().removeprefix("--")
        _set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
        origins[key] = _Origin(f"command-line override {assignment!r}")
    return _build_dataclass(cls, data, "", origins)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain nested dict of a config dataclass (for saving next to checkpoints and logging)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
