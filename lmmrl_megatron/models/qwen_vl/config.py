"""Typed Qwen2-VL / Qwen2.5-VL configuration read from a Hugging Face `config.json`, and the Megatron configs it gives.

    config = QwenVLConfig.from_hf_dir("/ckpt/Qwen2.5-VL-7B-Instruct")
    options = QwenVLBuildOptions(layout=ShardLayout(tp=4, pp=2), dtype="bf16")
    decoder_config = decoder_transformer_config(config, options)   # a Megatron-Core TransformerConfig

Both config layouts are read: the hub's flat one (text fields at the top level, `rope_scaling: {type: mrope,
mrope_section: [...]}`) and transformers 5's nested one (`text_config` with `rope_parameters`). Anything the model
cannot honour (sliding-window attention, a rope type other than default/mrope, mismatched rotary sections) is a
ValueError naming the file and key.

Vocabulary padding: the embedding and output layer hold `padded_vocab_size` rows (a multiple of
`make_vocab_size_divisible_by * tp`, Megatron's rule), so every TP rank gets an equal slice. Padded rows are zero
and their logits are masked out of every softmax, so they never change a log-probability.

KV heads fewer than TP ranks: Megatron splits query groups over TP ranks, so with `num_key_value_heads < tp` each
KV head is replicated `tp / num_key_value_heads` times (`num_query_groups = tp`); see `kv_replication`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmmrl_megatron.convert.mapping import padded_vocab_size
from lmmrl_megatron.models.qwen_vl.rope_index import RopeIndexConfig
from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig
from lmmrl_megatron.parallel.layout import ShardLayout

Arch = Literal["qwen2_vl", "qwen2_5_vl"]
ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
DType = Literal["fp32", "bf16", "fp16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TextConfig:
    """The language decoder's dimensions, as Hugging Face names them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                     "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"text config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text config: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"text config: mrope_section={self.mrope_section} must be 3 sections summing to "
                             f"head_dim / 2 = {self.head_dim // 2}")


@dataclass(frozen=True)
class TokenIds:
    """Special token ids the model and the 3D position ids need."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


@dataclass(frozen=True)
class QwenVLConfig:
    """One Qwen-VL checkpoint's architecture: decoder, vision tower, special tokens, tied embeddings."""

    arch: Arch
    text: TextConfig
    vision: VisionEncoderConfig
    tokens: TokenIds
    tie_word_embeddings: bool = False
    # Qwen2.5-VL: temporal rotary positions per second of video (vision_config.tokens_per_second)
    tokens_per_second: float = 2.0

    @staticmethod
    def from_hf_dir(hf_dir: str | Path) -> "QwenVLConfig":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return QwenVLConfig.from_hf_dict(raw, source=str(path))

    @staticmethod
    def from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> "QwenVLConfig":
        arch = raw.get("model_type")
        if arch not in ARCHS:
            raise ValueError(f"{source}: model_type={arch!r} is not one of {ARCHS}")
        text = _text_config(raw, source)
        vision_raw = raw.get("vision_config")
        if not isinstance(vision_raw, dict):
            raise ValueError(f"{source}: vision_config is missing")
        try:
            vision = VisionEncoderConfig.from_hf(vision_raw, arch=arch)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: vision_config: {exc}") from exc
        tokens = TokenIds(
            image_token_id=_int(raw, "image_token_id", 151655, source),
            video_token_id=_int(raw, "video_token_id", 151656, source),
            vision_start_token_id=_int(raw, "vision_start_token_id", 151652, source),
            vision_end_token_id=_int(raw, "vision_end_token_id", 151653, source),
        )
        # transformers < 5 saved `tie_word_embeddings` inside text_config; either place counts (as transformers does).
        tied = bool(raw.get("tie_word_embeddings", False)) or bool(
            (raw.get("text_config") or {}).get("tie_word_embeddings", False)
        )
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"{source}: the vision merger outputs {vision.out_hidden_size} features but the "
                             f"text hidden_size is {text.hidden_size}")
        return QwenVLConfig(
            arch=arch,
            text=text,
            vision=vision,
            tokens=tokens,
            tie_word_embeddings=tied,
            tokens_per_second=float(vision_raw.get("tokens_per_second", 2.0)),
        )

    @property
    def rope_index_config(self) -> RopeIndexConfig:
        """What `get_rope_index` needs to know about this model's vision tokens."""
        return RopeIndexConfig(
            image_token_id=self.tokens.image_token_id,
            video_token_id=self.tokens.video_token_id,
            spatial_merge_size=self.vision.spatial_merge_size,
            tokens_per_second=self.tokens_per_second if self.arch == "qwen2_5_vl" else None,
        )


def _int(raw: dict[str, Any], key: str, default: int, source: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int):
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _text_config(raw: dict[str, Any], source: str) -> TextConfig:
    """Text fields from the nested `text_config` (transformers 5) over the flat top level (hub checkpoints)."""
    nested = raw.get("text_config") or {}
    fields = {**{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}, **nested}
    where = f"{source}: text_config" if nested else source
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(fields.get(key), int):
            raise ValueError(f"{where}: {key} is missing or not an integer")
    if fields.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    if fields.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={fields['hidden_act']!r}; only 'silu' is supported")
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (default / mrope only)")
    mrope_section = rope.get("mrope_section")
    if mrope_section is None:
        raise ValueError(f"{where}: rope_scaling.mrope_section (or rope_parameters.mrope_section) is missing")
    num_heads = fields["num_attention_heads"]
    return TextConfig(
        vocab_size=fields["vocab_size"],
        hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"],
        num_layers=fields["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=fields.get("num_key_value_heads") or num_heads,
        rms_norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", fields.get("rope_theta", 1_000_000.0))),
        mrope_section=[int(s) for s in mrope_section],
        max_position_embeddings=int(fields.get("max_position_embeddings", 32768)),
        initializer_range=float(fields.get("initializer_range", 0.02)),
    )


# ---------------------------------------------------------------------------------------------- build options


@dataclass(frozen=True)
class QwenVLBuildOptions:
    """How to build the Megatron model: parallel layout, precision, layer implementation, recompute."""

    layout: ShardLayout = field(default_factory=ShardLayout)
    dtype: DType = "bf16"
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    recompute: Literal["none", "selective", "full"] = "none"
    # local layers: fused rotary / SwiGLU and plain TP=1 linears (models/qwen_vl/fused.py); False = Megatron's own
    fused_kernels: bool = True
    # CUDA graphs of the decoder's training forward/backward per micro-batch shape (models/decoder_graphs.py)
    cuda_graphs: bool = False
    make_vocab_size_divisible_by: int = 128
    use_cpu_initialization: bool = False
    perform_initialization: bool = True  # False when weights are loaded right after building
    # built on the meta device (planner, converters): Megatron then skips the first/last-stage all-reduce of tied
    # embeddings, which would move a meta weight to CUDA
    meta_device: bool = False

    def __post_init__(self) -> None:
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {self.make_vocab_size_divisible_by}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def padded_vocab_size(self, vocab_size: int) -> int:
        return padded_vocab_size(vocab_size, self.layout.tp, self.make_vocab_size_divisible_by)


def kv_replication(num_key_value_heads: int, tp: int) -> int:
    """How many copies of each KV head the decoder holds at this TP size (1 when KV heads >= TP).

    Megatron needs the query groups split evenly over TP ranks. With fewer KV heads than ranks, each KV head is
    copied onto the `tp / num_key_value_heads` ranks whose query heads use it. The copies receive different
    gradients (each from its own query heads); the true gradient of the shared head is their sum, so the model
    sums them across the copies in backward (`kv_replicas.attach_kv_replica_grad_sync`) so the copies stay equal.
    """
    if num_key_value_heads >= tp:
        if num_key_value_heads % tp:
            raise ValueError(f"num_key_value_heads={num_key_value_heads} is not a multiple of tp={tp}")
        return 1
    if tp % num_key_value_heads:
        raise ValueError(f"tp={tp} is not a multiple of num_key_value_heads={num_key_value_heads}")
    return tp // num_key_value_heads


def decoder_transformer_config(config: QwenVLConfig, options: QwenVLBuildOptions) -> Any:
    """The Megatron-Core `TransformerConfig` of the language decoder at this layout."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    text, layout = config.text, options.layout
    if text.num_attention_heads % layout.tp:
        raise ValueError(f"num_attention_heads={text.num_attention_heads} is not a multiple of tp={layout.tp}")
    replication = kv_replication(text.num_key_value_heads, layout.tp)
    dtype = options.torch_dtype
    recompute: dict[str, Any] = {}
    if options.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif options.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return TransformerConfig(
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads * replication,
        kv_channels=text.head_dim,
        add_qkv_bias=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=text.initializer_range,
        mrope_section=list(text.mrope_section),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_in_first_pipeline_stage=layout.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=layout.num_layers_in_last_pipeline_stage,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        variable_seq_lengths=True,  # RL batches change length every micro-batch
        moe_token_dispatcher_type="alltoall",  # unused (dense model); the default refuses variable_seq_lengths
        use_cpu_initialization=options.use_cpu_initialization,
        perform_initialization=options.perform_initialization,
        init_model_with_meta_device=options.meta_device,
        # The fused kernels below need apex / transformer-engine; the unfused paths are exact.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **recompute,
    )
