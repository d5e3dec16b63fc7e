"""Load Hugging Face weights into a live `QwenVLModel` chunk at any (tp_rank, pp_rank), through the one mapping.

    load_hf_checkpoint(model, "/ckpt/Qwen2.5-VL-7B-Instruct")      # safetensors (single file or sharded + index)
    load_hf_state_dict(model, hf_model.state_dict())             # tensors already in memory

Only the tensors of the parameters that live on this chunk are read, one parameter at a time (memory-mapped
safetensors; peak extra memory is one HF parameter plus its shard). Every parameter of the chunk must be covered
by the mapping and every mapped parameter must exist in the chunk, with the shard shape the mapping produces:
anything else is an error naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from megatron.core import parallel_state
from torch import Tensor

from lmmrl_megatron.convert.mapping import MappedParam, hf_to_mcore_shard, local_mcore_name
from lmmrl_megatron.models.qwen_vl.mapping import canonical_hf_name, qwen_vl_chunk_params
from lmmrl_megatron.models.qwen_vl.model import QwenVLModel


@dataclass(frozen=True)
class LoadReport:
    """What a load did: parameters filled and distinct HF tensors read."""

    num_params: int
    num_hf_tensors: int


def chunk_mapped_params(model: QwenVLModel) -> list[tuple[str, MappedParam]]:
    """(local parameter name, mapped parameter) for every parameter of this chunk, in mapping order."""
    params = qwen_vl_chunk_params(
        model.qwen_config,
        model.options.layout,
        parallel_state.get_pipeline_model_parallel_rank(),
        model.vp_stage,
        model.options.transformer_impl,
    )
    return [(local_mcore_name(p, model.layer_range.start), p) for p in params]


def _check_coverage(model: QwenVLModel, mapped: list[tuple[str, MappedParam]]) -> dict[str, torch.nn.Parameter]:
    own = dict(model.named_parameters())
    names = [name for name, _ in mapped]
    missing_in_model = sorted(set(names) - set(own))
    unmapped = sorted(set(own) - set(names))
    if missing_in_model or unmapped:
        raise ValueError(
            f"mapping and model disagree on chunk (pp_rank={parallel_state.get_pipeline_model_parallel_rank()}, "
            f"vp_stage={model.vp_stage}): mapped but absent {missing_in_model[:5]}, present but unmapped {unmapped[:5]}"
        )
    return own


def load_hf_tensors(model: QwenVLModel, read: Callable[[str], Tensor]) -> LoadReport:
    """Fill every parameter of the chunk from HF tensors given by `read(hub_name)`."""
    mapped = chunk_mapped_params(model)
    own = _check_coverage(model, mapped)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    read_names: set[str] = set()
    with torch.no_grad():
        for local_name, param in mapped:
            hf = {name: read(name) for name in param.hf_names}
            read_names.update(hf)
            shard = hf_to_mcore_shard(param, hf, tp_rank, tp_size)
            target = own[local_name]
            if tuple(shard.shape) != tuple(target.shape):
                raise ValueError(
                    f"{param.mcore_name}: the mapping gives a shard of shape {tuple(shard.shape)} from "
                    f"{list(param.hf_names)}, the model's parameter {local_name} is {tuple(target.shape)}"
                )
            target.copy_(shard)
    return LoadReport(num_params=len(mapped), num_hf_tensors=len(read_names))


def load_hf_state_dict(model: QwenVLModel, state: Mapping[str, Tensor]) -> LoadReport:
    """Load from an in-memory HF state dict (either naming layout)."""
    by_hub_name = {canonical_hf_name(name): tensor for name, tensor in state.items()}

    def read(name: str) -> Tensor:
        if name not in by_hub_name:
            raise ValueError(f"HF state dict has no tensor {name!r} (nor its transformers-5 alias)")
        return by_hub_name[name]

    return load_hf_tensors(model, read)


def load_hf_checkpoint(model: QwenVLModel, hf_dir: str | Path) -> LoadReport:
    """Load from a safetensors checkpoint directory, reading only this chunk's tensors."""
    from lmmrl_megatron.convert.hf_io import HFCheckpointReader

    with HFCheckpointReader(hf_dir, check_config_shapes=False) as reader:
        stored = {canonical_hf_name(name): name for name in reader.names}

        def read(name: str) -> Tensor:
            if name not in stored:
                raise ValueError(f"{hf_dir}: no tensor {name!r} (nor its transformers-5 alias)")
            return reader.get(stored[name])

        return load_hf_tensors(model, read)
