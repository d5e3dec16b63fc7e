"""Mixing sources: exact per-source counts, even interleaving, and the proportions a run actually samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lmmrl_megatron.data.config import DataConfig
from lmmrl_megatron.data.mixing import interleave, mix_counts
from lmmrl_megatron.data.pool import load_prompt_pool
from lmmrl_megatron.data.sampler import PromptSampler
from tests.data.helpers import record, write_jsonl


@pytest.mark.parametrize(
    ("sizes", "probs", "max_samples", "strategy", "expected"),
    [
        ([100, 50], [0.5, 0.5], None, "first_exhausted", [50, 50]),
        ([100, 50], [0.5, 0.5], None, "all_exhausted", [100, 100]),
        ([100, 100], [0.8, 0.2], None, "first_exhausted", [100, 25]),
        ([100, 100], [0.8, 0.2], None, "all_exhausted", [400, 100]),
        ([100, 100], [0.8, 0.2], 10, "first_exhausted", [8, 2]),
        ([100, 50], None, None, "first_exhausted", [100, 50]),
        ([100, 50], None, 30, "first_exhausted", [20, 10]),
        ([7], None, None, "first_exhausted", [7]),
        ([7], [1.0], 3, "all_exhausted", [3]),
        ([10, 10, 10], [1 / 3, 1 / 3, 1 / 3], None, "first_exhausted", [10, 10, 10]),
        ([10, 10, 10], [0.5, 0.25, 0.25], 7, "first_exhausted", [3, 2, 2]),
    ],
)
def test_mix_counts(sizes, probs, max_samples, strategy, expected) -> None:
    counts = mix_counts(sizes, probs, max_samples, strategy)
    assert counts == expected
    if max_samples is not None:
        assert sum(counts) <= max_samples


def test_interleave_keeps_every_prefix_within_one_of_its_share() -> None:
    counts = [30, 7, 13]
    order = interleave(counts)
    assert Counter(order) == Counter({0: 30, 1: 7, 2: 13})
    taken = [0, 0, 0]
    for step, source in enumerate(order, start=1):
        taken[source] += 1
        for i, count in enumerate(counts):
            assert abs(taken[i] - count * step / sum(counts)) < 1 + 1e-9


def _source(path: Path, tag: str, num: int) -> Path:
    return write_jsonl(path, [record(answer=f"{tag}{i}", text=f"{tag} question {i}") for i in range(num)])


def test_pool_takes_the_first_records_of_each_source(tmp_path: Path) -> None:
    a = _source(tmp_path / "a.jsonl", "a", 40)
    b = _source(tmp_path / "b.jsonl", "b", 40)
    pool = load_prompt_pool(DataConfig(prompt_data=[str(a), str(b)], prompt_data_probs=[0.8, 0.2]))
    assert pool.num_per_source() == [40, 10] and pool.num_read == [40, 40]
    assert sorted(r.answer for r in pool.records if r.answer.startswith("b")) == sorted(f"b{i}" for i in range(10))
    # Smooth round robin: b comes as soon as it falls behind its 20% share.
    assert [pool.sources[s] for s in pool.source_ids[:5]] == [str(a), str(a), str(b), str(a), str(a)]
    assert [r.answer for r in pool.records[:4]] == ["a0", "a1", "b0", "a2"]


def test_sampled_stream_follows_the_probabilities(tmp_path: Path) -> None:
    a = _source(tmp_path / "a.jsonl", "a", 300)
    b = _source(tmp_path / "b.jsonl", "b", 300)
    config = DataConfig(prompt_data=[str(a), str(b)], prompt_data_probs=[0.75, 0.25], seed=5)
    pool = load_prompt_pool(config)
    assert len(pool) == 400 and pool.num_per_source() == [300, 100]
    sampler = PromptSampler(len(pool), seed=config.seed)
    for _ in range(4):  # four batches of 50 from a shuffled pool: loose bounds (about 3.5 sigma) on each half
        window = sampler.next_indices(100)
        share_a = sum(pool.source_ids[i] == 0 for i in window) / len(window)
        assert 0.62 <= share_a <= 0.88, share_a


def test_all_exhausted_repeats_the_small_source(tmp_path: Path) -> None:
    a = _source(tmp_path / "a.jsonl", "a", 10)
    b = _source(tmp_path / "b.jsonl", "b", 3)
    config = DataConfig(prompt_data=[str(a), str(b)], prompt_data_probs=[0.5, 0.5], mix_strategy="all_exhausted")
    pool = load_prompt_pool(config)
    assert pool.num_per_source() == [10, 10]
    assert Counter(r.answer for r in pool.records if r.answer.startswith("b")) == {"b0": 4, "b1": 3, "b2": 3}


def test_max_samples_caps_a_single_source(tmp_path: Path) -> None:
    a = _source(tmp_path / "a.jsonl", "a", 10)
    pool = load_prompt_pool(DataConfig(prompt_data=[str(a)], max_samples=4))
    assert [r.answer for r in pool.records] == ["a0", "a1", "a2", "a3"]


def test_empty_prompt_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="data.prompt_data is empty"):
        load_prompt_pool(DataConfig())
