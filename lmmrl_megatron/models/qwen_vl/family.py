"""Qwen2-VL / Qwen2.5-VL as a model family: what the converters (`convert/family.py`) and the trainer need of the
model, in one object. The trainer builds its chunks, runs its forward and exports its weights only through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmmrl_megatron.convert.hf_io import canonical_hf_name
from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig, decoder_transformer_config
from lmmrl_megatron.parallel.layout import ShardLayout


def check_layout(config: QwenVLConfig, layout: ShardLayout) -> None:
    """Refuse a layout the model cannot be cut into, naming why.

    KV heads fewer than TP ranks are fine: the model replicates them but stores them once (`kv_checkpoint.py`), so
    a checkpoint of global, unreplicated tensors loads at such a layout too.
    """
    decoder_transformer_config(config, QwenVLBuildOptions(layout=layout, dtype="fp32"))  # heads / KV heads against tp
    for stage in range(layout.pp):
        for vp_stage in layout.vp_stages:
            layout.decoder_layer_range(config.text.num_layers, stage, vp_stage)


@dataclass(frozen=True)
class QwenVLFamily:
    name: str = "qwen_vl"
    hf_model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
    embedding_key: str = "language_model.embedding.word_embeddings.weight"

    def read_config(self, hf_dir: str | Path) -> QwenVLConfig:
        return QwenVLConfig.from_hf_dir(hf_dir)

    def check_layout(self, config: QwenVLConfig, layout: ShardLayout) -> None:
        check_layout(config, layout)

    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def checkpoint_model(self, config: QwenVLConfig, dtype: torch.dtype):
        from lmmrl_megatron.models.qwen_vl.checkpoint_model import QwenVLCheckpointModel

        return QwenVLCheckpointModel(config, dtype)

    # -- what the trainer needs ---------------------------------------------------------------------------------

    def build_policy_chunks(self, model: Any, parallel: Any, use_gpu: bool) -> tuple[list[torch.nn.Module], Any]:
        """(this rank's chunks filled from `model.pretrain`, the model config); see `policy.py`."""
        from lmmrl_megatron.models.qwen_vl.policy import build_policy_chunks

        return build_policy_chunks(model, parallel, use_gpu)

    def forward(self, chunk: torch.nn.Module, micro_batch: Any) -> torch.Tensor:
        from lmmrl_megatron.models.qwen_vl.policy import qwen_vl_forward

        return qwen_vl_forward(chunk, micro_batch)

    def vocab_size(self, config: QwenVLConfig) -> int:
        return config.text.vocab_size

    def never_sampled_token_ids(self, config: QwenVLConfig) -> tuple[int, ...]:
        from lmmrl_megatron.models.qwen_vl.policy import never_sampled_token_ids

        return never_sampled_token_ids(config)

    def attach_value_head(self, chunk: torch.nn.Module) -> None:
        """Make a loaded policy chunk a critic chunk (PPO's value model); see `critic.py`."""
        from lmmrl_megatron.models.qwen_vl.critic import attach_value_head

        attach_value_head(chunk)

    def shards_to_hf(self, config: QwenVLConfig, transformer_impl: str):
        """The live export's converter: (global Megatron name, TP shards) -> HF tensors."""
        from lmmrl_megatron.models.qwen_vl.checkpoint_model import qwen_vl_shards_to_hf

        return qwen_vl_shards_to_hf(config, transformer_impl)  # type: ignore[arg-type]


QWEN_VL = QwenVLFamily()
