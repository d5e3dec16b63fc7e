"""Mixing several prompt sources into one pool with given probabilities.

How many records each source contributes is fixed up front, so the pool's proportions are exact rather than
sampled: with `first_exhausted` (OpenRLHF's default) the pool is as large as it can be without repeating any
record; with `all_exhausted` it is as large as needed to use every record once, repeating the smaller sources.
`max_samples` caps the total. Each source contributes its first records in file order, and the pool interleaves
the sources evenly, so even an unshuffled pool keeps the proportions in every stretch of batches.
"""

from __future__ import annotations

import math

from lmmrl_megatron.data.config import MixStrategy


def mix_counts(
    sizes: list[int],
    probs: list[float] | None,
    max_samples: int | None = None,
    strategy: MixStrategy = "first_exhausted",
) -> list[int]:
    """How many records to take from each source (more than its size means repeating it, `all_exhausted` only)."""
    assert sizes and all(size > 0 for size in sizes), f"every source needs records: {sizes}"
    if probs is None:  # plain concatenation: each source in proportion to its size
        probs = [size / sum(sizes) for size in sizes]
    assert len(probs) == len(sizes) and all(prob > 0 for prob in probs), probs
    ratios = [size / prob for size, prob in zip(sizes, probs)]
    # Totals are rounded down/up so that no source is oversampled (first) or every record is used (all).
    total = math.floor(min(ratios) + 1e-9) if strategy == "first_exhausted" else math.ceil(max(ratios) - 1e-9)
    counts = _round_counts(probs, _cap(total, max_samples))
    if strategy == "first_exhausted":
        assert all(c <= s for c, s in zip(counts, sizes)), (counts, sizes)
    return counts


def _cap(total: int, max_samples: int | None) -> int:
    return total if max_samples is None else min(total, max_samples)


def _round_counts(probs: list[float], total: int) -> list[int]:
    """Largest-remainder rounding of `probs * total`, so the counts add up to `total` exactly."""
    exact = [prob * total for prob in probs]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(probs)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def interleave(counts: list[int]) -> list[int]:
    """A source index per pool slot, spreading each source evenly (smooth weighted round robin)."""
    total = sum(counts)
    taken = [0] * len(counts)
    order: list[int] = []
    for step in range(1, total + 1):
        # The source furthest behind its share at this point goes next; ties go to the earlier source.
        source = max(range(len(counts)), key=lambda i: counts[i] * step / total - taken[i])
        taken[source] += 1
        order.append(source)
    assert taken == counts
    return order
