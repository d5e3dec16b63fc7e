"""The streaming `torch_dist` writer/reader against Megatron's own loader and saver, on the GPT test bed.

Written here (one process, one parameter at a time) -> loaded by live models at TP=2, PP=2; saved by live models at
TP=2, PP=2 -> read back here. Values must be bit-exact both ways.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.convert.dcp_stream import read_common_state, read_params, write_checkpoint
from lmmrl_megatron.convert.single_process import single_process_megatron
from lmmrl_megatron.parallel.local_ranks import run_distributed
from tests.convert.gpt_fixture import LAYERS, full_tensor_for, gpt_template, load_and_compare
from tests.convert.test_mcore_ckpt import save_at_layout


def _global_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    return full_tensor_for(name, shape)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streamed_checkpoint_loads_into_live_model_at_tp2_pp2(tmp_path: Path, tied: bool) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    produced: list[str] = []
    with single_process_megatron():
        template = gpt_template(tied)

        def produce(name: str) -> torch.Tensor:
            produced.append(name)
            return _global_value(name, template.param_shapes[name])

        write_checkpoint(ckpt, template, produce, common_state={"content_metadata": {"format": "test"}})
        assert read_common_state(ckpt)["content_metadata"] == {"format": "test"}
    # Each parameter was produced once: the writer never needed two of them at the same time.
    assert sorted(produced) == sorted(template.param_shapes)
    mismatched = run_distributed(load_and_compare, 4, 2, 2, args=(str(ckpt), tied))
    assert mismatched == [[], [], [], []]


def test_checkpoint_saved_by_live_model_at_tp2_pp2_reads_back_per_layer(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_distributed(save_at_layout, 4, 2, 2, args=(str(ckpt), False, "torch_dist"))
    with single_process_megatron():
        template = gpt_template()
        names = sorted(template.param_shapes)
        groups = [[n for n in names if f"layers.{i}." in n] for i in range(LAYERS)]
        groups.append([n for n in names if "layers." not in n])
        seen = set()
        for group in read_params(ckpt, template, groups):
            for name, value in group.items():
                assert torch.equal(value, _global_value(name, template.param_shapes[name])), name
                seen.add(name)
    assert seen == set(names)
