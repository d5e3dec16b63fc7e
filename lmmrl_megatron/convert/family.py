"""What the model-agnostic converters need from a model family, and nothing else.

A family (`models/<family>/family.py`, found by `models/registry.py`) gives the converters its Hugging Face config
reader, the TP/PP layouts it can be cut into, its HF tensor naming and its checkpoint model: the Megatron
checkpoint's template and the two directions of its mapping, one parameter at a time. `convert/pipeline.py` drives
any family through these; it never imports a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from lmmrl_megatron.convert.dcp_stream import CheckpointTemplate
from lmmrl_megatron.convert.export import HFTensors
from lmmrl_megatron.convert.hf_io import TensorSpec
from lmmrl_megatron.parallel.layout import ShardLayout


class CheckpointModel(Protocol):
    """A family's model as the converters see it: the checkpoint's layout and the mapping, per parameter."""

    template: CheckpointTemplate

    def hf_to_mcore(self, mcore_name: str, read_hf: Callable[[str], torch.Tensor]) -> torch.Tensor: ...

    def mcore_to_hf(self, mcore_name: str, value: torch.Tensor) -> HFTensors: ...

    def hf_specs(self, mcore_names: Sequence[str]) -> list[TensorSpec]: ...


class CheckpointFamily(Protocol):
    name: str
    hf_model_types: tuple[str, ...]  # the `model_type` values of its Hugging Face configs
    embedding_key: str  # a parameter every checkpoint of the family holds, stored in the model's dtype

    def read_config(self, hf_dir: str | Path) -> Any: ...

    def check_layout(self, config: Any, layout: ShardLayout) -> None: ...

    def canonical_hf_name(self, name: str) -> str: ...

    def checkpoint_model(self, config: Any, dtype: torch.dtype) -> CheckpointModel: ...


# hf_dir -> the family of the checkpoint there (models/registry.py: family_of_hf_dir)
FamilyResolver = Callable[[Path], CheckpointFamily]
