"""Megatron-Core distributed checkpoints of a live model re-lay out across TP/PP: save at one, load at another.

The model is the GPT of gpt_fixture (GQA with qkv bias, fused gate/up, padded vocabulary), initialised from its
global parameter names so that every layout holds the same logical model. Saving at one layout and loading into a
differently initialised model at another must give back the logits of the saved model. (The reverse direction
and the Qwen-VL model itself are covered by test_convert_roundtrip.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.parallel.local_ranks import run_distributed
from tests.convert.gpt_fixture import build_gpt, eval_logits, init_by_global_name


def save_at_layout(ckpt_dir: str, tied: bool, parallel: str) -> torch.Tensor | None:
    from lmmrl_megatron.convert.mcore_ckpt import save_model_checkpoint

    model = build_gpt(tied=tied)
    init_by_global_name(model)
    logits = eval_logits(model)
    save_model_checkpoint([model], ckpt_dir, extra_state={"step": 7}, parallel=parallel)
    return logits


def load_at_layout(ckpt_dir: str, tied: bool, parallel: str) -> dict[str, object]:
    from lmmrl_megatron.convert.mcore_ckpt import load_model_checkpoint

    model = build_gpt(tied=tied)
    init_by_global_name(model, salt="a different model")
    before = eval_logits(model)
    extra = load_model_checkpoint([model], ckpt_dir, parallel=parallel)
    return {"before": before, "after": eval_logits(model), "extra": extra}


def _last_stage_logits(results: list) -> torch.Tensor:
    logits = [r for r in results if r is not None]
    assert logits, "no rank returned logits"
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0])
    return logits[0]


@pytest.mark.parametrize(
    "save_layout,load_layout,tied",
    [((2, 2), (1, 1), False), ((1, 1), (1, 2), True)],
    ids=["tp2pp2-to-tp1pp1", "tied-tp1pp1-to-pp2"],
)
def test_checkpoint_saved_at_one_layout_loads_at_another(
    tmp_path: Path, save_layout: tuple[int, int], load_layout: tuple[int, int], tied: bool
) -> None:
    ckpt = tmp_path / "ckpt"
    tp, pp = save_layout
    saved = _last_stage_logits(run_distributed(save_at_layout, tp * pp, tp, pp, args=(str(ckpt), tied, "torch_dist")))
    assert (ckpt / "metadata.json").is_file() and not list(tmp_path.glob("*.tmp-*"))
    tp, pp = load_layout
    results = run_distributed(load_at_layout, tp * pp, tp, pp, args=(str(ckpt), tied, "torch_dist"))
    before = _last_stage_logits([r["before"] for r in results])
    after = _last_stage_logits([r["after"] for r in results])
    assert not torch.allclose(before, saved)  # the loading model really started different
    torch.testing.assert_close(after, saved, rtol=1e-5, atol=1e-5)
    assert all(r["extra"] == {"step": 7} for r in results)


def test_fully_parallel_strategies_work_with_gloo(tmp_path: Path) -> None:
    """Save spread over two data-parallel replicas (TP=2 x DP=2), load at PP=2 x DP=2 with exchange by broadcast."""
    ckpt = tmp_path / "ckpt"
    saved = _last_stage_logits(run_distributed(save_at_layout, 4, 2, 1, args=(str(ckpt), False, "fully_parallel")))
    results = run_distributed(load_at_layout, 4, 1, 2, args=(str(ckpt), False, "fully_parallel"))
    torch.testing.assert_close(_last_stage_logits([r["after"] for r in results]), saved, rtol=1e-5, atol=1e-5)


def test_saving_over_an_existing_checkpoint_needs_overwrite(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(RuntimeError, match="already exists"):
        run_distributed(save_at_layout, 1, 1, 1, args=(str(ckpt), False, "torch_dist"))
    assert list(ckpt.iterdir()) == []
