"""Forward+backward speed and bf16 parity of our Megatron Qwen2.5-VL against transformers' own, on one GPU.

    python bench/model_step.py                        # GPU: 3B and 7B shapes, bf16, 1 x 4096 tokens with 2 images
    python bench/model_step.py --tiny                 # CPU: tiny shapes, fp32, the same code path (a smoke test)
    python bench/model_step.py --shapes 3b --recompute none,selective --json out.json
    python bench/model_step.py --shapes 3b --recompute none --fused on,off --out table.md   # before/after fusion
    python bench/model_step.py --shapes 3b --recompute none --fused on --cuda-graphs off,on  # decoder CUDA graphs

One run does, in order: the GPU's bf16 matmul peak (8192^3, warm-ups then the mean of timed products); then for
each shape: transformers' `Qwen2_5_VLForConditionalGeneration` (attn_implementation="sdpa", bf16, gradient
checkpointing off) built from a seed and timed; our `QwenVLModel` at TP=1 built and loaded with the SAME weights
(`load_hf_state_dict`), the per-token log-prob parity of both on fixed batches, then ours timed at each recompute
setting and each `--fused` setting (on: `models/qwen_vl/fused.py`'s layers, the default build; off: Megatron's
unfused local layers; both hold the same weights and get their own parity lines), and with `--cuda-graphs on` with
the decoder replayed from CUDA graphs too (a graph parity line: its log-probs and gradients against the eager
step's, beside two eager steps' own difference). Random weights: nothing is
downloaded. Megatron's parallel state runs with world size 1 (NCCL on GPU,
gloo on CPU). A step is: zero grads, forward, log-probs of the labels (fp32), loss = -mean, backward. No optimizer.

Model FLOPs of one step (fwd + bwd = 3 x fwd; a matmul [m,k]x[k,n] is 2mkn forward; recomputation not counted):
    text dense     6 * T * (L * (h*(H*d) + 2*h*(K*d) + (H*d)*h + 3*h*F) + V*h)
                   T tokens through the decoder (image tokens included), L layers, hidden h, H query heads and K KV
                   heads of size d, SwiGLU width F, vocabulary V (the LM head; the embedding lookup is no matmul)
    text attention 6 * L * (H*d) * n^2 per sample of n tokens    (= 12*L*h*n^2/2: QK^T and PV, causal half)
    vision dense   6 * P * D * (4*hv^2 + 3*hv*Fv)                 (D blocks of width hv: qkv, proj, SwiGLU Fv)
                 + 4 * P * (C*Tp*p*p) * hv                        (patch embedding: its input needs no gradient)
                 + 6 * (P/4) * ((4*hv)^2 + 4*hv*h)                (the 2x2 merger MLP)
    vision attention 12 * hv * sum(n_seg^2) per block (bidirectional), segments = images for the full-attention
                   blocks and 8x8-patch windows (Qwen2.5-VL window 112 px) for the others
MFU = model FLOPs / step time / the bf16 matmul peak measured in the same run. tokens/s counts decoder tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repo's package

from gpu_timing import Clock, matmul_peak, profile_step, time_steps  # noqa: E402 - bench/ is on sys.path as the script's dir

QWEN_IDS = dict(bos=151643, eos=151645, image=151655, video=151656, vision_start=151652, vision_end=151653)
TINY_IDS = dict(bos=490, eos=491, image=500, video=501, vision_start=502, vision_end=503)


def _vision(depth: int, hidden: int, heads: int, inter: int, out: int, fullatt: list[int], window: int) -> dict:
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, intermediate_size=inter, out_hidden_size=out,
                hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                window_size=window, fullatt_block_indexes=fullatt, tokens_per_second=2)


def _text(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, mrope: list[int]) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, hidden_act="silu", rms_norm_eps=1e-6,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope})


@dataclass(frozen=True)
class Shape:
    """A Qwen2.5-VL architecture (random weights) and the benchmark batch for it."""

    text: dict
    vision: dict
    tied: bool
    ids: dict
    seq: int  # tokens per sample
    image_grids: list[tuple[int, int]]  # (rows, cols) in patches of each image of the sample
    text_only_row: bool  # also time a text-only sample of `seq` tokens


SHAPES: dict[str, Shape] = {
    # Qwen2.5-VL-3B-Instruct / 7B-Instruct's published dimensions
    "3b": Shape(_text(2048, 11008, 36, 16, 2, 151936, [16, 24, 24]),
                _vision(32, 1280, 16, 3420, 2048, [7, 15, 23, 31], 112), True, QWEN_IDS, 4096,
                [(64, 48), (32, 32)], True),
    "7b": Shape(_text(3584, 18944, 28, 28, 4, 152064, [16, 24, 24]),
                _vision(32, 1280, 16, 3420, 3584, [7, 15, 23, 31], 112), False, QWEN_IDS, 4096,
                [(64, 48), (32, 32)], False),
    "tiny": Shape(_text(64, 128, 2, 4, 2, 512, [2, 3, 3]), _vision(4, 64, 2, 96, 64, [1, 3], 56), True, TINY_IDS,
                  192, [(8, 12), (8, 8)], True),
}


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], -100 = not scored
    pixel_values: torch.Tensor | None  # [P, 1176]
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    mm_token_type_ids: torch.Tensor  # [B, S]: 1 at image pad tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batch(shape: Shape, rows: list[tuple[int, list[tuple[int, int]]]], device: str, seed: int) -> Batch:
    """`rows`: (real tokens, image grids) per sample; shorter samples are left-padded to the longest.

    Each sample is text with its images spread through it as <vision_start> <image_pad> * (h*w/4) <vision_end>.
    Text tokens are random ids below the special tokens; labels are the next token, not scored at padding, at the
    last token, or where the next token is an image pad.
    """
    gen = torch.Generator().manual_seed(seed)
    ids, seq = shape.ids, max(n for n, _ in rows)
    input_ids = torch.full((len(rows), seq), ids["bos"], dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    grids: list[list[int]] = []
    for r, (num_real, images) in enumerate(rows):
        pieces: list[torch.Tensor] = []
        text_left = num_real - sum(h * w // 4 + 2 for h, w in images)
        assert text_left >= len(images) + 1, f"sample of {num_real} tokens too short for its images"
        gap = max(1, text_left // (2 * len(images) + 2)) if images else text_left
        for h, w in images:
            pieces.append(torch.randint(0, ids["bos"], (gap,), generator=gen))
            pieces.append(torch.tensor([ids["vision_start"]] + [ids["image"]] * (h * w // 4) + [ids["vision_end"]]))
            text_left -= gap
            grids.append([1, h, w])
        pieces.append(torch.randint(0, ids["bos"], (text_left,), generator=gen))
        row = torch.cat(pieces)
        assert row.numel() == num_real
        input_ids[r, seq - num_real:] = row
        mask[r, seq - num_real:] = 1
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels.masked_fill((mask == 0) | (labels == ids["image"]), -100)
    labels[:, :-1] = labels[:, :-1].masked_fill(mask[:, 1:] == 0, -100)
    num_patches = sum(h * w for _, h, w in grids)
    pixels = torch.randn(num_patches, 3 * 2 * 14 * 14, generator=gen) if grids else None
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Batch(to(input_ids), to(mask), to(labels), to(pixels), to(grid), to((input_ids == ids["image"]).long()))


# ------------------------------------------------------------------------------------------------ FLOPs


@dataclass
class Flops:
    text_dense: float = 0.0
    text_attention: float = 0.0
    vision_dense: float = 0.0
    vision_attention: float = 0.0

    @property
    def total(self) -> float:
        return self.text_dense + self.text_attention + self.vision_dense + self.vision_attention


def _window_sizes(h: int, w: int, window_merged: int) -> list[int]:
    """Patches in each window of an image of h x w patches (windows of window_merged^2 merged tokens, edges cut)."""
    mh, mw = h // 2, w // 2
    rows = [min(window_merged, mh - i) for i in range(0, mh, window_merged)]
    cols = [min(window_merged, mw - j) for j in range(0, mw, window_merged)]
    return [r * c * 4 for r in rows for c in cols]


def step_flops(shape: Shape, batch: Batch, with_text: bool = True) -> Flops:
    """The docstring's formula for one fwd+bwd step on `batch` (with_text=False: the vision tower alone)."""
    t, v = shape.text, shape.vision
    h, L, H, K, ff, V = (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                         t["num_key_value_heads"], t["intermediate_size"], t["vocab_size"])
    d = h // H
    out = Flops()
    if with_text:
        per_layer = h * H * d + 2 * h * K * d + H * d * h + 3 * h * ff
        out.text_dense = 6.0 * batch.num_tokens * (L * per_layer + V * h)
        out.text_attention = sum(6.0 * L * H * d * float(n) ** 2 for n in batch.attention_mask.sum(dim=1).tolist())
    if batch.image_grid_thw is not None:
        hv, fv, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
        grids = [(int(tt), int(gh), int(gw)) for tt, gh, gw in batch.image_grid_thw.tolist()]
        P = sum(tt * gh * gw for tt, gh, gw in grids)
        patch_in = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
        out.vision_dense = (6.0 * P * depth * (4 * hv * hv + 3 * hv * fv) + 4.0 * P * patch_in * hv
                            + 6.0 * (P / 4) * ((4 * hv) ** 2 + 4 * hv * v["out_hidden_size"]))
        full = sum(float(tt * gh * gw) ** 2 for tt, gh, gw in grids)
        window_merged = v["window_size"] // v["spatial_merge_size"] // v["patch_size"]
        windowed = sum(tt * sum(float(s) ** 2 for s in _window_sizes(gh, gw, window_merged)) for tt, gh, gw in grids)
        num_full = len(v["fullatt_block_indexes"])
        out.vision_attention = 12.0 * hv * (num_full * full + (depth - num_full) * windowed)
    return out


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Result:
    shape: str
    impl: str
    batch: str
    recompute: str
    fused: str = ""  # ours: "on" = models/qwen_vl/fused.py's layers, "off" = Megatron's unfused local layers
    graphs: str = ""  # ours: "on" = the decoder replayed from CUDA graphs (models/decoder_graphs.py), "off" = eager
    step_s: float = float("nan")
    step_s_median: float = float("nan")
    tokens_per_s: float = float("nan")
    tflops: float = float("nan")
    mfu: float = float("nan")
    peak_mem_gib: float = float("nan")
    flops: dict = field(default_factory=dict)
    error: str = ""


def bench(result: Result, step: Callable[[], None], flops: Flops, tokens: int, args: argparse.Namespace,
          peak: float) -> Result:
    clock = Clock(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = time_steps(step, clock, args.warmup, args.iters)
    except torch.OutOfMemoryError as exc:
        result.error = f"OOM: {str(exc).splitlines()[0][:120]}"
        print(f"  {result.impl} {result.batch} {result.recompute}: {result.error}", flush=True)
        return result
    mean = sum(seconds) / len(seconds)
    result.step_s, result.step_s_median = mean, sorted(seconds)[len(seconds) // 2]
    result.tokens_per_s = tokens / mean
    result.tflops = flops.total / mean / 1e12
    result.mfu = flops.total / mean / peak
    result.flops = asdict(flops)
    if args.device == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {result.impl:5s} {result.fused:3s} {result.graphs:3s} {result.batch:12s} {result.recompute:9s} step {mean * 1e3:8.1f} ms "
          f"(median {result.step_s_median * 1e3:.1f}, min {min(seconds) * 1e3:.1f}, max {max(seconds) * 1e3:.1f}) "
          f"{result.tokens_per_s:9.0f} tok/s {result.tflops:7.1f} TFLOP/s MFU {result.mfu:6.1%} "
          f"mem {result.peak_mem_gib:5.1f} GiB", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ the two models


def hf_config(shape: Shape):
    from transformers import Qwen2_5_VLConfig

    ids = shape.ids
    text = dict(shape.text, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["bos"],
                tie_word_embeddings=shape.tied)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(shape.vision), tie_word_embeddings=shape.tied,
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


def build_hf(shape: Shape, dtype: torch.dtype, device: str, seed: int):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            hf_config(shape), dtype=dtype, attn_implementation="sdpa"
        )
    model.to(device)
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != shape.tied:
        print(f"  WARNING: transformers tied embeddings={tied}, the shape asks for {shape.tied}", flush=True)
    return model


def hf_forward_kwargs(model, batch: Batch) -> dict:
    import inspect

    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if batch.pixel_values is not None:
        kwargs.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["mm_token_type_ids"] = batch.mm_token_type_ids  # transformers >= 5.x needs it for the 3D positions
    return kwargs


def hf_log_probs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(label log-probs [B, S] fp32 with 0 where not scored, logits) of transformers' model."""
    logits = model(**hf_forward_kwargs(model, batch)).logits
    flat = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="none")
    return -flat.view_as(batch.labels), logits


def varlen_compat() -> str:
    """Adapt our attention to a torch whose `varlen_attn` takes no `scale` (torch 2.10 had `is_causal` only).

    `lmmrl_megatron/models/attention.py` always passes `scale=`; on such a torch the vision tower would fail with a
    TypeError. The bench folds a non-default scale into the queries instead and says so; the model is unchanged.
    """
    from lmmrl_megatron.models import attention

    original = attention._varlen_attn
    if original is None or "scale" in attention._VARLEN_PARAMS:
        return ""

    def varlen_without_scale(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, **kwargs):
        if scale is not None:
            q = q * (scale * q.size(-1) ** 0.5)  # varlen_attn applies 1/sqrt(d) itself
        return original(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    attention._varlen_attn = varlen_without_scale
    return f"varlen_attn{sorted(attention._VARLEN_PARAMS)} takes no scale: bench shim applied (models/attention.py bug)"


def init_megatron(device: str, seed: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    if device == "cuda":
        torch.cuda.set_device(0)
        backend = "nccl"
    else:
        from lmmrl_megatron.parallel.cpu_backend import install_cpu_backend

        install_cpu_backend()
        backend = "gloo"
    store = os.path.join(tempfile.mkdtemp(prefix="model-step-"), "store")
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_ours(qwen_config, dtype: str, device: str, recompute: str, fused: bool = True, graphs: bool = False):
    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel
    from lmmrl_megatron.parallel.layout import ShardLayout

    options = QwenVLBuildOptions(layout=ShardLayout(tp=1, pp=1), dtype=dtype, recompute=recompute, fused_kernels=fused,
                                 cuda_graphs=graphs, use_cpu_initialization=device == "cpu",
                                 perform_initialization=False)
    return QwenVLModel(qwen_config, options, pre_process=True, post_process=True)


def load_weights_from_hf(hf, dtype: str, device: str, recompute: str):
    """Ours at TP=1 holding transformers' model's weights, loaded through the shared HF -> Megatron mapping."""
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_state_dict

    ours = build_ours(QwenVLConfig.from_hf_dict(hf.config.to_dict()), dtype, device, recompute)
    load_hf_state_dict(ours, hf.state_dict())
    return ours


def ours_forward(model, batch: Batch, return_logits: bool = False):
    return model(batch.input_ids, batch.attention_mask, pixel_values=batch.pixel_values,
                 image_grid_thw=batch.image_grid_thw, labels=batch.labels, return_logits=return_logits)


def loss_of(log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
    return -log_probs.sum() / (batch.labels >= 0).sum().clamp(min=1)


def make_step(model, batch: Batch, impl: str) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        log_probs = ours_forward(model, batch).log_probs if impl == "ours" else hf_log_probs(model, batch)[0]
        loss_of(log_probs, batch).backward()

    return step


def make_vision_step(model, batch: Batch, impl: str) -> Callable[[], None]:
    """Forward+backward of the vision tower and merger alone (loss = mean square of the merged features)."""
    visual = model.vision_model if impl == "ours" else (getattr(model, "model", model).visual)
    dtype = next(visual.parameters()).dtype

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if impl == "ours":
            features = visual(batch.pixel_values.to(dtype), batch.image_grid_thw)
        else:
            out = visual(batch.pixel_values.to(dtype), grid_thw=batch.image_grid_thw)
            features = out.pooler_output if hasattr(out, "pooler_output") else out
        features.float().square().mean().backward()

    return step


# ------------------------------------------------------------------------------------------------ parity


@torch.no_grad()
def parity(hf, ours, batch: Batch, vocab: int) -> dict[str, float]:
    """Largest differences of per-token label log-probs (scored tokens) and logits (real tokens), ours vs HF."""
    hf.eval(), ours.eval()
    ref_lp, ref_logits = hf_log_probs(hf, batch)
    out = ours_forward(ours, batch, return_logits=True)
    hf.train(), ours.train()
    scored = batch.labels >= 0
    real = batch.attention_mask != 0
    diff = (out.log_probs - ref_lp)[scored].abs()
    rel = diff / ref_lp[scored].abs().clamp(min=1e-2)
    logit_diff = (out.logits[..., :vocab].float() - ref_logits.float())[real].abs()
    return dict(max_abs_log_prob=float(diff.max()), max_rel_log_prob=float(rel.max()),
                mean_abs_log_prob=float(diff.mean()), max_abs_logit=float(logit_diff.max()),
                mean_abs_logit=float(logit_diff.mean()), mean_ref_log_prob=float(ref_lp[scored].mean()),
                num_scored=int(scored.sum()))


def graph_parity(model, batches: dict[str, Batch], prefix: str) -> dict[str, dict[str, float]]:
    """Training-mode log-probs and every parameter gradient of a step, the decoder eager vs replayed from graphs."""
    graphs = model.decoder_graphs
    out: dict[str, dict[str, float]] = {}
    for label, batch in batches.items():
        runs = []
        for enabled in (False, True, False):  # the second eager run gives the noise floor (bf16 atomics)
            graphs.enabled = enabled
            model.zero_grad(set_to_none=True)
            log_probs = ours_forward(model, batch).log_probs
            loss_of(log_probs, batch).backward()
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
            runs.append((log_probs.detach().float(), grads))
        (lp_eager, g_eager), (lp_graph, g_graph), (_, g_again) = runs
        assert g_eager.keys() == g_graph.keys(), "graphed and eager steps gave gradients to different parameters"

        def worst(grads: dict[str, torch.Tensor]) -> float:
            return max(float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in g_eager.items())

        scored = batch.labels >= 0
        out[f"{prefix} {label}"] = diffs = dict(
            max_abs_log_prob=float((lp_graph - lp_eager)[scored].abs().max()), max_rel_grad=worst(g_graph),
            max_rel_grad_eager_again=worst(g_again), graphs=graphs.num_graphs, replays=graphs.num_replays)
        print(f"  graph parity {prefix} {label}: {json.dumps(diffs)}", flush=True)
        model.zero_grad(set_to_none=True)
        free()
    return out


# ------------------------------------------------------------------------------------------------ driver


def free(*_: Any) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    own = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            own.pop(name).copy_(param)
    assert not own, f"parameters not copied: {list(own)[:5]}"


def run_shape(name: str, args: argparse.Namespace, peak: float, report: dict) -> list[Result]:
    shape, device, torch_dtype = SHAPES[name], args.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    mm = make_batch(shape, [(shape.seq, shape.image_grids)], device, seed=1)
    batches = {f"1x{shape.seq} mm": mm}
    if shape.text_only_row:
        batches[f"1x{shape.seq} text"] = make_batch(shape, [(shape.seq, [])], device, seed=2)
    # Parity also on a padded batch: two images of different sizes in one sample, a text-only sample, left padding.
    padded = make_batch(shape, [(shape.seq // 4, shape.image_grids[1:]), (shape.seq // 8, [])], device, seed=3)
    results: list[Result] = []
    n_img = sum(h * w for h, w in shape.image_grids)
    print(f"\n=== {name}: {json.dumps(shape.text)}\n    vision {json.dumps(shape.vision)}\n    batch 1 x {shape.seq} "
          f"tokens, images {shape.image_grids} patches ({n_img} patches, {n_img // 4} image tokens), tied={shape.tied}",
          flush=True)

    def bench_all(model, impl: str, recompute: str, profile_it: bool, fused: str = "", graphs: str = "") -> None:
        for label, batch in batches.items():
            flops = step_flops(shape, batch)
            results.append(bench(Result(name, impl, label, recompute, fused, graphs), make_step(model, batch, impl),
                                 flops, batch.num_tokens, args, peak))
            free()
        # The vision tower is never graphed: its row would repeat the eager one.
        if recompute == "none" and not args.no_vision_only and graphs != "on":
            flops = step_flops(shape, mm, with_text=False)
            patches = int(mm.image_grid_thw.prod(dim=-1).sum())  # tokens/s of this row counts vision patches
            results.append(bench(Result(name, impl, f"vision {patches}p", recompute, fused, graphs),
                                 make_vision_step(model, mm, impl), flops, patches, args, peak))
            free()
        if profile_it:
            try:
                key = f"{name} {impl} {recompute}" + (f" fused={fused}" if fused else "") + (
                    f" graphs={graphs}" if graphs else "")
                profiled = f"1x{shape.seq} {args.profile_batch}"
                report.setdefault("profiles", {})[key] = profile_step(
                    make_step(model, batches.get(profiled, mm), impl), f"{key} {profiled}", device)
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
                print(f"  profile failed: {exc!r}")
            free()

    try:
        _run_pair(name, shape, args, report, batches, padded, bench_all, torch_dtype)
    except Exception:  # noqa: BLE001 - keep the figures of the other shapes and report this failure
        import traceback

        error = traceback.format_exc()
        print(f"  FAILED {name}:\n{error}", flush=True)
        report.setdefault("errors", {})[name] = error
        results.append(Result(name, "?", "?", "?", error=error.strip().splitlines()[-1][:150]))
    free()
    return results


def _run_pair(name: str, shape: Shape, args: argparse.Namespace, report: dict, batches: dict[str, Batch],
              padded: Batch, bench_all: Callable, torch_dtype: torch.dtype) -> None:
    """transformers' model timed, ours loaded with its weights, parity, then ours timed per recompute setting."""
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_state_dict

    device, mm = args.device, batches[f"1x{shape.seq} mm"]
    start = time.perf_counter()
    hf = build_hf(shape, torch_dtype, device, seed=args.seed)
    hf.train()
    print(f"  transformers model built in {time.perf_counter() - start:.1f} s: "
          f"{sum(p.numel() for p in hf.parameters()) / 1e9:.3f} B parameters", flush=True)
    bench_all(hf, "hf", "none", profile_it=args.profile and name in args.profile_shapes)
    hf.zero_grad(set_to_none=True)
    free()

    start = time.perf_counter()
    qwen_config = QwenVLConfig.from_hf_dict(hf.config.to_dict())
    first = args.fused[0]
    graphs = "on" in args.cuda_graphs
    ours = build_ours(qwen_config, args.dtype, device, "none", fused=first == "on", graphs=graphs)
    loaded = load_hf_state_dict(ours, hf.state_dict())
    print(f"  ours built and loaded in {time.perf_counter() - start:.1f} s: {loaded.num_params} parameters from "
          f"{loaded.num_hf_tensors} HF tensors, {sum(p.numel() for p in ours.parameters()) / 1e9:.3f} B", flush=True)
    variants = {first: ours}
    for fused in args.fused[1:]:
        variants[fused] = build_ours(qwen_config, args.dtype, device, "none", fused=fused == "on", graphs=graphs)
        copy_weights(ours, variants[fused])
    del ours
    if name in args.parity_shapes:
        for fused, model in variants.items():
            for label, batch in (("1x%d mm" % shape.seq, mm), ("padded 2-row", padded)):
                try:
                    diffs = parity(hf, model, batch, shape.text["vocab_size"])
                except torch.OutOfMemoryError as exc:
                    diffs = {"error": f"OOM {str(exc).splitlines()[0][:100]}"}
                report.setdefault("parity", {})[f"{name} fused={fused} {label}"] = diffs
                print(f"  parity fused={fused} {label}: {json.dumps(diffs)}", flush=True)
                free()
    del hf
    free()

    for fused in list(variants):
        ours = variants.pop(fused)
        for recompute in args.recompute:
            if recompute != "none":
                variant = build_ours(qwen_config, args.dtype, device, recompute, fused=fused == "on", graphs=graphs)
                copy_weights(ours, variant)
                del ours
                ours = variant
                free()
            for graphed in args.cuda_graphs:
                if graphed == "on":
                    report.setdefault("graph_parity", {}).update(
                        graph_parity(ours, batches, f"{name} fused={fused} {recompute}"))
                if ours.decoder_graphs is not None:
                    ours.decoder_graphs.enabled = graphed == "on"
                profile_it = args.profile and name in args.profile_shapes and recompute == "none"
                bench_all(ours, "ours", recompute, profile_it=profile_it, fused=fused, graphs=graphed)
                if ours.decoder_graphs is not None:
                    print(f"  decoder graphs: {ours.decoder_graphs.num_graphs} captured, "
                          f"{ours.decoder_graphs.num_replays} replays, {ours.decoder_graphs.num_eager} eager calls",
                          flush=True)
            ours.zero_grad(set_to_none=True)
        del ours
        free()


def print_table(results: list[Result], peak: float, device_name: str) -> str:
    hf_speed = {(r.shape, r.batch): r.tokens_per_s for r in results if r.impl == "hf" and not r.error}
    lines = [f"device: {device_name}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (MFU is over it)", "",
             "| shape | impl | fused | graphs | batch | recompute | step ms | tokens/s | model TFLOP/s | MFU "
             "| peak mem GiB | vs HF |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.error:
            lines.append(f"| {r.shape} | {r.impl} | {r.fused} | {r.graphs} | {r.batch} | {r.recompute} | {r.error} "
                         "| | | | | |")
            continue
        ref = hf_speed.get((r.shape, r.batch))
        ratio = f"{r.tokens_per_s / ref:.2f}x" if ref and r.impl == "ours" else ""
        lines.append(f"| {r.shape} | {r.impl} | {r.fused} | {r.graphs} | {r.batch} | {r.recompute} | {r.step_s * 1e3:.1f} | "
                     f"{r.tokens_per_s:,.0f} | {r.tflops:.0f} | {r.mfu:.1%} | {r.peak_mem_gib:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in fp32 (checks the script)")
    parser.add_argument("--shapes", default="3b,7b")
    parser.add_argument("--recompute", default="none,selective", help="ours: comma list of none,selective,full")
    parser.add_argument("--parity-shapes", default="3b,7b,tiny")
    parser.add_argument("--profile", action="store_true", help="profile one step of each implementation")
    parser.add_argument("--profile-shapes", default="3b,tiny")
    parser.add_argument("--profile-batch", default="mm", choices=("mm", "text"), help="the batch profiled")
    parser.add_argument("--fused", default="on,off",
                        help="ours: comma list of on (models/qwen_vl/fused.py layers), off (Megatron's unfused ones)")
    parser.add_argument("--cuda-graphs", default="off",
                        help="ours: comma list of off (eager decoder), on (decoder replayed from CUDA graphs; GPU only)")
    parser.add_argument("--no-vision-only", action="store_true", help="skip timing the vision tower alone")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write every figure to this file")
    parser.add_argument("--out", default="", help="write the table and the parity lines (markdown) to this file")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.warmup, args.iters = "tiny", 1, 2
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    args.recompute = args.recompute.split(",")
    args.fused = args.fused.split(",")
    args.cuda_graphs = args.cuda_graphs.split(",")
    if any(g not in ("on", "off") for g in args.cuda_graphs) or len(set(args.cuda_graphs)) != len(args.cuda_graphs):
        parser.error(f"--cuda-graphs must be a comma list of distinct 'on' / 'off', got {','.join(args.cuda_graphs)!r}")
    if not args.fused or any(f not in ("on", "off") for f in args.fused) or len(set(args.fused)) != len(args.fused):
        parser.error(f"--fused must be a comma list of distinct 'on' / 'off', got {','.join(args.fused)!r}")
    args.parity_shapes, args.profile_shapes = args.parity_shapes.split(","), args.profile_shapes.split(",")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    import megatron.core
    import transformers

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    versions = dict(torch=torch.__version__, transformers=transformers.__version__,
                    megatron_core=megatron.core.__version__)
    print(f"device {device_name}; {versions}", flush=True)
    peak_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = matmul_peak(args.device, peak_dtype, 8192 if args.device == "cuda" else 512)
    print(f"matmul peak ({peak_dtype}): {peak / 1e12:.1f} TFLOP/s", flush=True)
    init_megatron(args.device, args.seed)
    shim = varlen_compat()
    if shim:
        print(f"WARNING: {shim}", flush=True)
    report: dict[str, Any] = dict(device=device_name, versions=versions, peak_flops=peak, args=vars(args), shim=shim)
    results: list[Result] = []
    for name in args.shapes.split(","):
        results += run_shape(name, args, peak, report)
    peak_after = matmul_peak(args.device, peak_dtype, 8192 if args.device == "cuda" else 512)
    print(f"\nmatmul peak again at the end: {peak_after / 1e12:.1f} TFLOP/s", flush=True)
    report["peak_flops_end"] = peak_after
    report["results"] = [asdict(r) for r in results]
    table = print_table(results, peak, device_name)
    parity_lines = [f"{kind.replace('_', ' ')} {key}: "
                    + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in diffs.items())
                    for kind in ("parity", "graph_parity") for key, diffs in report.get(kind, {}).items()]
    print("\n" + table)
    print("\n".join(parity_lines))
    if args.out:
        Path(args.out).write_text(table + "\n\n" + "\n".join(f"- {line}" for line in parity_lines) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
