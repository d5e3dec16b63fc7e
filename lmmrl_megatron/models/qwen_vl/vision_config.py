"""The vision tower's shape, read from a Hugging Face `vision_config`, and the Megatron config it runs under.

Both families share one encoder; they differ in norm (LayerNorm vs RMSNorm), MLP (QuickGELU fc1/fc2 vs SwiGLU
gate/up/down), attention (full vs windowed with full attention at `fullatt_block_indexes`) and key names in
`config.json` (Qwen2-VL's `embed_dim`/`mlp_ratio`/`hidden_size`=merger output vs Qwen2.5-VL's
`hidden_size`/`intermediate_size`/`out_hidden_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from lmmrl_megatron.convert.mapping import pad_to_multiple

VisionArch = Literal["qwen2_vl", "qwen2_5_vl"]
VISION_ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
_ARCH_BY_MODEL_TYPE = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl",
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), Qwen2-VL's vision activation (plain: Megatron's version is torch.compile'd)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
}


@dataclass
class VisionEncoderConfig:
    """Shape of a Qwen-VL vision tower. Defaults are Qwen2.5-VL-3B's."""

    arch: VisionArch = "qwen2_5_vl"
    depth: int = 32
    hidden_size: int = 1280  # width of the transformer blocks (Qwen2-VL calls it embed_dim)
    num_heads: int = 16
    intermediate_size: int = 3420  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    out_hidden_size: int = 2048  # merger output = the language model's hidden size
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels; Qwen2.5-VL only
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    rope_theta: float = 10000.0
    layernorm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.arch not in VISION_ARCHS:
            raise ValueError(f"vision arch must be one of {VISION_ARCHS}, got {self.arch!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"vision_config: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4 != 0:
            # The 2D rotary gives head_dim/4 frequencies to each of the row and column axes.
            raise ValueError(f"vision_config: head_dim={self.head_dim} must be a multiple of 4 for the 2D rotary")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.arch == "qwen2_5_vl":
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"vision_config.fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
            merged_patch = self.patch_size * self.spatial_merge_size
            if self.window_size < merged_patch or self.window_size % merged_patch != 0:
                raise ValueError(
                    f"vision_config.window_size={self.window_size} must be a positive multiple of "
                    f"patch_size*spatial_merge_size={merged_patch}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def gated_mlp(self) -> bool:
        return self.arch == "qwen2_5_vl"

    @property
    def normalization(self) -> str:
        return "LayerNorm" if self.arch == "qwen2_vl" else "RMSNorm"

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (2x2)."""
        return self.spatial_merge_size**2

    @property
    def patch_input_size(self) -> int:
        """Values per flattened patch in `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_hidden_size(self) -> int:
        return self.hidden_size * self.merge_unit

    @property
    def uses_window_attention(self) -> bool:
        return self.arch == "qwen2_5_vl"

    @property
    def window_merged_tokens(self) -> int:
        """Window side in merged tokens (Qwen2.5-VL: 112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def layer_uses_full_attention(self, layer_index: int) -> bool:
        """Whether 0-based block `layer_index` attends over the whole image (else within windows)."""
        return not self.uses_window_attention or layer_index in self.fullatt_block_indexes

    def padded_intermediate_size(self, tensor_parallel_size: int) -> int:
        """MLP width rounded up to a multiple of TP (Qwen2.5-VL's 3420 does not divide by 8).

        The extra units have zero weights and biases in fc1 and fc2 and act(0) * 0 = 0, so they change nothing
        and stay zero under training (their gradients are zero too).
        """
        return pad_to_multiple(self.intermediate_size, tensor_parallel_size)

    @staticmethod
    def from_hf(vision_config: dict[str, Any], arch: str | None = None) -> "VisionEncoderConfig":
        """Read a `vision_config` dict from a Qwen2-VL / Qwen2.5-VL `config.json` (hub or transformers 5 style).

        `arch` is the top-level `model_type`; when omitted it is taken from the dict's own `model_type`.
        """
        if arch is None:
            model_type = vision_config.get("model_type")
            if model_type not in _ARCH_BY_MODEL_TYPE:
                raise ValueError(f"vision_config.model_type={model_type!r}: pass arch= one of {VISION_ARCHS}")
            arch = _ARCH_BY_MODEL_TYPE[model_type]
        if arch not in VISION_ARCHS:
            raise ValueError(f"model_type={arch!r} is not a Qwen-VL family; expected one of {VISION_ARCHS}")
        cfg = vision_config
        rope = cfg.get("rope_parameters") or {}
        common = dict(
            arch=arch,
            depth=int(cfg["depth"]),
            num_heads=int(cfg["num_heads"]),
            in_channels=int(cfg.get("in_channels", cfg.get("in_chans", 3))),
            patch_size=int(cfg.get("patch_size", cfg.get("spatial_patch_size", 14))),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        )
        if arch == "qwen2_vl":
            embed_dim = int(cfg["embed_dim"])
            return VisionEncoderConfig(
                **common,
                hidden_size=embed_dim,
                intermediate_size=int(embed_dim * cfg.get("mlp_ratio", 4)),
                out_hidden_size=int(cfg["hidden_size"]),
                hidden_act=cfg.get("hidden_act", "quick_gelu"),
                fullatt_block_indexes=[],
            )
        return VisionEncoderConfig(
            **common,
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            out_hidden_size=int(cfg["out_hidden_size"]),
            hidden_act=cfg.get("hidden_act", "silu"),
            window_size=int(cfg.get("window_size", 112)),
            fullatt_block_indexes=[int(i) for i in cfg.get("fullatt_block_indexes", [7, 15, 23, 31])],
        )

    @staticmethod
    def from_hf_model_config(config: dict[str, Any]) -> "VisionEncoderConfig":
        """From a whole `config.json` dict (its `model_type` picks the family)."""
        if "vision_config" not in config:
            raise ValueError("config.json has no 'vision_config' section")
        return VisionEncoderConfig.from_hf(config["vision_config"], arch=config.get("model_type"))


# Fields of the language model's TransformerConfig the vision tower inherits: parallel layout of the tensor
# dimension, dtype, initialisation and fusions. Pipeline and sequence parallelism are not inherited: the tower
# lives whole on the first pipeline stage and runs without sequence parallelism.
_INHERITED_FIELDS = (
    "tensor_model_parallel_size",
    "params_dtype",
    "bf16",
    "fp16",
    "use_cpu_initialization",
    "perform_initialization",
    "init_method_std",
    "gradient_accumulation_fusion",
    "bias_dropout_fusion",
    "deterministic_mode",
)


def vision_transformer_config(vision: VisionEncoderConfig, like: TransformerConfig) -> TransformerConfig:
    """Megatron config for the vision blocks, taking TP size, dtype and fusions from the decoder's `like`.

    Full activation recompute in `like` (`recompute_granularity="full"`) recomputes every vision block;
    selective recompute is passed through as is.
    """
    tp = like.tensor_model_parallel_size
    if vision.num_heads % tp != 0:
        raise ValueError(f"vision_config.num_heads={vision.num_heads} not divisible by tensor parallel size {tp}")
    if vision.merger_hidden_size % tp != 0:
        raise ValueError(f"vision merger width {vision.merger_hidden_size} not divisible by tensor parallel size {tp}")
    inherited = {name: getattr(like, name) for name in _INHERITED_FIELDS}
    recompute: dict[str, Any] = {}
    if like.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif like.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=list(like.recompute_modules or []))
    return TransformerConfig(
        **inherited,
        **recompute,
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.padded_intermediate_size(tp),
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=vision.gated_mlp,
        activation_func=ACTIVATIONS[vision.hidden_act],
        bias_activation_fusion=False,
        normalization=vision.normalization,
        layernorm_epsilon=vision.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
    )

