"""Our vision tower against transformers' on tiny checkpoints: merged features and gradients, at TP=1 and TP=2.

The HF tower runs here; ours runs in gloo workers (Megatron's parallel state needs them) that load their TP
shard through the tower's mapping rules (`vision_rules`). Inputs are real processor output for four images of
different, mostly non-square sizes in one batch; with the tiny window (2x2 merged tokens) three of them end in
partial windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

IMAGE_SIZES = [(84, 168), (224, 140), (56, 56), (120, 90)]  # (height, width) in pixels


@dataclass
class VisionCase:
    """One checkpoint's inputs, its HF vision weights and transformers' results."""

    name: str
    arch: str
    vision_config: dict
    hf_state: dict[str, torch.Tensor]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    grad_weights: torch.Tensor  # fixed cotangent for the backward check
    hf_features: torch.Tensor
    hf_patch_embed_grad: torch.Tensor


def _make_case(name: str, arch: str, out_dir: Path, overrides: list[str]) -> VisionCase:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = make_tiny_checkpoint(arch, out_dir / name, seed=3, overrides=overrides)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    visual = model.model.visual
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    inputs = AutoProcessor.from_pretrained(ckpt).image_processor(images=images, return_tensors="pt")
    features = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    grad_weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
    (features * grad_weights).sum().backward()
    return VisionCase(
        name=name,
        arch=arch,
        vision_config=model.config.vision_config.to_dict(),
        hf_state={k: v.detach().clone() for k, v in visual.state_dict().items()},
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        grad_weights=grad_weights,
        hf_features=features.detach(),
        hf_patch_embed_grad=visual.patch_embed.proj.weight.grad.detach().clone(),
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, VisionCase]:
    out = tmp_path_factory.mktemp("vision")
    specs = {
        "qwen2_vl": ("qwen2_vl", []),
        "qwen2_5_vl": ("qwen2_5_vl", []),
        "qwen2_vl_one_head": ("qwen2_vl", ["vision_config.num_heads=1"]),
        "qwen2_5_vl_one_head": ("qwen2_5_vl", ["vision_config.num_heads=1"]),
        # An MLP width that TP=2 does not divide: padded with zeros on our side. (Qwen2-VL's width is
        # embed_dim * an integer mlp_ratio, even whenever the heads split over 2 ranks.)
        "qwen2_5_vl_odd_mlp": ("qwen2_5_vl", ["vision_config.intermediate_size=63"]),
    }
    return {name: _make_case(name, arch, out, overrides) for name, (arch, overrides) in specs.items()}


def run_our_towers(cases: list[VisionCase], recompute: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Worker: build our tower for each case at this rank's TP layout, load its shard, forward and backward.

    `recompute`: the decoder config asks for full activation recompute, which the tower applies per block.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from lmmrl_megatron.models.qwen_vl.vision import QwenVisionEncoder
    from lmmrl_megatron.models.qwen_vl.vision_config import VisionEncoderConfig, vision_transformer_config
    from lmmrl_megatron.convert.mapping import hf_to_mcore_shard
    from lmmrl_megatron.models.qwen_vl.mapping import HF_VISION, VISION, vision_rules

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    decoder_like = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}),
    )
    results = {}
    for case in cases:
        vision = VisionEncoderConfig.from_hf(case.vision_config, arch=case.arch)
        encoder = QwenVisionEncoder(vision, vision_transformer_config(vision, decoder_like))
        assert encoder.config.recompute_granularity == ("full" if recompute else None)
        hf_state = {HF_VISION + name: tensor for name, tensor in case.hf_state.items()}
        state = {
            param.mcore_name.removeprefix(VISION): hf_to_mcore_shard(param, hf_state, tp_rank, tp_size)
            for param in (rule.bind() for rule in vision_rules(vision))
        }
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        assert not unexpected and all(key.endswith("_extra_state") for key in missing), (missing, unexpected)
        features = encoder(case.pixel_values, case.image_grid_thw)
        (features * case.grad_weights).sum().backward()
        results[case.name] = {
            "features": features.detach(),
            "patch_embed_grad": encoder.patch_embed.proj.weight.grad.detach().clone(),
        }
    return results


@pytest.fixture(scope="module")
def tp1_results(cases: dict[str, VisionCase]) -> dict[str, dict[str, torch.Tensor]]:
    (result,) = run_distributed(run_our_towers, world_size=1, args=(list(cases.values()),), timeout_s=240)
    return result


@pytest.fixture(scope="module")
def tp2_results(cases: dict[str, VisionCase]) -> list[dict[str, dict[str, torch.Tensor]]]:
    tp2_cases = [cases[name] for name in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_vl_odd_mlp")]
    return run_distributed(run_our_towers, world_size=2, tp=2, args=(tp2_cases,), timeout_s=240)


@pytest.fixture(scope="module")
def recompute_results(cases: dict[str, VisionCase]) -> dict[str, dict[str, torch.Tensor]]:
    (result,) = run_distributed(run_our_towers, world_size=1, args=([cases["qwen2_5_vl"]], True), timeout_s=240)
    return result


def _assert_matches(ours: dict[str, torch.Tensor], case: VisionCase) -> None:
    num_merged = int(case.image_grid_thw.prod(dim=1).sum()) // 4
    assert ours["features"].shape == case.hf_features.shape == (num_merged, 64)
    torch.testing.assert_close(ours["features"], case.hf_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["patch_embed_grad"], case.hf_patch_embed_grad, rtol=1e-4, atol=1e-5)
    assert case.hf_features.abs().mean() > 1e-2  # the comparison is not between near-zero tensors


@pytest.mark.parametrize(
    "name", ["qwen2_vl", "qwen2_5_vl", "qwen2_vl_one_head", "qwen2_5_vl_one_head", "qwen2_5_vl_odd_mlp"]
)
def test_vision_tower_matches_transformers_tp1(name: str, cases: dict[str, VisionCase], tp1_results) -> None:
    _assert_matches(tp1_results[name], cases[name])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen2_5_vl_odd_mlp"])
def test_vision_tower_matches_transformers_tp2(name: str, cases: dict[str, VisionCase], tp2_results) -> None:
    for rank_result in tp2_results:  # every TP rank ends with the complete features
        _assert_matches(rank_result[name], cases[name])


def test_vision_tower_with_full_recompute_matches_transformers(cases: dict[str, VisionCase], recompute_results) -> None:
    _assert_matches(recompute_results["qwen2_5_vl"], cases["qwen2_5_vl"])


def test_partial_windows_are_exercised(cases: dict[str, VisionCase]) -> None:
    """The Qwen2.5-VL batch must contain images whose merged grid does not divide into whole windows."""
    merged = cases["qwen2_5_vl"].image_grid_thw[:, 1:] // 2
    assert ((merged % 2) != 0).any()
    assert len(set(map(tuple, cases["qwen2_5_vl"].image_grid_thw.tolist()))) == len(IMAGE_SIZES)
