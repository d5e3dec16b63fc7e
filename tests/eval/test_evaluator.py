"""Evaluation without Ray: the data layer, a scripted `generate` and the reward scorer, against hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.eval.evaluator import Evaluator, pass_at_k, set_metrics
from lmmrl_megatron.trainer.eval_summary import eval_table, run_eval_summary
from lmmrl_megatron.rollout.engine import GenerationOutput

REPO = Path(__file__).resolve().parents[2]
REWARD = REPO / "configs" / "rewards" / "short_answer.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from lmmrl_megatron.data.synthetic import write_task
    from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_checkpoint("qwen2_5_vl", root / "model", seed=0)
    write_task("color_of_shape", 3, 6, root / "data", seed=0)  # test split: 2 red, 2 green, 2 blue
    return {"model": model, "test": root / "data" / "test.jsonl"}


def make_config(assets, *overrides: str) -> RunConfig:
    return load_config(
        RunConfig,
        REPO / "configs" / "rloo_tiny.yaml",
        [
            f"model.pretrain={assets['model']}",
            f"eval.sets=[{{name: colours, data: {assets['test']}}}]",
            f"eval.accuracy_function={REWARD}:commits_to_label",
            "reward.num_workers=1",
            *overrides,
        ],
    )


class ScriptedEngine:
    """Answers every prompt with the given texts, one per sample, and records what it was asked."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.ids = [torch.tensor(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params))
        return [
            [GenerationOutput(self.ids[j], torch.zeros(len(self.ids[j])), "stop" if j else "length") for j in range(params.n)]
            for _ in prompts
        ]


def test_pass_ks():
    from lmmrl_megatron.eval.evaluator import pass_ks

    assert [pass_ks(n) for n in (2, 3, 4, 8, 10)] == [[2], [2, 3], [2, 4], [2, 4, 8], [2, 4, 8, 10]]


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2) / C(4,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the share correct
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_set_metrics_by_hand():
    scores = [{"accuracy": 1.0, "format": 1.0}, {"accuracy": 0.0, "format": 0.0}, {"accuracy": 0.0, "format": 1.0},
              {"accuracy": 0.0, "format": 0.0}]
    metrics = set_metrics("s", scores, [2, 4, 6, 8], [True, False, False, False], n=2)
    assert metrics == {
        "eval/s/num_prompts": 2.0,
        "eval/s/accuracy": 0.25,
        "eval/s/format": 0.5,
        "eval/s/response_length": 5.0,
        "eval/s/truncated": 0.25,
        "eval/s/pass@2": 0.5,  # the first prompt has a correct answer, the second none
    }


def test_greedy_evaluation_of_a_set(assets, tmp_path):
    from transformers import AutoProcessor

    config = make_config(assets, "eval.batch_size=4")
    evaluator = Evaluator(config, AutoProcessor.from_pretrained(assets["model"]))
    try:
        engine = ScriptedEngine(evaluator.tokenizer, ["\\boxed{red}"])
        result = evaluator.evaluate(engine.generate, step=7)
    finally:
        evaluator.close()
    # 6 prompts in batches of 4 and 2, greedy, one sample each, the run's response budget
    assert [n for n, _ in engine.calls] == [4, 2]
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.max_new_tokens) == (1, 0.0, config.rollout.max_new_tokens)
    metrics = result.metrics
    assert metrics["eval/colours/accuracy"] == pytest.approx(2 / 6)  # the two red shapes
    assert metrics["eval/colours/format"] == 1.0  # one \boxed{} (reward.format_kind: boxed)
    assert metrics["eval/colours/num_prompts"] == 6 and metrics["eval/colours/truncated"] == 1.0
    assert metrics["eval/colours/response_length"] == len(engine.ids[0])
    assert "eval/colours/pass@1" not in metrics and metrics["time/eval"] > 0
    assert len(result.samples) == 6
    sample = result.samples[0]
    assert sample["step"] == 7 and sample["response"] == "\\boxed{red}" and sample["accuracy"] == float(sample["label"] == "red")
    assert sample["origin"].endswith("test.jsonl:1")
    path = result.write_samples(tmp_path / "samples.jsonl", extra={"model": "m"})
    assert [json.loads(line)["model"] for line in path.read_text().splitlines()] == ["m"] * 6


def test_sampled_evaluation_reports_pass_at_n(assets):
    from transformers import AutoProcessor

    config = make_config(assets, "eval.n_samples_per_prompt=2", "eval.temperature=1.0", "eval.max_new_tokens=5")
    evaluator = Evaluator(config, AutoProcessor.from_pretrained(assets["model"]))
    try:
        engine = ScriptedEngine(evaluator.tokenizer, ["\\boxed{red}", "blue"])
        metrics = evaluator.evaluate(engine.generate, step=0).metrics
    finally:
        evaluator.close()
    assert (engine.calls[0][1].n, engine.calls[0][1].max_new_tokens) == (2, 5)
    assert metrics["eval/colours/accuracy"] == pytest.approx(4 / 12)  # 2 red + 2 blue of 12 responses
    assert metrics["eval/colours/pass@2"] == pytest.approx(4 / 6)  # red and blue prompts; green never
    assert metrics["eval/colours/format"] == pytest.approx(0.5)
    assert metrics["eval/colours/truncated"] == pytest.approx(0.5)


def test_before_after_tables(tmp_path):
    first = {"eval/a/accuracy": 0.25, "eval/a/format": 0.0, "eval/a/response_length": 12.0}
    last = {"eval/a/accuracy": 0.875, "eval/a/format": 0.5, "eval/a/response_length": 7.5, "eval/a/pass@4": 1.0}
    table = eval_table([("before", first), ("after", last)])
    assert table.splitlines() == [
        "| set | metric          | before | after | change |",
        "|-----|-----------------|-------:|------:|-------:|",
        "| a   | accuracy        |   25.0 |  87.5 |  +62.5 |",
        "| a   | format          |    0.0 |  50.0 |  +50.0 |",
        "| a   | response_length |   12.0 |   7.5 |   -4.5 |",
        "| a   | pass@4          |      - | 100.0 |      - |",
    ]
    records = [{"step": 0, **first}, {"step": 1, "reward/mean": 0.1}, {"step": 2, **last}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_eval_summary(tmp_path / "metrics.jsonl").splitlines()[0] == "| set | metric          | step 0 | step 2 | change |"
