"""Qwen2-VL / Qwen2.5-VL bound to the generic checkpoint machinery: the checkpoint template and both directions.

`QwenVLCheckpointModel` is what the converters need to know about the model:
  - `template`: the Megatron checkpoint's keys, global shapes and chunking, from `QwenVLModel` built at TP=1, PP=1
    on the meta device (no memory, no GPU);
  - `hf_to_mcore(name, read_hf)`: one parameter's full (TP=1) value from Hugging Face tensors;
  - `mcore_to_hf(name, value)`: one parameter's Hugging Face tensors ([] for the tied output-layer copy).
Both directions go through the one mapping (`convert/mapping.py`, `models/qwen_vl/mapping.py`).

`qwen_vl_shards_to_hf(config)` is the same mapping in the shape the live export wants (`export.ShardsToHF`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lmmrl_megatron.convert.dcp_stream import CheckpointTemplate, template_from_sharded_state_dict
from lmmrl_megatron.convert.export import HFTensors, ShardsToHF
from lmmrl_megatron.convert.hf_io import TensorSpec
from lmmrl_megatron.convert.mapping import MappedParam, hf_to_mcore_shard, mcore_shards_to_hf
from lmmrl_megatron.models.qwen_vl.mapping import TransformerImpl, qwen_vl_params
from lmmrl_megatron.models.qwen_vl.config import DType, QwenVLBuildOptions, QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout

DTYPE_NAMES: dict[torch.dtype, DType] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@contextlib.contextmanager
def _cuda_device_reads_as_meta() -> Iterator[None]:
    """While building on the meta device, let Megatron's `device=torch.cuda.current_device()` mean meta.

    Megatron's multimodal rotary embedding places its frequencies on `torch.cuda.current_device()` explicitly,
    which fails on a machine without a GPU even inside `torch.device("meta")`; the converters must run on such
    machines. Only the meta build sees this; the original function is restored right after.
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "meta"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


def build_meta_model(
    config: QwenVLConfig,
    dtype: DType,
    transformer_impl: TransformerImpl = "local",
    layout: ShardLayout | None = None,
    pp_rank: int = 0,
):
    """The model on the meta device: by default the whole model (one chunk, TP=1, PP=1), else pipeline stage
    `pp_rank` of `layout` (a whole stage, no virtual chunks); needs Megatron's parallel state at that layout."""
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel

    layout = layout or ShardLayout()
    assert layout.vpp is None, "a meta build is a whole pipeline stage"
    options = QwenVLBuildOptions(
        layout=layout, dtype=dtype, transformer_impl=transformer_impl, use_cpu_initialization=True,
        perform_initialization=False, meta_device=True,
    )
    with _cuda_device_reads_as_meta(), torch.device("meta"):
        return QwenVLModel(
            config, options, pre_process=layout.is_first_chunk(pp_rank), post_process=layout.is_last_chunk(pp_rank)
        )


class QwenVLCheckpointModel:
    """The model-specific half of the converters (see the module docstring)."""

    def __init__(self, config: QwenVLConfig, dtype: torch.dtype) -> None:
        """`dtype`: the weights' dtype on the HF side (bf16 for real checkpoints); the model is built in it."""
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported weight dtype {dtype}; expected one of {sorted(map(str, DTYPE_NAMES))}")
        self.config = config
        self.dtype = dtype
        # The checkpoint's keys are the same for local and Transformer-Engine layers (Megatron maps local norms to
        # the fused TE names), so the local template serves both.
        self.params: dict[str, MappedParam] = {p.mcore_name: p for p in qwen_vl_params(config, "local")}
        self.template: CheckpointTemplate = template_from_sharded_state_dict(
            build_meta_model(config, DTYPE_NAMES[dtype]).sharded_state_dict()
        )
        unmapped = sorted(set(self.template.param_shapes) - set(self.params))
        assert not unmapped, f"model parameters without a mapping rule: {unmapped[:5]}"

    def hf_inputs(self, mcore_name: str) -> tuple[str, ...]:
        return self.params[mcore_name].hf_names

    def hf_to_mcore(self, mcore_name: str, read_hf: Callable[[str], Tensor]) -> Tensor:
        param = self.params[mcore_name]
        hf = {name: read_hf(name) for name in param.hf_names}
        # Some parameters are kept in fp32 by the model (e.g. the vision tower's norms) whatever the HF dtype.
        return hf_to_mcore_shard(param, hf, tp_rank=0, tp_size=1).to(self.template.param_dtypes[mcore_name])

    def mcore_to_hf(self, mcore_name: str, value: Tensor) -> HFTensors:
        """The HF tensors of one parameter, in the checkpoint's dtype (`self.dtype`), as Hugging Face stores them."""
        param = self.params[mcore_name]
        if not param.exported:
            return []
        return [(name, tensor.to(self.dtype)) for name, tensor in mcore_shards_to_hf(param, [value]).items()]

    def hf_specs(self, mcore_names: Sequence[str]) -> list[TensorSpec]:
        """Names, shapes and dtypes of the HF tensors of these parameters, from the mapping run on meta tensors."""
        specs = []
        for name in mcore_names:
            meta = torch.empty(self.template.param_shapes[name], dtype=self.template.param_dtypes[name], device="meta")
            specs += [TensorSpec(hf_name, tuple(t.shape), t.dtype) for hf_name, t in self.mcore_to_hf(name, meta)]
        return specs


def qwen_vl_shards_to_hf(
    config: QwenVLConfig, transformer_impl: TransformerImpl = "local", dtype: torch.dtype | None = None
) -> ShardsToHF:
    """The mapping as the live export calls it: (global Megatron name, TP shards) -> HF tensors.

    With `dtype`, every HF tensor is cast to it (the model keeps a few parameters, e.g. vision norms, in fp32).
    """
    params = {p.mcore_name: p for p in qwen_vl_params(config, transformer_impl)}

    def shards_to_hf(global_name: str, tp_shards: Sequence[Tensor]) -> HFTensors:
        param = params.get(global_name)
        if param is None:
            raise KeyError(f"no mapping rule for Megatron parameter {global_name}")
        if not param.exported:
            return []
        hf = mcore_shards_to_hf(param, tp_shards).items()
        return [(name, tensor if dtype is None else tensor.to(dtype)) for name, tensor in hf]

    return shards_to_hf
