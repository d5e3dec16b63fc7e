"""Worker bodies (run in every rank by `run_distributed`) for the Qwen-VL checkpoint tests, and their helpers.

A worker builds this rank's chunk of `QwenVLModel` at the current TP x PP layout, fills it (from a Megatron
checkpoint, or from the HF checkpoint through the model's own loader), exports the live weights through the
bucketed export, runs the fixed multimodal parity batch, and saves a Megatron checkpoint of itself at this layout.
Results travel back as numpy arrays (tensors returned by a worker would live in shared memory that dies with it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXPORT_BUCKET_BYTES = 64 * 1024  # several buckets even for the tiny models, and tensors larger than a bucket


def _build_chunk(hf_dir: str):
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel
    from lmmrl_megatron.parallel.layout import ShardLayout

    layout = ShardLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size())
    options = QwenVLBuildOptions(
        layout=layout,
        dtype="fp32",
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    return QwenVLModel(
        QwenVLConfig.from_hf_dir(hf_dir),
        options,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def _mapping(hf_dir: str):
    from lmmrl_megatron.models.qwen_vl.checkpoint_model import qwen_vl_shards_to_hf
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig

    return qwen_vl_shards_to_hf(QwenVLConfig.from_hf_dir(hf_dir))


def _export(model, hf_dir: str) -> dict[str, np.ndarray]:
    from lmmrl_megatron.convert.export import export_hf_weights

    state: dict[str, np.ndarray] = {}
    for bucket in export_hf_weights([model], _mapping(hf_dir), bucket_bytes=EXPORT_BUCKET_BYTES):
        for name, tensor in bucket:
            assert name not in state, f"{name} exported twice"
            state[name] = tensor.numpy().copy()
    return state


def _log_probs_and_logits(model, hf_dir: str) -> dict[str, np.ndarray] | None:
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.parallel.vocab_parallel import gather_vocab_parallel_logits
    from lmmrl_megatron.models.qwen_vl.parity import batch_on, build_parity_batch, run_pipeline

    model.eval()
    with torch.no_grad():
        out = run_pipeline(model, batch_on(build_parity_batch(hf_dir), "cpu"), forward_only=True, packed=False)
    if out is None:
        return None
    logits = gather_vocab_parallel_logits(out.logits, model.vocab_size, ps.get_tensor_model_parallel_group())
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return {"logits": logits.float().numpy(), "log_probs": out.log_probs.float().numpy()}


def load_export_forward_save(
    hf_dir: str, load_from: str, save_to: str | None, save_hf_to: str | None = None
) -> dict[str, object]:
    """Worker: fill the chunk from `load_from` (a Megatron checkpoint dir, or "hf" for the HF checkpoint itself),
    export it, run the parity batch, save a Megatron checkpoint of it to `save_to` and a Hugging Face checkpoint of
    it (straight from the live model) to `save_hf_to`, each if given."""
    from lmmrl_megatron.convert.export import save_hf_checkpoint
    from lmmrl_megatron.convert.mcore_ckpt import load_model_checkpoint, save_model_checkpoint
    from lmmrl_megatron.models.qwen_vl.loading import load_hf_checkpoint

    model = _build_chunk(hf_dir)
    if load_from == "hf":
        load_hf_checkpoint(model, hf_dir)
    else:
        load_model_checkpoint([model], load_from)
    result: dict[str, object] = {"export": _export(model, hf_dir), "outputs": _log_probs_and_logits(model, hf_dir)}
    if save_to is not None:
        save_model_checkpoint([model], save_to, hf_template_dir=hf_dir)
    if save_hf_to is not None:
        save_hf_checkpoint([model], _mapping(hf_dir), save_hf_to, hf_dir, EXPORT_BUCKET_BYTES, max_shard_bytes=300_000)
    return result


def hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint, by hub name."""
    from lmmrl_megatron.convert.hf_io import HFCheckpointReader
    from lmmrl_megatron.models.qwen_vl.mapping import canonical_hf_name

    with HFCheckpointReader(hf_dir) as reader:
        return {canonical_hf_name(name): reader.get(name) for name in reader.names}


def assert_same_state(got: dict[str, object], want: dict[str, torch.Tensor], what: str) -> None:
    """Same names, and every tensor bit-exact (values and dtype)."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, tensor in want.items():
        other = got[name]
        other = torch.from_numpy(other) if isinstance(other, np.ndarray) else other
        assert other.dtype == tensor.dtype and torch.equal(other, tensor), f"{what}: {name} differs"


def last_stage_outputs(results: list[dict[str, object]]) -> dict[str, np.ndarray]:
    outputs = [r["outputs"] for r in results if r["outputs"] is not None]
    assert len(outputs) == 1, f"expected one rank with outputs, got {len(outputs)}"
    return outputs[0]
