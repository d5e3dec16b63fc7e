"""Qwen2-VL / Qwen2.5-VL as a model family: what the converters (`convert/family.py`) need, in one object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmmrl_megatron.convert.hf_io import canonical_hf_name
from lmmrl_megatron.convert.mapping import decoder_layer_range
from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig, decoder_transformer_config


def check_layout(config: QwenVLConfig, tp: int, pp: int) -> None:
    """Refuse a TP/PP layout the model cannot be cut into, naming why.

    KV heads fewer than TP ranks are fine: the model replicates them but stores them once (`kv_checkpoint.py`), so
    a checkpoint of global, unreplicated tensors loads at such a layout too.
    """
    options = QwenVLBuildOptions(tp=tp, pp=pp, dtype="fp32")
    decoder_transformer_config(config, options)  # heads / KV heads against tp
    for stage in range(pp):
        decoder_layer_range(config.text.num_layers, options.shard_layout, stage)


@dataclass(frozen=True)
class QwenVLFamily:
    name: str = "qwen_vl"
    hf_model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
    embedding_key: str = "language_model.embedding.word_embeddings.weight"

    def read_config(self, hf_dir: str | Path) -> QwenVLConfig:
        return QwenVLConfig.from_hf_dir(hf_dir)

    def check_layout(self, config: QwenVLConfig, tp: int, pp: int) -> None:
        check_layout(config, tp, pp)

    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def checkpoint_model(self, config: QwenVLConfig, dtype: torch.dtype):
        from lmmrl_megatron.models.qwen_vl.checkpoint_model import QwenVLCheckpointModel

        return QwenVLCheckpointModel(config, dtype)


QWEN_VL = QwenVLFamily()
