"""The Qwen2-VL / Qwen2.5-VL vision encoder on Megatron-Core transformer layers, tensor parallel.

    encoder = QwenVisionEncoder(vision_cfg, vision_transformer_config(vision_cfg, decoder_transformer_config))
    image_embeds = encoder(pixel_values, image_grid_thw)   # [num_merged_tokens, out_hidden_size]

pixel_values [num_patches, C*T*P*P] -> patch embedding -> (Qwen2.5-VL: window order) -> blocks with the 2D
rotary and per-frame / per-window attention segments -> merger (norm, 2x2 concat, Linear-GELU-Linear) ->
(Qwen2.5-VL: back to the processor's order). The output is complete on every tensor-parallel rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig
from lmmrl_megatron.models.qwen_vl.vision_geometry import VisionTokenLayout
from lmmrl_megatron.models.qwen_vl.vision_rope import VisionRotaryEmbedding
from lmmrl_megatron.models.qwen_vl.vision_spec import vision_block_spec


class VisionPatchEmbed(torch.nn.Module):
    """HF's Conv3d with kernel == stride over one patch is a matmul with the flattened kernel.

    The parameter keeps the Conv3d shape [hidden, C, T, P, P] so loading from Hugging Face is a copy; it is
    replicated over tensor-parallel ranks.
    """

    def __init__(self, config: VisionEncoderConfig, params_dtype: torch.dtype) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = torch.nn.Conv3d(
            config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False, dtype=params_dtype
        )
        self.patch_input_size = config.patch_input_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dim() != 2 or pixel_values.size(1) != self.patch_input_size:
            raise ValueError(
                f"pixel_values must be [num_patches, {self.patch_input_size}], got {tuple(pixel_values.shape)}"
            )
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.size(0), -1))


class VisionPatchMerger(MegatronModule):
    """Norm, concatenation of each 2x2 block's patches, then Linear-GELU-Linear (column then row parallel)."""

    def __init__(self, config: VisionEncoderConfig, transformer_config: TransformerConfig) -> None:
        super().__init__(config=transformer_config)
        self.merged_size = config.merger_hidden_size
        self.ln_q = WrappedTorchNorm(
            config=transformer_config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.linear_fc1 = ColumnParallelLinear(
            self.merged_size,
            self.merged_size,
            config=transformer_config,
            init_method=transformer_config.init_method,
            bias=True,
            gather_output=False,
            skip_bias_add=False,
        )
        self.linear_fc2 = RowParallelLinear(
            self.merged_size,
            config.out_hidden_size,
            config=transformer_config,
            init_method=transformer_config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[num_patches, 1, hidden] (block-major) -> [num_patches / merge_unit, out_hidden]."""
        merged = self.ln_q(hidden_states).reshape(-1, 1, self.merged_size)
        merged, _ = self.linear_fc1(merged)
        merged, _ = self.linear_fc2(F.gelu(merged))
        return merged.squeeze(1)


class QwenVisionEncoder(MegatronModule):
    """Vision tower of Qwen2-VL / Qwen2.5-VL. Parameters are named like Megatron's GPT layers:
    `patch_embed.proj.weight`, `decoder.layers.{i}.*`, `merger.*`; `mapping.vision_rules` lists each with its
    Hugging Face source and tensor-parallel split."""

    def __init__(self, config: VisionEncoderConfig, transformer_config: TransformerConfig) -> None:
        super().__init__(config=transformer_config)
        if transformer_config.num_layers != config.depth or transformer_config.hidden_size != config.hidden_size:
            raise ValueError(
                "transformer_config does not describe this vision tower: build it with vision_transformer_config"
            )
        self.vision_config = config
        self.patch_embed = VisionPatchEmbed(config, transformer_config.params_dtype)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        # TransformerBlock is the container (names, sharded checkpoints); forward runs the layers itself because
        # Qwen2.5-VL gives different layers different attention segments.
        self.decoder = TransformerBlock(
            transformer_config, vision_block_spec(config.depth), post_layer_norm=False, pre_process=True
        )
        self.merger = VisionPatchMerger(config, transformer_config)

    def forward(self, pixel_values: Tensor, image_grid_thw: Tensor, layout: VisionTokenLayout | None = None) -> Tensor:
        """Merged image features [sum(t*h*w) / merge_unit, out_hidden_size], images in `image_grid_thw` order.

        The layout is computed on the host from `image_grid_thw`: pass the grid on the CPU (or a `layout`
        precomputed with `VisionTokenLayout.build(image_grid_thw, config)`, e.g. in the data loader) to spare
        the one device-to-host sync a GPU grid costs.
        """
        if layout is None:
            layout = VisionTokenLayout.build(image_grid_thw, self.vision_config)
        if layout.num_patches != pixel_values.size(0):
            raise ValueError(
                f"pixel_values has {pixel_values.size(0)} patches but image_grid_thw describes {layout.num_patches}"
            )
        device = pixel_values.device
        layout = layout.to(device)
        hidden = self.patch_embed(pixel_values)
        if layout.window_index is not None:
            unit = self.vision_config.merge_unit
            hidden = hidden.view(-1, unit, hidden.size(-1)).index_select(0, layout.window_index).view_as(hidden)
        rotary = self.rotary_pos_emb(layout.rotary_positions)
        hidden = hidden.unsqueeze(1)  # [s, b=1, h]: all images are one packed sequence
        for index, layer in enumerate(self.decoder.layers):
            full = self.vision_config.layer_uses_full_attention(index)
            segments = layout.full_attention if full else layout.window_attention
            hidden = self._run_layer(layer, hidden, rotary, segments)
        merged = self.merger(hidden)
        if layout.reverse_window_index is not None:
            merged = merged.index_select(0, layout.reverse_window_index)
        return merged

    def _run_layer(
        self, layer: torch.nn.Module, hidden: Tensor, rotary: Tensor, segments: PackedSeqParams
    ) -> Tensor:
        def run(hidden_states: Tensor) -> Tensor:
            output, _ = layer(
                hidden_states=hidden_states, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=segments
            )
            return output

        if self.config.recompute_granularity == "full" and self.training:
            return tensor_parallel.checkpoint(run, False, hidden)
        return run(hidden)

