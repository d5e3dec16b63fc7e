"""The typed config loader: YAML + dotted overrides, with errors that name the key and where it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmmrl_megatron.config import RunConfig, dump_yaml, load_config


@dataclass
class Inner:
    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    cap: int | None = None

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")


@dataclass
class Outer:
    steps: int = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    table: dict[str, float] = field(default_factory=dict)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 3\ninner:\n  rate: 2\n  names: [x, y]\ntable: {a: 1}\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "flag=true", "inner.cap=7", "steps=5"])
    assert cfg == Outer(steps=5, flag=True, inner=Inner(rate=2.0, names=["x", "y"], mode="b", cap=7), table={"a": 1.0})
    assert isinstance(cfg.inner.rate, float)


def test_defaults_without_file() -> None:
    assert load_config(Outer) == Outer()


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: 1\nstpes: 2\n", "run.yaml:2: unknown key 'stpes'"),
        ("inner:\n  rate: 1\n  colour: red\n", "run.yaml:3: unknown key 'inner.colour'"),
        ("steps: two\n", "run.yaml:1: key 'steps' expects an integer, got 'two'"),
        ("flag: 1\n", "key 'flag' expects true or false"),
        ("inner:\n  mode: c\n", "run.yaml:2: key 'inner.mode' expects one of 'a', 'b'"),
        ("inner:\n  names: [1, x]\n", "key 'inner.names[0]' expects a string"),
        ("inner: 3\n", "key 'inner' expects a Inner section"),
        ("steps: 1\nsteps: 2\n", "duplicate key 'steps'"),
        ("inner:\n  rate: -1\n", "rate must be >= 0"),
    ],
)
def test_bad_yaml_names_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(Outer, write(tmp_path, text))
    assert message in str(info.value)
    assert "run.yaml" in str(info.value)


def test_bad_override_names_the_override(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"command-line override 'steps=x'.*'steps' expects an integer"):
        load_config(Outer, None, ["steps=x"])
    with pytest.raises(ValueError, match="unknown key 'inner.nope'"):
        load_config(Outer, None, ["inner.nope=1"])
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        load_config(Outer, None, ["steps"])


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_run_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, ["parallel.tp=2", "trainer.actor_world_size=4", "trainer.actor.lr=3e-6"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(RunConfig, tmp_path / "resolved.yaml") == cfg


def test_run_config_cross_section_check() -> None:
    with pytest.raises(ValueError, match="actor_world_size=3 is not a multiple of parallel.tp"):
        load_config(RunConfig, None, ["parallel.tp=2", "trainer.actor_world_size=3"])


@pytest.mark.parametrize(("override", "message"), [
    ("parallel.tp=0", "parallel.tp must be >= 1, got 0"),
    ("parallel.vpp=2", "parallel.vpp=2 needs vpp >= 2 and pp >= 2 (pp=1)"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel needs tp > 1"),
])
def test_parallel_section_is_checked_by_its_layout(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(RunConfig, None, [override])
    layout = load_config(RunConfig, None, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                           "trainer.actor_world_size=2"]).parallel.layout
    assert (layout.tp, layout.pp, layout.sequence_parallel) == (2, 1, True)


def test_every_shipped_config_loads() -> None:
    configs = sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml"))
    for path in configs:
        load_config(RunConfig, path)


def test_exponent_floats_without_dot_are_numbers(tmp_path: Path) -> None:
    cfg = load_config(Outer, write(tmp_path, "inner:\n  rate: 1e-6\n"))
    assert cfg.inner.rate == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="expects a number"):
        load_config(Outer, write(tmp_path, "inner:\n  rate: fast\n"))
