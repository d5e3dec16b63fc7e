"""HF -> Megatron -> HF is bit-exact at every layout, and every layout computes the same logits.

For each family the HF checkpoint is converted offline (`convert_hf_to_mcore`), then a chain of live models at
(2,2), (1,1), (2,1), (1,2) each loads the checkpoint saved by the previous one (the first loads the converted one):
so a checkpoint saved at TP=2, PP=2 is loaded at TP=1, PP=1 and the reverse happens along the chain. At every
link: the bucketed live export equals the HF state dict on every rank, the checkpoint the link saved converts back
(`convert_mcore_to_hf`) to the original tensors bit for bit, and the logits / log-probs of the multimodal parity
batch equal those of the first link. The (2,2) link also writes an HF checkpoint straight from the live model
(`save_hf_checkpoint`), which must equal the original too.

The odd shapes (tied embeddings, one KV group, vocabulary 500 = not a multiple of 128) get the same checks at
(1,2), plus a TP=2 model (one KV head replicated on both ranks) filled straight from HF whose export must still
give back the single KV head.

With one KV head and TP=2 the model replicates the head on both ranks but stores it once: the HF checkpoint is
converted for TP=2 x PP=2 by the command-line tool, loaded there, saved, loaded at TP=1, saved, and both saves
convert back to the original tensors bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_hf_to_mcore, convert_mcore_to_hf

from lmmrl_megatron.models.registry import family_of_hf_dir
from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint
from tests.convert.qwen_workers import assert_same_state, hf_state, last_stage_outputs, load_export_forward_save

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["qwen2_vl", "qwen2_5_vl"]
ODD_SHAPES = ["tie_word_embeddings=true", "text_config.num_key_value_heads=1", "text_config.vocab_size=500"]


def _assert_same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    for key in ("logits", "log_probs"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-5, err_msg=f"{what}: {key}")


def _run_link(
    hf: Path, tp: int, pp: int, load_from: str, save_to: Path, want: dict, save_hf: bool = False
) -> dict[str, np.ndarray]:
    """One live model at (tp, pp): export check on every rank, save, convert the save back and check it (and with
    `save_hf`, the HF checkpoint the live model wrote directly)."""
    live_hf = save_to.parent / (save_to.name + "-live-hf")
    args = (str(hf), load_from, str(save_to), str(live_hf) if save_hf else None)
    results = run_distributed(load_export_forward_save, tp * pp, tp, pp, args=args)
    for rank, result in enumerate(results):
        assert_same_state(result["export"], want, f"live export at tp={tp} pp={pp}, rank {rank}")
    if save_hf:
        assert len(list(live_hf.glob("model-*.safetensors"))) > 1
        assert_same_state(hf_state(live_hf), want, f"HF checkpoint written by the live model at tp={tp} pp={pp}")
    options = ConvertOptions(src=str(save_to), out=str(save_to) + "-hf", progress=False)
    back = convert_mcore_to_hf(options, family_of_hf_dir)
    assert_same_state(hf_state(back), want, f"checkpoint saved at tp={tp} pp={pp}, converted back")
    return last_stage_outputs(results)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_is_bit_exact_and_layouts_agree(tmp_path: Path, arch: str) -> None:
    hf = make_tiny_checkpoint(arch, tmp_path / "hf")
    want = hf_state(hf)
    options = ConvertOptions(src=str(hf), out=str(tmp_path / "converted"), layout=ShardLayout(tp=2, pp=2),
                             progress=False)
    converted = convert_hf_to_mcore(options, family_of_hf_dir)
    load_from, reference = str(converted), None
    for tp, pp in [(2, 2), (1, 1), (2, 1), (1, 2)]:
        save_to = tmp_path / f"saved-tp{tp}-pp{pp}"
        outputs = _run_link(hf, tp, pp, load_from, save_to, want, save_hf=(tp, pp) == (2, 2))
        if reference is None:
            reference = outputs
        else:
            _assert_same_outputs(outputs, reference, f"tp={tp} pp={pp} vs tp=2 pp=2")
        load_from = str(save_to)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_odd_shapes_roundtrip(tmp_path: Path, arch: str) -> None:
    hf = make_tiny_checkpoint(arch, tmp_path / "hf", overrides=ODD_SHAPES)
    want = hf_state(hf)
    assert "lm_head.weight" not in want and want["model.embed_tokens.weight"].shape[0] == 500
    options = ConvertOptions(src=str(hf), out=str(tmp_path / "converted"), layout=ShardLayout(pp=2), progress=False)
    converted = convert_hf_to_mcore(options, family_of_hf_dir)
    outputs = _run_link(hf, 1, 2, str(converted), tmp_path / "saved-pp2", want)
    # TP=2 with one KV head: each rank holds a copy of it; the export must give the single head back.
    results = run_distributed(load_export_forward_save, 2, 2, 1, args=(str(hf), "hf", None))
    for rank, result in enumerate(results):
        assert_same_state(result["export"], want, f"live export at tp=2 (replicated KV head), rank {rank}")
    _assert_same_outputs(last_stage_outputs(results), outputs, "tp=2 vs pp=2")


@pytest.mark.slow
def test_replicated_kv_heads_reshard_bit_exact(tmp_path: Path) -> None:
    """HF -> TP=2 x PP=2 -> TP=1 -> HF with one KV head (replicated at TP=2): every step bit-exact."""
    hf = make_tiny_checkpoint("qwen2_5_vl", tmp_path / "hf", overrides=["text_config.num_key_value_heads=1"])
    want = hf_state(hf)
    converted = tmp_path / "converted"
    tool = REPO / "tools" / "convert_ckpt" / "hf_to_mcore.py"
    subprocess.run([sys.executable, tool, "--hf", hf, "--out", converted, "--tp", "2", "--pp", "2", "--no-progress"],
                   check=True, capture_output=True)
    tp2 = _run_link(hf, 2, 2, str(converted), tmp_path / "saved-tp2-pp2", want)
    tp1 = _run_link(hf, 1, 1, str(tmp_path / "saved-tp2-pp2"), tmp_path / "saved-tp1", want)
    _assert_same_outputs(tp1, tp2, "tp=1 vs tp=2 pp=2 (replicated KV head)")
