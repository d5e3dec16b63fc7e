"""`bench/model_step.py --tiny` runs end to end on CPU: the same code path the GPU run takes, on tiny shapes.

It must give a row per implementation, batch and decoder-graph setting, fp32 parity with transformers, and graph
parity lines (on CPU the graphs run eagerly, so a graphed step equals the eager one exactly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("graphs", ["off", "off,on"])
def test_tiny_model_step_gives_every_row_and_parity(tmp_path: Path, graphs: str) -> None:
    out = tmp_path / "ms.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "model_step.py"), "--tiny", "--fused", "on", "--recompute", "none",
         "--cuda-graphs", graphs, "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "errors" not in report, report.get("errors")
    rows = {(r["impl"], r["graphs"], r["batch"]) for r in report["results"]}
    expected = {
        ("hf", "", "1x192 mm"), ("hf", "", "1x192 text"), ("hf", "", "vision 160p"),
        ("ours", "off", "1x192 mm"), ("ours", "off", "1x192 text"), ("ours", "off", "vision 160p"),
    }
    if "on" in graphs:  # the vision tower is never graphed: no repeated vision row
        expected |= {("ours", "on", "1x192 mm"), ("ours", "on", "1x192 text")}
    assert rows == expected
    assert all(r["step_s"] > 0 for r in report["results"])
    for key, diffs in report["parity"].items():
        assert diffs["max_abs_log_prob"] < 1e-4, key
    assert len(report.get("graph_parity", {})) == (2 if "on" in graphs else 0)
    for key, diffs in report.get("graph_parity", {}).items():
        assert diffs["max_abs_log_prob"] == 0 and diffs["max_rel_grad"] == 0 and diffs["replays"] == 0, key
