"""The fused decoder (models/qwen_vl/fused.py) equals Megatron's unfused local layers, fp32, TP=1 and TP=2 (gloo).

One tiny Qwen2.5-VL checkpoint (one KV group, so KV heads are replicated at TP=2), both builds loaded from it; per
batch (text-only, multimodal with two images and left padding, the same packed) and for the vision tower alone:
label log-probs and every parameter gradient of -sum(log-probs), fused against unfused. The fused build must really
use the fused modules (checked), and the CPU run takes the eager bodies that the GPU compiles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.models.qwen_vl.parity import build_parity_batch, from_bytes
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint


def _batches(hf_dir: str) -> dict[str, dict]:
    mm = build_parity_batch(hf_dir)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 10, (2, 40), generator=gen) + 20  # plain text ids, no vision tokens
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels = labels.masked_fill(mask == 0, -100)
    text = dict(input_ids=ids, attention_mask=mask, labels=labels)
    multimodal = dict(input_ids=mm.input_ids, attention_mask=mm.attention_mask, labels=mm.labels,
                      pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw)
    return {"text": text, "multimodal": multimodal, "multimodal packed": dict(multimodal, packed=True)}


def fused_against_unfused(hf_dir: str, recompute: str) -> bytes:
    """Worker body: both builds on every batch; log-probs and local gradient shards of each."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl import fused
    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.parity import build_chunk, to_bytes
    from lmmrl_megatron.parallel.layout import ShardLayout

    tp = ps.get_tensor_model_parallel_world_size()
    results: dict[str, dict] = {}
    for fused_kernels in (False, True):
        options = QwenVLBuildOptions(layout=ShardLayout(tp=tp), dtype="fp32", use_cpu_initialization=True,
                                     recompute=recompute, fused_kernels=fused_kernels)
        model = build_chunk(hf_dir, options)
        layer = model.language_model.decoder.layers[0]
        kinds = (isinstance(layer.self_attention, fused.FusedRopeSelfAttention),
                 isinstance(layer.mlp, fused.FusedSwiGLUMLP),
                 isinstance(layer.mlp.linear_fc1, fused.PlainColumnLinear),
                 isinstance(layer.input_layernorm, fused.FusedRMSNorm),
                 getattr(layer.mlp.linear_fc1, "_plain", False))
        model.train()
        out: dict[str, object] = {"kinds": kinds}
        for name, batch in _batches(hf_dir).items():
            model.zero_grad(set_to_none=True)
            log_probs = model(**batch).log_probs
            (-log_probs.sum()).backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            out[name] = (log_probs.detach(), grads)
        mm = _batches(hf_dir)["multimodal"]
        with torch.no_grad():
            out["vision"] = model.vision_model(mm["pixel_values"], mm["image_grid_thw"])
        results["fused" if fused_kernels else "unfused"] = out
    return to_bytes(results if ps.get_tensor_model_parallel_rank() == 0 else None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = ["text_config.num_key_value_heads=1"]
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("fused") / "ckpt", seed=3, overrides=overrides)


@pytest.mark.parametrize(("tp", "recompute"), [(1, "none"), (2, "none"), (1, "full")])
def test_fused_equals_unfused(hf_dir: Path, tp: int, recompute: str) -> None:
    result = from_bytes(run_distributed(fused_against_unfused, world_size=tp, tp=tp, args=(str(hf_dir), recompute),
                                        timeout_s=600)[0])
    ref, ours = result["unfused"], result["fused"]
    assert ref["kinds"] == (False, False, False, False, False)
    assert ours["kinds"] == (True, True, True, True, tp == 1)  # F.linear only where Megatron's linear is an identity
    for name in ("text", "multimodal", "multimodal packed"):
        (ref_lp, ref_grads), (lp, grads) = ref[name], ours[name]
        assert (ref_lp != 0).sum() > 50, name
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n} log-probs: {m}")
        assert sorted(grads) == sorted(ref_grads), f"{name}: {set(grads) ^ set(ref_grads)}"
        for param, grad in grads.items():
            # fp32 rounding of the hand-written RMSNorm backward, summed over the layers
            torch.testing.assert_close(grad, ref_grads[param], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, p=param: f"{n} grad {p}: {m}")
    torch.testing.assert_close(ours["vision"], ref["vision"], rtol=0, atol=0)
