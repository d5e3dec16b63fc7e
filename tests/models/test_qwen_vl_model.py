"""Our Qwen-VL on Megatron-Core equals transformers' at (TP, PP) in {(1,1), (2,1), (1,2), (2,2)}, both families.

One distributed run per layout covers four tiny checkpoints: each family with default shapes, and each with the odd
shapes (one KV group, so KV heads are replicated at TP=2; tied embeddings, so the last stage holds a copy under PP;
vocabulary 500, padded to 512). The batch has two images in one sample, non-square images of several sizes, a
text-only sample and left padding. Per checkpoint and layout: logits and label log-probs against transformers
(padded and packed paths), and the gradients of the summed log-probs for every HF tensor (vision tower, decoder,
embeddings), which also checks that replicated KV heads receive the summed gradient on every copy. One checkpoint
is stored in the hub's flat config layout with transformers-5 tensor names, to cover both readers. The odd
checkpoints run PP=2 with an uneven split (1 + 3 layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.models.qwen_vl.parity import ParityBatch, build_parity_batch, from_bytes, label_log_probs
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

ODD = ["text_config.num_key_value_heads=1", "tie_word_embeddings=true", "text_config.vocab_size=500"]
VARIANTS = {"qwen2_vl": ("qwen2_vl", []), "qwen2_5_vl": ("qwen2_5_vl", []), "qwen2_vl-odd": ("qwen2_vl", ODD),
            "qwen2_5_vl-odd": ("qwen2_5_vl", ODD)}
LOG_PROB_TOL = 1e-4


def _to_hub_layout(hf_dir: Path) -> None:
    """Put the config in the hub's flat layout (text fields at the top, `rope_scaling: {type: mrope}`) and the
    tensors under transformers 5's in-memory names (`model.language_model.*`, `model.visual.*`): the opposite of
    what `make_tiny_checkpoint` writes on both counts, so both readers are exercised."""
    from safetensors.torch import load_file, save_file

    config = json.loads((hf_dir / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k not in ("model_type", "dtype")})
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["rope_theta"] = rope["rope_theta"]
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(hf_dir / "model.safetensors")
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("model.layers.") or name in ("model.embed_tokens.weight", "model.norm.weight"):
            name = "model.language_model." + name[len("model."):]
        elif name.startswith("visual."):
            name = "model." + name
        renamed[name] = tensor
    save_file(renamed, hf_dir / "model.safetensors", metadata={"format": "pt"})


@dataclass
class Reference:
    batch: ParityBatch
    logits: torch.Tensor
    log_probs: torch.Tensor
    grads: dict[str, torch.Tensor]


def _reference(hf_dir: Path) -> Reference:
    from transformers import AutoModelForImageTextToText

    from lmmrl_megatron.models.qwen_vl.mapping import canonical_hf_name

    batch = build_parity_batch(hf_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa")
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids,
    ).logits
    log_probs = label_log_probs(logits, batch.labels)
    (-log_probs.sum()).backward()
    grads = {canonical_hf_name(name): p.grad.detach().clone() for name, p in model.named_parameters()}
    return Reference(batch, logits.detach(), log_probs.detach(), grads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Reference]]:
    root = tmp_path_factory.mktemp("qwen_vl_model")
    out = {}
    for name, (arch, overrides) in VARIANTS.items():
        hf_dir = make_tiny_checkpoint(arch, root / name, seed=len(out), overrides=overrides)
        if name == "qwen2_vl":
            _to_hub_layout(hf_dir)
        out[name] = (hf_dir, _reference(hf_dir))
    return out


def _gather_grads(model) -> tuple[dict[str, torch.Tensor], bool]:
    """This chunk's gradients under HF names (TP shards gathered), and whether replicated KV copies agree."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.convert.mapping import mcore_shards_to_hf
    from lmmrl_megatron.models.qwen_vl.loading import chunk_mapped_params

    tp_size = ps.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    grads: dict[str, torch.Tensor] = {}
    replicas_agree = True
    text = model.qwen_config.text
    for local_name, mapped in chunk_mapped_params(model):
        grad = params[local_name].grad
        grad = torch.zeros_like(params[local_name]) if grad is None else grad
        shards = [torch.empty_like(grad) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
        if mapped.transform.kind == "qkv" and text.num_key_value_heads < tp_size:
            kv_rows = slice((text.num_attention_heads // tp_size) * text.head_dim, None)
            replicas_agree &= all(torch.equal(s[kv_rows], shards[0][kv_rows]) for s in shards)
        if mapped.exported:
            grads.update(mcore_shards_to_hf(mapped, shards))
    return grads, replicas_agree


def check_layout(variants: list[tuple[str, str, ParityBatch]]) -> bytes:
    """Worker body: for each checkpoint, forward (padded, packed) and forward+backward; results per checkpoint."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.parallel.vocab_parallel import gather_vocab_parallel_logits
    from lmmrl_megatron.models.qwen_vl.parity import batch_on, build_chunk, run_pipeline, to_bytes
    from lmmrl_megatron.parallel.layout import ShardLayout

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    results: list[dict | None] = []
    for name, hf_dir, batch in variants:
        uneven = 1 if (pp == 2 and name.endswith("-odd")) else None
        layout = ShardLayout(tp=tp, pp=pp, num_layers_in_first_pipeline_stage=uneven)
        options = QwenVLBuildOptions(layout=layout, dtype="fp32", use_cpu_initialization=True)
        model = build_chunk(hf_dir, options)
        inputs = batch_on(batch, "cpu")
        result: dict = {"stage": ps.get_pipeline_model_parallel_rank(), "layers": list(model.layer_range)}
        model.eval()
        with torch.no_grad():
            padded = run_pipeline(model, inputs, forward_only=True, packed=False)
            packed = run_pipeline(model, inputs, forward_only=True, packed=True)
        if padded is not None:
            result["logits"] = gather_vocab_parallel_logits(padded.logits, model.vocab_size, ps.get_tensor_model_parallel_group())
            result["log_probs"] = padded.log_probs
            result["packed_log_probs"] = packed.log_probs
        model.train()
        run_pipeline(model, inputs, forward_only=False, packed=False)
        if model.share_embeddings_and_output_weights and pp > 1 and ps.is_rank_in_embedding_group():
            # What Megatron's finalize_model_grads does for tied embeddings: sum the two stages' gradients.
            torch.distributed.all_reduce(model.shared_embedding_or_output_weight().grad, group=ps.get_embedding_group())
        result["grads"], result["kv_replicas_agree"] = _gather_grads(model)
        results.append(result if ps.get_tensor_model_parallel_rank() == 0 else None)
    return to_bytes(results)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"])
def test_matches_transformers(tp: int, pp: int, checkpoints: dict[str, tuple[Path, Reference]]) -> None:
    names = list(checkpoints)
    variants = [(name, str(checkpoints[name][0]), checkpoints[name][1].batch) for name in names]
    by_rank = [from_bytes(data) for data in
               run_distributed(check_layout, world_size=tp * pp, tp=tp, pp=pp, args=(variants,), timeout_s=600)]
    for index, name in enumerate(names):
        ref = checkpoints[name][1]
        stages = [rank[index] for rank in by_rank if rank[index] is not None]
        assert len(stages) == pp
        if pp == 2 and name.endswith("-odd"):
            assert [s["layers"] for s in sorted(stages, key=lambda s: s["stage"])] == [[0], [1, 2, 3]]
        last = next(s for s in stages if "log_probs" in s)
        real = ref.batch.attention_mask != 0
        scored = real & (ref.batch.labels >= 0)
        assert scored.sum() > 200
        torch.testing.assert_close(last["logits"][real], ref.logits[real], rtol=0, atol=1e-4, msg=f"{name} logits")
        for key in ("log_probs", "packed_log_probs"):
            diff = (last[key] - ref.log_probs)[scored].abs().max().item()
            assert diff < LOG_PROB_TOL, f"{name} {key}: max |diff| {diff:.2e}"
            assert torch.all(last[key][~scored] == 0), f"{name} {key}: nonzero at ignored positions"
        grads: dict[str, torch.Tensor] = {}
        for stage in stages:
            assert stage["kv_replicas_agree"], f"{name}: replicated KV heads got different gradients"
            grads.update(stage["grads"])
        assert sorted(grads) == sorted(ref.grads), f"{name}: {set(grads) ^ set(ref.grads)}"
        for hf_name, grad in grads.items():
            torch.testing.assert_close(grad, ref.grads[hf_name], rtol=1e-3, atol=1e-5, msg=f"{name} grad {hf_name}")


def check_sequence_parallel_and_recompute(hf_dir: str, batch: ParityBatch) -> bytes:
    """Worker body: sequence parallelism on the packed path (forward), full recompute (forward and backward).

    The backward pass under sequence parallelism is not run here: the CPU backend cannot reach it (Megatron's
    reduce-scatter backward allocates on the CUDA device inside autograd, where the CPU device mode is off).
    """
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.parity import batch_on, build_chunk, run_pipeline, to_bytes
    from lmmrl_megatron.parallel.layout import ShardLayout

    tp = ps.get_tensor_model_parallel_world_size()
    inputs = batch_on(batch, "cpu")
    sequence_parallel = build_chunk(hf_dir, QwenVLBuildOptions(layout=ShardLayout(tp=tp, sequence_parallel=True),
                                                               dtype="fp32", use_cpu_initialization=True))
    sequence_parallel.eval()
    with torch.no_grad():
        sp_out = run_pipeline(sequence_parallel, inputs, forward_only=True, packed=True)
    recompute = build_chunk(hf_dir, QwenVLBuildOptions(layout=ShardLayout(tp=tp), dtype="fp32", recompute="full",
                                                       use_cpu_initialization=True))
    recompute.train()
    out = run_pipeline(recompute, inputs, forward_only=False, packed=True)
    grads, replicas_agree = _gather_grads(recompute)
    # One image pad token too few: a clear error naming both counts (positions given, so rope_index is skipped).
    ids = inputs["input_ids"].clone()
    ids[ids == recompute.qwen_config.tokens.image_token_id] = 30
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    ids[0, -1] = recompute.qwen_config.tokens.image_token_id
    try:
        recompute(ids, inputs["attention_mask"], positions, inputs["pixel_values"], inputs["image_grid_thw"])
        mismatch = "no error"
    except ValueError as exc:
        mismatch = str(exc)
    return to_bytes({"sp_log_probs": sp_out.log_probs, "log_probs": out.log_probs.detach(), "grads": grads,
                     "kv_replicas_agree": replicas_agree, "mismatch": mismatch})


def test_sequence_parallel_and_full_recompute(checkpoints: dict[str, tuple[Path, Reference]]) -> None:
    hf_dir, ref = checkpoints["qwen2_5_vl-odd"]
    first = run_distributed(check_sequence_parallel_and_recompute, world_size=2, tp=2, args=(str(hf_dir), ref.batch),
                            timeout_s=600)[0]
    result = from_bytes(first)
    scored = (ref.batch.attention_mask != 0) & (ref.batch.labels >= 0)
    for key in ("sp_log_probs", "log_probs"):
        assert (result[key] - ref.log_probs)[scored].abs().max() < LOG_PROB_TOL, key
    assert result["kv_replicas_agree"]
    assert sorted(result["grads"]) == sorted(ref.grads)
    for hf_name, grad in result["grads"].items():
        torch.testing.assert_close(grad, ref.grads[hf_name], rtol=1e-3, atol=1e-5, msg=f"grad {hf_name}")
    num_features = int((ref.batch.input_ids == 12).sum())
    assert result["mismatch"] == (f"image features and pad tokens do not match: the vision tower gave {num_features} "
                                  f"features, input_ids hold 1 image pad tokens")


def check_virtual_pipeline(hf_dir: str, batch: ParityBatch) -> bytes:
    """Worker body: PP=2 x 2 virtual stages (one layer per chunk), two micro-batches, interleaved schedule."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_checkpoint
    from lmmrl_megatron.models.qwen_vl.model import build_model_chunks
    from lmmrl_megatron.models.qwen_vl.parity import run_pipeline, split_micro_batches, to_bytes
    from lmmrl_megatron.parallel.layout import ShardLayout

    config = QwenVLConfig.from_hf_dir(hf_dir)
    options = QwenVLBuildOptions(layout=ShardLayout(pp=2, vpp=2), dtype="fp32", use_cpu_initialization=True)
    chunks = build_model_chunks(config, options)
    for chunk in chunks:
        load_hf_checkpoint(chunk, hf_dir)
        chunk.eval()
    micro_batches = split_micro_batches(batch, 2, config.tokens.image_token_id, config.vision.spatial_merge_size)
    with torch.no_grad():
        outs = run_pipeline(chunks, micro_batches, forward_only=True, packed=False)
    layers = [list(chunk.layer_range) for chunk in chunks]
    log_probs = None if outs is None else torch.cat([out.log_probs for out in outs])
    return to_bytes({"stage": ps.get_pipeline_model_parallel_rank(), "layers": layers, "log_probs": log_probs,
                     "has_vision": [chunk.vision_model is not None for chunk in chunks]})


def test_virtual_pipeline_stages(checkpoints: dict[str, tuple[Path, Reference]]) -> None:
    hf_dir, ref = checkpoints["qwen2_5_vl-odd"]  # tied: the last chunk of the last stage holds the output copy
    ranks = [from_bytes(r) for r in run_distributed(check_virtual_pipeline, world_size=2, pp=2, vpp=2,
                                                     args=(str(hf_dir), ref.batch), timeout_s=600)]
    assert [r["layers"] for r in ranks] == [[[0], [2]], [[1], [3]]]
    assert [r["has_vision"] for r in ranks] == [[True, False], [False, False]]
    scored = (ref.batch.attention_mask != 0) & (ref.batch.labels >= 0)
    assert ranks[0]["log_probs"] is None
    assert (ranks[1]["log_probs"] - ref.log_probs)[scored].abs().max() < LOG_PROB_TOL
