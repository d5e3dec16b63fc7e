"""Evaluation of the policy on test sets: generate through the rollout engines, score with the reward scorer.

    evaluator = Evaluator(config, processor)
    result = evaluator.evaluate(rollout_group.generate, step=0)
    result.metrics   # {"eval/<set>/accuracy": 0.31, "eval/<set>/format": ..., "eval/<set>/response_length": ...}
    result.samples   # one dict per response: prompt, label, response, scores

Nothing here has its own copy of the pipeline: prompts come from the data layer (`build_prompt_loader` on the
set, with the run's keys, image bounds and bad-input policy), responses from whatever `generate` is given (the
rollout group's, so every rollout backend evaluates the same way), scores from `reward.scorer.RewardScorer`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.config.eval import EvalSetConfig
from lmmrl_megatron.reward.config import RewardConfig
from lmmrl_megatron.rollout.engine import GenerationOutput, MultimodalPrompt, SamplingParams

GenerateFn = Callable[[list[MultimodalPrompt], SamplingParams], list[list[GenerationOutput]]]

CORRECT_THRESHOLD = 0.5  # an accuracy score at or above this counts as a correct response for pass@n


def eval_reward_config(config: RunConfig) -> RewardConfig:
    return config.eval.scorer_config(config.reward)


def eval_data_config(data: DataConfig, eval_set: EvalSetConfig) -> DataConfig:
    """The run's data settings (keys, system prompt, image bounds, bad-input policy) applied to one test set."""
    return replace(
        data,
        prompt_data=[eval_set.data],
        prompt_data_probs=None,
        mix_strategy="first_exhausted",
        split=eval_set.split,
        max_samples=eval_set.max_samples,
        shuffle=False,
    )


def eval_sampling_params(config: RunConfig) -> SamplingParams:
    cfg = config.eval
    return SamplingParams(
        n=cfg.n_samples_per_prompt,
        temperature=cfg.temperature,
        top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
        max_new_tokens=cfg.max_new_tokens or config.rollout.max_new_tokens,
        seed=config.trainer.seed,
    )


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@dataclass
class EvalResult:
    """What one evaluation of every set gives: flat metrics for the loggers and one record per response."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def write_samples(self, path: str | Path, extra: dict[str, Any] | None = None, append: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if append else "w", encoding="utf-8") as out:
            for sample in self.samples:
                out.write(json.dumps({**(extra or {}), **sample}, ensure_ascii=False) + "\n")
        return path


def set_metrics(
    name: str, scores: Sequence[dict[str, float]], lengths: Sequence[int], truncated: Sequence[bool], n: int
) -> dict[str, float]:
    """`eval/<name>/...` from the per-response scores (grouped n per prompt, prompt by prompt)."""
    prefix = f"eval/{name}/"
    num = len(scores)
    metrics = {prefix + "num_prompts": float(num // n)}
    if num == 0:
        return metrics
    for key in scores[0]:
        metrics[prefix + key] = sum(s[key] for s in scores) / num
    metrics[prefix + "response_length"] = sum(lengths) / num
    metrics[prefix + "truncated"] = sum(truncated) / num
    if n > 1:
        correct = [s["accuracy"] >= CORRECT_THRESHOLD for s in scores]
        per_prompt = [sum(correct[i : i + n]) for i in range(0, num, n)]
        for k in pass_ks(n):
            metrics[prefix + f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in per_prompt) / len(per_prompt)
    return metrics


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k figures reported for n samples per prompt: the powers of two below n, and n."""
    return [k for k in (2**i for i in range(1, n.bit_length())) if k < n] + [n]


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Evaluator:
    """The test sets of `config.eval`, read and checked once; `evaluate` encodes, generates and scores them."""

    def __init__(self, config: RunConfig, processor: Any) -> None:
        from lmmrl_megatron.data.loader import build_prompt_loader
        from lmmrl_megatron.reward.scorer import RewardScorer

        if not config.eval.sets:
            raise ValueError("eval.sets is empty: there is nothing to evaluate")
        self.config = config
        self.tokenizer = processor.tokenizer
        # Read (and check) every set now, so a missing file or a bad record fails before any model is built.
        self.loaders = {
            s.name: build_prompt_loader(eval_data_config(config.data, s), processor, config.eval.batch_size, s.split)
            for s in config.eval.sets
        }
        self.params = eval_sampling_params(config)
        self.scorer = RewardScorer(eval_reward_config(config))
        self.score_names = ["accuracy"] + (["format"] if config.eval.format_function is not None else [])

    def evaluate(self, generate: GenerateFn, step: int) -> EvalResult:
        start = time.perf_counter()
        result = EvalResult(step)
        for name, loader in self.loaders.items():
            metrics, samples = self._evaluate_set(name, loader, generate, step)
            result.metrics.update(metrics)
            result.samples.extend(samples)
        result.metrics["time/eval"] = time.perf_counter() - start
        return result

    def _evaluate_set(self, name: str, loader: Any, generate: GenerateFn, step: int):
        n = self.params.n
        scores: list[dict[str, float]] = []
        lengths: list[int] = []
        truncated: list[bool] = []
        samples: list[dict[str, Any]] = []
        num_failures = 0
        for chunk in _chunks(loader.each_prompt_once(), self.config.eval.batch_size):
            prompts = [MultimodalPrompt.from_encoded(p) for _, p in chunk]
            outputs = generate(prompts, self.params)
            flat = [(i, prompt, j, out) for (i, prompt), group in zip(chunk, outputs) for j, out in enumerate(group)]
            responses = self.tokenizer.batch_decode([out.response_ids for *_, out in flat], skip_special_tokens=True)
            labels = [prompt.answer for _, prompt, _, _ in flat]
            texts = [prompt.prompt_text for _, prompt, _, _ in flat]
            scored = self.scorer.score(responses, labels, texts)
            num_failures += scored.counters.num_failures
            functions = [f.name for f in self.scorer.config.functions]
            for i, ((index, prompt, j, out), response) in enumerate(zip(flat, responses)):
                row = {key: scored.components[fn][i] for key, fn in zip(self.score_names, functions)}
                scores.append(row)
                lengths.append(int(out.response_ids.numel()))
                truncated.append(out.finish_reason == "length")
                samples.append(
                    {
                        "step": step,
                        "set": name,
                        "index": index,
                        "origin": str(prompt.record.origin),
                        "sample": j,
                        "prompt": prompt.prompt_text,
                        "label": prompt.answer,
                        "response": response,
                        **row,
                        "response_length": lengths[-1],
                        "finish_reason": out.finish_reason,
                    }
                )
        if not scores:
            raise ValueError(f"eval set {name!r} has no usable prompt: {loader.skipped.summary()}")
        metrics = set_metrics(name, scores, lengths, truncated, n)
        metrics[f"eval/{name}/num_reward_failures"] = float(num_failures)
        return metrics, samples

    def close(self) -> None:
        self.scorer.close()
