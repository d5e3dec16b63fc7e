"""The run's plots: every panel whose figures the run logs, drawn headless, as PNG files beside metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmrl_megatron.cli.plot import main as plot_main
from lmmrl_megatron.trainer.plots import moving_average, plot_run, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, num_steps: int = 30, with_eval: bool = True) -> None:
    records = [{"step": 0, "eval/a/accuracy": 0.2, "eval/a/format": 0.0, "time/eval": 1.0}] if with_eval else []
    for step in range(1, num_steps + 1):
        record = {
            "step": step, "reward/mean": step / num_steps, "reward/std": 0.1, "response_length/mean": 5.0,
            "response_length/max": 8.0, "kl": 0.01, "kl_coef": 0.01, "entropy": 2.0, "policy/clip_frac": 0.1,
            "grad_norm": "nan" if step == 3 else 1.0, "lr/actor": 1e-6, "time/generate": 1.0, "time/train": 2.0,
        }
        records.append(record)
    if with_eval:
        records[-1].update({"eval/a/accuracy": 0.7, "eval/a/format": 0.5, "time/eval": 1.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_every_panel_is_written(tmp_path):
    write_run(tmp_path / "run")
    written = plot_run(tmp_path / "run")
    names = [p.name for p in written]
    assert names[0] == "metrics.png" and written[0].parent == tmp_path / "run"
    assert set(names[1:]) == {f"{n}.png" for n in
                              ("reward", "eval_accuracy", "response_length", "kl", "entropy", "clip_frac", "grad_norm", "lr", "time")}
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_panels_without_figures_are_left_out(tmp_path, capsys):
    write_run(tmp_path / "run", with_eval=False)
    plot_main([str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "metrics.png" in printed and "eval_accuracy.png" not in printed


def test_not_a_run_folder(tmp_path):
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path)])


def test_series_skip_missing_and_non_finite_values():
    records = [{"step": 1.0, "x": 1.0}, {"step": 2.0}, {"step": 3.0, "x": float("nan")}, {"step": 4.0, "x": 3.0}]
    assert series(records, "x") == ([1.0, 4.0], [1.0, 3.0])
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
