"""The model families, by name, and the one a Hugging Face checkpoint belongs to (its config's `model_type`).

    family = family_of_hf_dir(Path("/ckpt/Qwen2.5-VL-7B-Instruct"))    # QWEN_VL
    family = model_family("qwen_vl")

A family bundles what the rest of the code needs of a model without naming it: the converters' part
(`convert/family.py`) and the trainer's (`ModelFamily` below). A new family is a folder `models/<family>/` with its
`family.py` and one line in FAMILIES (docs/architecture.md lists the files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from lmmrl_megatron.convert.family import CheckpointFamily
from lmmrl_megatron.models.qwen_vl.family import QWEN_VL


class ModelFamily(CheckpointFamily, Protocol):
    """A family as the trainer uses it (the converters' part is inherited)."""

    def build_policy_chunks(self, model: Any, parallel: Any, use_gpu: bool) -> tuple[list[torch.nn.Module], Any]:
        """This rank's chunks at `parallel`'s layout filled from `model.pretrain` (ModelConfig, ParallelConfig), and
        the model config."""
        ...

    def forward(self, chunk: torch.nn.Module, micro_batch: Any) -> torch.Tensor:
        """Logits of this rank's vocabulary slice on the last stage, hidden states on the others."""
        ...

    def vocab_size(self, config: Any) -> int: ...

    def never_sampled_token_ids(self, config: Any) -> tuple[int, ...]: ...

    def attach_value_head(self, chunk: torch.nn.Module) -> None:
        """Turn one of `build_policy_chunks`' chunks into a critic's: a scalar value head for the vocabulary."""
        ...

    def shards_to_hf(self, config: Any, transformer_impl: str) -> Callable[[str, list[torch.Tensor]], Any]: ...


FAMILIES: dict[str, ModelFamily] = {
    QWEN_VL.name: QWEN_VL,
}


def model_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf_dir(hf_dir: Path) -> ModelFamily:
    """The family whose `hf_model_types` holds the `model_type` of `hf_dir/config.json`."""
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face checkpoint: it has no config.json")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for family in FAMILIES.values() for t in family.hf_model_types)
    raise ValueError(f"{config_path}: model_type is {model_type!r}, not a model this trainer knows (one of {known})")
