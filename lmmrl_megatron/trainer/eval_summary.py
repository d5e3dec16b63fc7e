"""Before/after tables of evaluation results, as LMM-R1 reports them: one row per test set, one column per model.

    print(eval_table([("step 0", first), ("step 60", last)]))       # flat metrics dicts, "eval/<set>/<metric>"
    print(run_eval_summary("outputs/tiny/run/metrics.jsonl"))      # the first and last evaluation of a run

| set            | metric   | step 0 | step 60 | change |
|----------------|----------|-------:|--------:|-------:|
| color_of_shape | accuracy |   31.4 |    88.2 |  +56.9 |
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Shown as percentages; the rest (response_length) as plain numbers.
_PERCENT = ("accuracy", "format", "truncated")
TABLE_METRICS = ("accuracy", "format", "response_length")


def eval_sets(metrics: dict[str, float]) -> list[str]:
    """The set names of `eval/<set>/accuracy` keys, in first-seen order."""
    names: list[str] = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy" and parts[1] not in names:
            names.append(parts[1])
    return names


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric in _PERCENT or metric.startswith("pass@") else f"{value:.1f}"


def _change(metric: str, first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return "-"
    scale = 100 if metric in _PERCENT or metric.startswith("pass@") else 1
    return f"{scale * (last - first):+.1f}"


def eval_table(columns: Sequence[tuple[str, dict[str, float]]], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A Markdown table of the given evaluation results (label, flat metrics), with the change from the first
    column to the last when there are two or more. Accuracy, format and pass@n are in percent."""
    sets: list[str] = []
    for _, values in columns:
        sets += [name for name in eval_sets(values) if name not in sets]
    extra = sorted({key.split("/")[2] for _, v in columns for key in v if key.split("/")[-1].startswith("pass@")})
    shown = list(metrics) + extra
    header = ["set", "metric"] + [label for label, _ in columns] + (["change"] if len(columns) > 1 else [])
    rows = []
    for name in sets:
        for metric in shown:
            values = [v.get(f"eval/{name}/{metric}") for _, v in columns]
            if all(value is None for value in values):
                continue
            row = [name, metric] + [_cell(metric, value) for value in values]
            if len(columns) > 1:
                row.append(_change(metric, values[0], values[-1]))
            rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def run_eval_summary(metrics_jsonl: str | Path) -> str | None:
    """The table of a run's first and last evaluation (from its metrics.jsonl), None when it has none."""
    from lmmrl_megatron.trainer.metrics import read_metrics

    evaluated = [r for r in read_metrics(metrics_jsonl) if eval_sets(r)]
    if not evaluated:
        return None
    chosen = [evaluated[0]] if len(evaluated) == 1 else [evaluated[0], evaluated[-1]]
    return eval_table([(f"step {int(r['step'])}", r) for r in chosen])
