"""Our Megatron Qwen-VL against transformers' on the same weights and the same multimodal batch.

    batch = build_parity_batch(hf_dir)                    # images of several sizes, a text-only sample, padding
    reference = hf_reference(hf_dir, batch, "fp32")        # transformers' logits and label log-probs
    # in every rank of a TP x PP job (parallel state initialised):
    ours = megatron_forward(hf_dir, batch, "fp32")         # ParityOutputs on the last stage's TP rank 0, else None
    report = compare(ours, reference, batch)               # largest absolute / relative differences

Only real tokens are compared: logits where attention_mask is 1, log-probs where the label is also >= 0.
Relative differences are |ours - ref| / max(|ref|, 1e-2) (the floor keeps values near zero from dominating).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lmmrl_megatron.models.qwen_vl.config import TORCH_DTYPES, QwenVLBuildOptions, QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout

# Largest accepted absolute differences per dtype (logits, log-probs). bf16 rounds every matmul input to 8 bits of
# mantissa and the two implementations order their reductions differently, so its bounds are loose; a mapping or
# masking bug moves log-probs by whole nats.
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 1e-4), "bf16": (0.5, 0.25)}
RELATIVE_FLOOR = 1e-2

# (height, width) in pixels of each image, per sample; None marks a text-only sample. Non-square sizes on purpose.
_IMAGE_SIZES: list[list[tuple[int, int]]] = [[(56, 112), (84, 56)], [], [(112, 84)], [(56, 56)]]
_PROMPTS = ["describe both pictures", "a question without any picture at all, longer than the others", "what is it",
            "count"]


@dataclass(frozen=True)
class ParityBatch:
    """One padded multimodal batch as the Qwen-VL processor makes it, with next-token labels."""

    input_ids: Tensor  # [B, S]
    attention_mask: Tensor  # [B, S]
    labels: Tensor  # [B, S]: input_ids shifted left; -100 at padding and at each row's last token
    pixel_values: Tensor  # [num_patches, C*T*P*P]
    image_grid_thw: Tensor  # [num_images, 3]
    mm_token_type_ids: Tensor  # [B, S]: 1 at image pad tokens (transformers 5 needs it for the 3D positions)


@dataclass
class ParityOutputs:
    logits: Tensor  # [B, S, vocab] fp32
    log_probs: Tensor  # [B, S] fp32


@dataclass
class ParityReport:
    max_abs_logits: float
    max_rel_logits: float
    max_abs_log_probs: float
    max_rel_log_probs: float
    mean_abs_log_probs: float
    num_tokens: int
    extra: dict[str, float] = field(default_factory=dict)

    def within(self, dtype: str) -> bool:
        logits_tol, log_prob_tol = TOLERANCES[dtype]
        return self.max_abs_logits <= logits_tol and self.max_abs_log_probs <= log_prob_tol


def build_parity_batch(hf_dir: str | Path, padding_side: str = "left", seed: int = 0) -> ParityBatch:
    """The fixed batch: two images in one sample, a text-only sample, images of different non-square sizes."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    rng = np.random.default_rng(seed)
    texts, images = [], []
    for sizes, prompt in zip(_IMAGE_SIZES, _PROMPTS):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok " + prompt[::-1]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor.tokenizer.padding_side = padding_side
    encoded = processor(text=texts, images=images, return_tensors="pt", padding=True)
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    labels = labels.masked_fill(mask == 0, -100)
    config = QwenVLConfig.from_hf_dir(hf_dir)
    token_type = (input_ids == config.tokens.image_token_id).long()
    return ParityBatch(input_ids, mask, labels, encoded["pixel_values"], encoded["image_grid_thw"], token_type)


def label_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log_softmax(logits)[label] in fp32, 0 where the label is < 0."""
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return log_probs.masked_fill(labels < 0, 0.0)


def exact_fp32(dtype: str) -> None:
    """For fp32 comparisons, keep CUDA from rounding matmul and convolution inputs to TF32 (10-bit mantissa):
    transformers' patch embedding is a Conv3d, which cuDNN runs in TF32 by default."""
    if dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def hf_reference(hf_dir: str | Path, batch: ParityBatch, dtype: str = "fp32", device: str = "cpu") -> ParityOutputs:
    """transformers' own model (SDPA attention) on the batch."""
    from transformers import AutoModelForImageTextToText

    exact_fp32(dtype)
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa")
    model.to(device).eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            pixel_values=batch.pixel_values.to(device),
            image_grid_thw=batch.image_grid_thw.to(device),
            mm_token_type_ids=batch.mm_token_type_ids.to(device),
        ).logits.float()
    return ParityOutputs(logits=logits.cpu(), log_probs=label_log_probs(logits, batch.labels.to(device)).cpu())


def build_chunk(hf_dir: str | Path, options: QwenVLBuildOptions):
    """This rank's (single, non-interleaved) model chunk with the checkpoint's weights loaded."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.loading import load_hf_checkpoint
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel

    config = QwenVLConfig.from_hf_dir(hf_dir)
    model = QwenVLModel(
        config,
        options,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
    )
    load_hf_checkpoint(model, hf_dir)
    return model


def batch_on(batch: ParityBatch, device: torch.device | str) -> dict[str, Tensor]:
    return {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "labels": batch.labels.to(device),
        "pixel_values": batch.pixel_values.to(device),
        "image_grid_thw": batch.image_grid_thw.to(device),
    }


def split_micro_batches(batch: ParityBatch, num_micro_batches: int, image_token_id: int,
                        spatial_merge_size: int) -> list[dict[str, Tensor]]:
    """The batch cut into `num_micro_batches` consecutive groups of samples, each with its own images' pixels."""
    merged_tokens = batch.image_grid_thw.prod(dim=1) // spatial_merge_size**2
    patches = batch.image_grid_thw.prod(dim=1)
    tokens_per_sample = (batch.input_ids == image_token_id).sum(dim=1)
    out = []
    next_image, next_patch = 0, 0
    for samples in torch.arange(batch.input_ids.shape[0]).chunk(num_micro_batches):
        needed, first_image = int(tokens_per_sample[samples].sum()), next_image
        while needed > 0:
            needed -= int(merged_tokens[next_image])
            next_image += 1
        assert needed == 0, "image tokens of a sample do not add up to whole images"
        num_patches = int(patches[first_image:next_image].sum())
        out.append({
            "input_ids": batch.input_ids[samples],
            "attention_mask": batch.attention_mask[samples],
            "labels": batch.labels[samples],
            "pixel_values": batch.pixel_values[next_patch : next_patch + num_patches],
            "image_grid_thw": batch.image_grid_thw[first_image:next_image],
        })
        next_patch += num_patches
    return out


def run_pipeline(
    chunks: Sequence[torch.nn.Module] | torch.nn.Module,
    micro_batches: Sequence[dict[str, Tensor]] | dict[str, Tensor],
    forward_only: bool,
    packed: bool,
) -> Any:
    """Micro-batches through Megatron's pipeline schedule (interleaved when given several chunks).

    The training signal (for backward) is minus the sum of the label log-probs. On the last stage returns the
    `QwenVLOutput` of each micro-batch (a single one when a single micro-batch dict was given), else None.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    single = isinstance(micro_batches, dict)
    batches = [micro_batches] if single else list(micro_batches)
    model = list(chunks) if isinstance(chunks, Sequence) else [chunks]
    captured: list[Any] = []

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(**batch, return_logits=True, packed=packed)

        def loss_func(out):
            captured.append(out)
            loss = -out.log_probs.sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    # The interleaved schedule reads one iterator per chunk; every chunk of a rank sees every micro-batch.
    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model,
        num_microbatches=len(batches),
        seq_length=batches[0]["input_ids"].shape[1],
        micro_batch_size=batches[0]["input_ids"].shape[0],
        forward_only=forward_only,
    )
    if not captured:
        return None
    return captured[0] if single else captured


def megatron_forward(hf_dir: str, batch: ParityBatch, dtype: str = "fp32", packed: bool = False,
                     device: str = "cpu") -> bytes | None:
    """Worker body (parallel state initialised): our forward; on the last stage's TP rank 0 the `ParityOutputs`
    (serialised with `to_bytes`), None elsewhere."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.parallel.vocab_parallel import gather_vocab_parallel_logits

    exact_fp32(dtype)
    layout = ShardLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size())
    options = QwenVLBuildOptions(
        layout=layout,
        dtype=dtype,
        use_cpu_initialization=device == "cpu",
        perform_initialization=False,
    )
    model = build_chunk(hf_dir, options)
    model.eval()
    with torch.no_grad():
        out = run_pipeline(model, batch_on(batch, device), forward_only=True, packed=packed)
    if out is None:
        return None
    logits = gather_vocab_parallel_logits(out.logits, model.vocab_size, ps.get_tensor_model_parallel_group())
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return to_bytes(ParityOutputs(logits=logits.float().cpu(), log_probs=out.log_probs.float().cpu()))


def to_bytes(value: object) -> bytes:
    """`value` serialised with torch.save: tensors travel by value between processes.

    A tensor put on a multiprocessing queue travels as a shared-memory handle that the receiver fetches from the
    sender; when the sender exits first (a worker returning its result and shutting down), the fetch fails.
    """
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> object:
    return torch.load(io.BytesIO(data), weights_only=False)


def _max_diffs(ours: Tensor, ref: Tensor) -> tuple[float, float, float]:
    if ours.numel() == 0:
        return 0.0, 0.0, 0.0
    diff = (ours - ref).abs()
    rel = diff / ref.abs().clamp(min=RELATIVE_FLOOR)
    return float(diff.max()), float(rel.max()), float(diff.mean())


def compare(ours: ParityOutputs, ref: ParityOutputs, batch: ParityBatch) -> ParityReport:
    """Largest differences over real tokens (see the module docstring)."""
    real = batch.attention_mask != 0
    scored = real & (batch.labels >= 0)
    abs_logits, rel_logits, _ = _max_diffs(ours.logits[real], ref.logits[real])
    abs_lp, rel_lp, mean_lp = _max_diffs(ours.log_probs[scored], ref.log_probs[scored])
    return ParityReport(abs_logits, rel_logits, abs_lp, rel_lp, mean_lp, int(scored.sum()))
