"""Whole-config validation before any worker starts, and every config field being read by some code."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.config.validate import run_config_problems, validate_run_config

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lmmrl_megatron"


@pytest.fixture()
def runnable(tmp_path: Path) -> list[str]:
    """Overrides that make the tiny config pass: a model folder and data files that exist."""
    model = tmp_path / "model"
    model.mkdir()
    # A real config.json (lmmrl-plan's layout checks read it): the 72B one, shapes only.
    (model / "config.json").write_text((REPO / "configs" / "models" / "qwen2_5_vl_72b" / "config.json").read_text())
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("")
    return [
        f"model.pretrain={model}",
        f"data.prompt_data=[{tmp_path / 'train.jsonl'}]",
        f"eval.sets=[{{name: held_out, data: {tmp_path / 'test.jsonl'}}}]",
    ]


def tiny(*overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / "rloo_tiny.yaml", list(overrides))


def test_the_embedded_default_is_valid(runnable):
    assert run_config_problems(tiny(*runnable)) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.engine_tp=2"], "the 'hf' engine runs on one device"),
        (["rollout.backend=vllm", "rollout.engine_tp=2"], "vLLM engines with tensor parallelism need GPUs"),
        (["model.dtype=fp16"], "model.dtype='fp16' is not supported for training"),
        (["model.cuda_graphs=true", "model.recompute=full"], "model.cuda_graphs needs model.recompute"),
        (["model.cuda_graphs=true", "parallel.sequence_parallel=true"],
         "model.cuda_graphs does not support parallel.sequence_parallel"),
        (["trainer.actor.lr_warmup_steps=60"], "trainer.actor.lr_warmup_steps=60 >= trainer.max_steps=60"),
        (["rollout.num_engines=3"], "do not fit on the 2 policy ranks"),
        (["trainer.num_gpus_per_node=1"], "the run needs 2 GPUs"),
        (["eval.accuracy_function=nowhere/r.py:score"], "eval.accuracy_function / eval.format_function"),
        (["reward.functions=[{name: nowhere/r.py:score}]"], "reward.functions: reward function 'nowhere/r.py:score'"),
    ],
)
def test_each_problem_is_named(runnable, overrides, message):
    problems = run_config_problems(tiny(*runnable, *overrides))
    assert any(message in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    missing = tmp_path / "nope.jsonl"
    config = tiny(
        "model.pretrain=", f"data.prompt_data=[{missing}]", f"eval.sets=[{{name: t, data: {missing}}}]", "rollout.engine_tp=2"
    )
    with pytest.raises(ValueError) as error:
        validate_run_config(config)
    text = str(error.value)
    for part in ("model.pretrain is empty", "data.prompt_data[0]", "rollout.engine_tp=2", "eval.sets[t]"):
        assert part in text


def test_evaluation_alone_needs_no_training_data(runnable):
    config = tiny(*runnable, "data.prompt_data=[]", "model.dtype=fp16")
    assert run_config_problems(config, training=False) == []
    assert any("data.prompt_data is empty" in p for p in run_config_problems(config))


def test_the_trainer_refuses_before_it_starts_anything(runnable):
    """A backend that cannot run the config fails in the controller's first line: no Ray, no policy ranks, no weights."""
    import ray

    from lmmrl_megatron.trainer.controller import RLTrainer

    assert not ray.is_initialized()
    with pytest.raises(ValueError, match="the 'hf' engine runs on one device"):
        RLTrainer(tiny(*runnable, "rollout.engine_tp=2"))
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.num_episodes=2", "unknown key 'trainer.num_episodes'"),
        ("eval.n_samples_per_prompt=4", "greedy decoding gives the same response every time"),
        ("eval.sets=[{name: 'a b', data: x.jsonl}]", "must be letters, digits"),
        ("eval.sets=[{name: a, data: x.jsonl}, {name: a, data: y.jsonl}]", "names ['a'] more than once"),
        ("algorithm.loss_agg_mode=seq_mean_token_sum_normalised", "expects one of"),
    ],
)
def test_eval_and_removed_fields_fail_at_load_time(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(override)


# Fields a later piece of work reads; each entry says which.
READ_ELSEWHERE: dict[str, str] = {}
CONFIG_MODULES = ("config/sections.py", "algorithms/config.py", "data/config.py", "reward/config.py", "config/eval.py")


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nested = [tp] if dataclasses.is_dataclass(tp) else [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if nested:
            for inner in nested:
                yield from _fields(inner, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f.name


def _code_that_reads_config() -> str:
    """The package's source, with the sections' own validation (__post_init__, _check*) left out of the config
    modules: a field that only its own range check looks at is read by nothing."""
    texts = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if str(path.relative_to(PACKAGE)) in CONFIG_MODULES:
            checks = [
                ast.get_source_segment(text, node)
                for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.FunctionDef) and (node.name == "__post_init__" or node.name.startswith("_check"))
            ]
            for segment in checks:
                text = text.replace(segment, "")
        texts.append(text)
    return "\n".join(texts)


def test_every_config_field_is_read_by_code():
    code = _code_that_reads_config()
    unread = [
        dotted
        for dotted, name in _fields(RunConfig)
        if dotted not in READ_ELSEWHERE and not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)
    ]
    assert unread == []
