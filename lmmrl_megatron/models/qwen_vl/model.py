"""Qwen2-VL / Qwen2.5-VL on Megatron-Core: vision tower on the first pipeline stage, GPT decoder with M-RoPE.

    model = QwenVLModel(config, options, pre_process=is_first, post_process=is_last, vp_stage=None)
    out = model(input_ids, attention_mask, pixel_values=..., image_grid_thw=..., labels=labels)
    out.log_probs   # [B, S] fp32 log p(labels) on the last stage; a hidden-state tensor on other stages

One instance is one pipeline chunk. The first chunk runs the vision encoder and patch merger on the images and
writes their features into the token embeddings at the `<|image_pad|>` (and `<|video_pad|>`) positions, in batch
order; the number of pad tokens must equal the number of merged patches. Later chunks receive hidden states from
Megatron's pipeline schedule (`set_input_tensor`). Every chunk needs `input_ids` (and the grids) because the 3D
rotary positions are computed from them when `position_ids` is not given.

The decoder is Megatron's `GPTModel` (`position_embedding_type="mrope"`) with the layer specs of `spec.py`; the
vocabulary is padded for TP and the padded columns are masked in the log-probs (`parallel/vocab_parallel.py`);
tied embeddings follow Megatron's shared-embedding mechanics (the last stage holds a copy, kept equal by the
embedding-group gradient all-reduce);
KV heads fewer than TP ranks are replicated with their gradients summed (`kv_replicas.py`) and stored once in
checkpoints (`kv_checkpoint.py`).

With `options.cuda_graphs` the decoder's training forward and backward are replayed from CUDA graphs per micro-batch
shape (`models/decoder_graphs.py`; `self.decoder_graphs`), eagerly wherever a call is not graphable.

Padding: `attention_mask` [B, S] (nonzero = real token) may pad on either side. With `packed=True` the real tokens
are packed into one row and attention runs per sample, so no compute is spent on padding; results are returned in
the padded layout either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from lmmrl_megatron.models.decoder_graphs import DecoderGraphs
from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig, decoder_transformer_config
from lmmrl_megatron.models.qwen_vl.fused import clear_rope_cache
from lmmrl_megatron.models.qwen_vl.kv_checkpoint import store_kv_heads_unreplicated
from lmmrl_megatron.models.qwen_vl.kv_replicas import attach_kv_replica_grad_sync
from lmmrl_megatron.models.qwen_vl.packed import PackedBatch, pack_padded_batch, unpack_to_padded
from lmmrl_megatron.models.qwen_vl.rope_index import get_rope_index
from lmmrl_megatron.models.qwen_vl.spec import decoder_block_spec
from lmmrl_megatron.models.qwen_vl.vision import QwenVisionEncoder
from lmmrl_megatron.models.qwen_vl.vision_config import vision_transformer_config
from lmmrl_megatron.parallel.vocab_parallel import vocab_parallel_log_probs


@dataclass
class QwenVLOutput:
    """What the last pipeline chunk returns. Tensors are in the padded [B, S] layout of the inputs."""

    log_probs: Tensor | None  # [B, S] fp32 log p(labels[b, s]); 0 where labels < 0 or at padding; None w/o labels
    logits: Tensor | None  # [B, S, padded_vocab / tp] this rank's vocab slice, padded columns as the output layer gives


class QwenVLModel(MegatronModule):
    """One pipeline chunk of a Qwen-VL model (see the module docstring)."""

    def __init__(
        self,
        config: QwenVLConfig,
        options: QwenVLBuildOptions,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        decoder_config = decoder_transformer_config(config, options)
        super().__init__(config=decoder_config)
        self.qwen_config = config
        self.options = options
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = config.tie_word_embeddings
        self.vocab_size = config.text.vocab_size
        self.padded_vocab_size = options.padded_vocab_size(config.text.vocab_size)

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_range = options.layout.decoder_layer_range(config.text.num_layers, pp_rank, vp_stage)
        self.language_model = GPTModel(
            config=decoder_config,
            transformer_layer_spec=decoder_block_spec(
                decoder_config, options.transformer_impl, len(self.layer_range), fused=options.fused_kernels
            ),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=config.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=config.text.rope_theta,
            scatter_embedding_sequence_parallel=False,  # image features are merged first, then scattered here
            vp_stage=vp_stage,
        )
        # The decoder's training forward/backward replayed from CUDA graphs (eager wherever a call is not graphable)
        self.decoder_graphs = (
            DecoderGraphs.attach(self.language_model.decoder, before_forward=clear_rope_cache)
            if options.cuda_graphs
            else None
        )
        built = [layer.layer_number - 1 for layer in self.language_model.decoder.layers]
        assert built == list(self.layer_range), f"Megatron built layers {built}, the mapping expects {self.layer_range}"
        self.vision_model = (
            QwenVisionEncoder(config.vision, vision_transformer_config(config.vision, decoder_config))
            if pre_process
            else None
        )
        if self.vision_model is not None and torch.cuda.is_available() and not options.use_cpu_initialization:
            # Megatron's layers are created on the GPU; the patch embedding and rotary tables are plain torch
            # modules created on the host. One device for the whole chunk.
            self.vision_model.cuda(torch.cuda.current_device())
        self._attach_kv_grad_sync(decoder_config)

    def _attach_kv_grad_sync(self, decoder_config) -> None:
        text = self.qwen_config.text
        if text.num_key_value_heads >= self.options.layout.tp:
            return
        if decoder_config.gradient_accumulation_fusion:
            raise ValueError("replicated KV heads (num_key_value_heads < tp) need gradient_accumulation_fusion off")
        params = []
        for layer in self.language_model.decoder.layers:
            qkv = layer.self_attention.linear_qkv
            params += [qkv.weight] + ([qkv.bias] if getattr(qkv, "bias", None) is not None else [])
        attach_kv_replica_grad_sync(params, text.num_attention_heads, text.num_key_value_heads, text.head_dim)

    # ------------------------------------------------------------------------------------------ Megatron hooks

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's sharded state dict, with replicated KV heads stored once (`kv_checkpoint.py`): the
        checkpoint then has the same tensors at every TP size."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        return store_kv_heads_unreplicated(state, self.qwen_config.text, tp_rank, self.options.layout.tp)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        labels: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        return_logits: bool = False,
        packed: bool = False,
    ) -> QwenVLOutput | Tensor:
        """Run this chunk. `input_ids`, `attention_mask`, `labels`: [B, S]; `position_ids`: [3, B, S] or None
        (computed with `get_rope_index`); `pixel_values` / `image_grid_thw` as the Qwen-VL processor gives them.

        Returns `QwenVLOutput` on the last chunk, the hidden states to send on otherwise ([S, B, H], or [T, 1, H]
        when packed; divided over TP ranks along the sequence under sequence parallelism).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids, _ = get_rope_index(
                input_ids, self.qwen_config.rope_index_config, image_grid_thw, attention_mask, video_grid_thw
            )
        packed_batch: PackedBatch | None = None
        seq_params: PackedSeqParams | None = None
        decoder_ids, decoder_positions, decoder_labels, mask = input_ids, position_ids, labels, None
        te = self.options.transformer_impl == "transformer_engine"
        layout = self.options.layout
        if packed:
            if te:
                raise ValueError("packed=True needs transformer_impl='local' (its 'sbhd' packed format is ours)")
            multiple = layout.tp if layout.sequence_parallel else 1
            packed_batch = pack_padded_batch(input_ids, attention_mask, position_ids, labels, multiple)
            decoder_ids, decoder_positions = packed_batch.input_ids, packed_batch.position_ids
            decoder_labels, seq_params = packed_batch.labels, packed_batch.params
        else:
            if layout.sequence_parallel and input_ids.shape[1] % layout.tp:
                raise ValueError(
                    f"sequence_parallel splits the sequence over tp={layout.tp} ranks: the padded length "
                    f"{input_ids.shape[1]} must be a multiple of it (or pass packed=True, which pads by itself)"
                )
            mask = _key_padding_mask(attention_mask, input_ids, always=te)

        decoder_input = None
        if self.pre_process:
            decoder_input = self._embed(decoder_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        output = self.language_model(
            input_ids=decoder_ids,
            position_ids=decoder_positions,
            attention_mask=mask,
            decoder_input=decoder_input,
            packed_seq_params=seq_params,
            runtime_gather_output=False,
        )
        if not self.post_process:
            return output
        return self._outputs(output, decoder_labels, packed_batch, attention_mask, return_logits)

    def _embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        image_grid_thw: Tensor | None,
        pixel_values_videos: Tensor | None,
        video_grid_thw: Tensor | None,
    ) -> Tensor:
        """Token embeddings [S, B, H] with vision features written at the vision pad tokens."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        tokens = self.qwen_config.tokens
        for token_id, pixels, grid, what in (
            (tokens.image_token_id, pixel_values, image_grid_thw, "image"),
            (tokens.video_token_id, pixel_values_videos, video_grid_thw, "video"),
        ):
            embeddings = self._scatter_vision(embeddings, input_ids == token_id, pixels, grid, what)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _scatter_vision(
        self, embeddings: Tensor, is_pad: Tensor, pixels: Tensor | None, grid: Tensor | None, what: str
    ) -> Tensor:
        num_pad_tokens = int(is_pad.sum())
        if pixels is None or pixels.shape[0] == 0:
            if num_pad_tokens:
                raise ValueError(f"input_ids hold {num_pad_tokens} {what} pad tokens but no {what} pixels were given")
            return embeddings
        if grid is None:
            raise ValueError(f"{what} pixels were given without their grid_thw")
        assert self.vision_model is not None
        features = self.vision_model(pixels.to(self.config.params_dtype), grid)
        if features.shape[0] != num_pad_tokens:
            raise ValueError(
                f"{what} features and pad tokens do not match: the vision tower gave {features.shape[0]} features, "
                f"input_ids hold {num_pad_tokens} {what} pad tokens"
            )
        batch_index, seq_index = torch.nonzero(is_pad, as_tuple=True)  # batch-major: the order of the features
        return embeddings.index_put((seq_index, batch_index), features.to(embeddings.dtype))

    def _outputs(
        self,
        logits: Tensor,
        labels: Tensor | None,
        packed_batch: PackedBatch | None,
        attention_mask: Tensor | None,
        return_logits: bool,
    ) -> QwenVLOutput:
        log_probs = None
        if labels is not None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
            log_probs, _ = vocab_parallel_log_probs(logits, labels, self.vocab_size, tp_group)
        if packed_batch is not None:
            if log_probs is not None:
                log_probs = unpack_to_padded(log_probs, packed_batch)
            if return_logits:
                logits = unpack_to_padded(logits, packed_batch)
        elif log_probs is not None and attention_mask is not None:
            log_probs = log_probs.masked_fill(attention_mask == 0, 0.0)
        return QwenVLOutput(log_probs=log_probs, logits=logits if return_logits else None)


def build_model_chunks(config: QwenVLConfig, options: QwenVLBuildOptions) -> list[QwenVLModel]:
    """This rank's model chunks (one, or `options.layout.vpp` for the interleaved schedule), in virtual-stage order.

    The vision tower and embedding go to chunk 0 of pipeline rank 0, the output layer to the last chunk of the last
    rank. Call after Megatron's parallel state is initialised with the same tp / pp / vpp.
    """
    layout = options.layout
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return [
        QwenVLModel(
            config,
            options,
            pre_process=layout.is_first_chunk(pp_rank, vp_stage),
            post_process=layout.is_last_chunk(pp_rank, vp_stage),
            vp_stage=vp_stage,
        )
        for vp_stage in layout.vp_stages
    ]


def _key_padding_mask(attention_mask: Tensor | None, input_ids: Tensor, always: bool = False) -> Tensor | None:
    """Megatron's boolean mask [B, 1, 1, S] (True = masked key) for left padding; None when causal is enough.

    Under a causal mask, padding after the last real token of a row is never attended by a real token, so
    right-padded (and unpadded) batches need no mask at all: the fastest attention kernels then apply.
    `always` gives a mask regardless (transformer-engine's padding_causal attention expects one).
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    if not always and bool((valid[:, 1:] <= valid[:, :-1]).all()):
        return None
    return (~valid)[:, None, None, :]
