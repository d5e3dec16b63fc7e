"""PNG plots of a run from its metrics.jsonl, written beside it: `metrics.png` (every panel) and `plots/<panel>.png`.

    lmmrl-plot outputs/tiny/run          # (lmmrl_megatron/cli/plot.py) also done at the end of every run

Panels: reward (mean, a band of one std, a moving average), eval accuracy per test set, response length, KL and
its coefficient, entropy, clip fraction, gradient norm, learning rate, and the time of each phase per step.
A panel whose figures a run does not log is left out. matplotlib draws off-screen (the Agg canvas, no pyplot and
no display), so this works on cluster nodes and inside Ray workers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from lmmrl_megatron.trainer.metrics import read_metrics

Records = list[dict[str, float]]
PHASES = ("generate", "reward", "logprob", "train", "sync", "eval")


def series(records: Records, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that log `key` with a finite value."""
    points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _line(ax, records: Records, key: str, label: str | None = None, smooth: bool = False, **style) -> bool:
    steps, values = series(records, key)
    if not steps:
        return False
    if smooth and len(values) >= 20:
        window = max(2, len(values) // 15)
        ax.plot(steps, values, alpha=0.3, linewidth=1, **style)
        smoothed = moving_average(values, window)
        ax.plot(steps, smoothed, label=f"{label or key} ({window}-step mean)", linewidth=2, **style)
    else:
        ax.plot(steps, values, label=label or key, marker="o" if len(steps) < 30 else None, markersize=3, **style)
    return True


def _reward(ax, records: Records) -> bool:
    steps, mean = series(records, "reward/mean")
    if not steps:
        return False
    _, std = series(records, "reward/std")
    if len(std) == len(mean):
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15,
                        color="tab:blue", label="mean ± std")
    _line(ax, records, "reward/mean", "reward", smooth=True, color="tab:blue")
    ax.set_title("training reward")
    return True


def _eval_keys(records: Records, suffix: str) -> list[str]:
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k.startswith("eval/") and k.endswith(suffix) and k not in keys]
    return keys


def _eval_accuracy(ax, records: Records) -> bool:
    drawn = False
    for key in _eval_keys(records, "/accuracy"):
        drawn |= _line(ax, records, key, f"{key.split('/')[1]} accuracy")
    for key in [k for k in _eval_keys(records, "") if k.split("/")[-1].startswith("pass@")]:
        drawn |= _line(ax, records, key, f"{key.split('/')[1]} {key.split('/')[-1]}", linestyle="--")
    for key in _eval_keys(records, "/format"):
        drawn |= _line(ax, records, key, f"{key.split('/')[1]} format", linestyle=":")
    if drawn:
        ax.set_ylim(-0.03, 1.03)
        ax.set_title("eval accuracy")
    return drawn


def _response_length(ax, records: Records) -> bool:
    drawn = _line(ax, records, "response_length/mean", "mean", smooth=True, color="tab:green")
    drawn |= _line(ax, records, "response_length/max", "max", color="tab:olive", alpha=0.6)
    ax.set_title("response length (tokens)")
    return drawn


def _kl(ax, records: Records) -> bool:
    drawn = _line(ax, records, "kl", "KL to reference (per token)", smooth=True, color="tab:red")
    steps, coef = series(records, "kl_coef")
    if drawn and coef and not any(coef):
        ax.text(0.5, 0.8, "algorithm.kl_coef = 0: no KL term", transform=ax.transAxes, ha="center", color="tab:gray")
    if drawn and coef and max(coef) != min(coef):
        twin = ax.twinx()
        twin.plot(steps, coef, color="tab:gray", linestyle="--", label="kl_coef")
        twin.set_ylabel("kl_coef")
    ax.set_title("KL")
    return drawn


def _simple(key: str, title: str, color: str, *extra: str) -> Callable:
    def panel(ax, records: Records) -> bool:
        drawn = _line(ax, records, key, key, smooth=True, color=color)
        for other in extra:
            drawn |= _line(ax, records, other, other, smooth=True)
        ax.set_title(title)
        return drawn

    return panel


def _learning_rate(ax, records: Records) -> bool:
    drawn = _line(ax, records, "lr/actor", "actor")
    drawn |= _line(ax, records, "lr/critic", "critic")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_title("learning rate")
    return drawn


def _phase_times(ax, records: Records) -> bool:
    steps = [r["step"] for r in records if any(f"time/{p}" in r for p in PHASES if p != "eval")]
    if not steps:
        return False
    by_step = {r["step"]: r for r in records}
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        values = [by_step[s].get(f"time/{phase}", 0.0) for s in steps]
        if not any(values):
            continue
        top = [b + v for b, v in zip(bottom, values)]
        # stacked steps: one polygon per phase (a bar per step and phase is slow to draw for long runs)
        ax.fill_between(steps, bottom, top, step="mid", label=phase, linewidth=0)
        bottom = top
    ax.set_title("time per step (s)")
    return True


PANELS: dict[str, Callable] = {
    "reward": _reward,
    "eval_accuracy": _eval_accuracy,
    "response_length": _response_length,
    "kl": _kl,
    "entropy": _simple("entropy", "entropy (per token)", "tab:purple"),
    "clip_frac": _simple("policy/clip_frac", "PPO clip fraction", "tab:orange"),
    "grad_norm": _simple("grad_norm", "gradient norm", "tab:brown", "critic/grad_norm"),
    "lr": _learning_rate,
    "time": _phase_times,
}


def _finish(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="best")


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `metrics.png` and `plots/<panel>.png` for the run in `run_dir`; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl: not a run folder (checkpoint.save_path)")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    written: list[Path] = []
    (run_dir / "plots").mkdir(exist_ok=True)
    drawn: list[str] = []
    for name, panel in PANELS.items():
        figure = Figure(figsize=(6, 4), dpi=110, layout="constrained")
        ax = figure.add_subplot()
        if panel(ax, records):
            _finish(ax)
            FigureCanvasAgg(figure)
            out = run_dir / "plots" / f"{name}.png"
            figure.savefig(out)
            written.append(out)
            drawn.append(name)
    columns = 3
    rows = max(1, math.ceil(len(drawn) / columns))
    figure = Figure(figsize=(6 * columns, 4 * rows), dpi=90, layout="constrained")
    for i, name in enumerate(drawn):
        ax = figure.add_subplot(rows, columns, i + 1)
        PANELS[name](ax, records)
        _finish(ax)
    figure.suptitle(f"{run_dir} — {len([r for r in records if r['step'] > 0])} steps", fontsize=12)
    FigureCanvasAgg(figure)
    overview = run_dir / "metrics.png"
    figure.savefig(overview)
    return [overview] + written
