"""Save and load a live Megatron-Core model as a distributed checkpoint (`torch_dist`), at any TP/PP layout.

A Megatron-Core distributed checkpoint stores global tensors with sharding metadata: each rank writes the pieces
of the global tensors it holds (`model.sharded_state_dict()` says which), and a loader at another TP/PP reads back
whichever pieces its own shards cover. So a checkpoint saved at TP=2, PP=2 loads at TP=1, PP=1 and the reverse.

    save_model_checkpoint(model_chunks, "ckpt/step_100", hf_template_dir=hf_dir)   # every rank calls it
    load_model_checkpoint(model_chunks, "ckpt/step_100")                          # at any layout

Both are collective over the default process group. The save is written aside (`OUT.tmp-<pid of rank 0>`) and
renamed into place by rank 0 after every rank finished, so a crash never leaves a directory that looks complete.

Megatron-Core 0.19.2 on CPU with gloo (checked by tests/convert/test_mcore_ckpt.py and test_convert_roundtrip.py):
- the default `torch_dist` save and load work, and so do the fully parallel wrappers (`parallel="fully_parallel"`:
  the save is spread over the data-parallel replicas; each load piece is read once and exchanged by broadcast);
- the save needs `psutil` (Megatron's file writer imports it at write time and fails without it);
- the synchronous save still starts a `multiprocessing.Manager` process for its results queue, which a daemonic
  process may not do; `_allow_sync_save_in_daemon_process` gives such processes an in-process queue instead;
- loads must use `strict="assume_ok_unexpected"`: every other mode reads the tensor metadata through Megatron's
  `load_tensors_metadata`, which raises a TypeError with torch 2.15 (TensorProperties has gained `strides`);
- the asynchronous save (a forked writer process) is not used here.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from lmmrl_megatron.convert.atomic_dir import check_output_dir, publish_dir, staging_dir_for
from lmmrl_megatron.convert.hf_io import copy_template_files

HF_TEMPLATE_SUBDIR = "hf_template"  # config, tokenizer and processor of the model, for the conversion back to HF
CONTENT_FORMAT = "lmmrl_megatron.model/1"

ParallelStrategy = Literal["torch_dist", "fully_parallel"]


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of a model given as its (virtual pipeline) chunks, nested as Megatron-LM nests it."""
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _save_strategy(parallel: ParallelStrategy):
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    base = TorchDistSaveShardedStrategy()
    if parallel == "torch_dist":
        return base
    from megatron.core import parallel_state

    return FullyParallelSaveStrategyWrapper(base, parallel_state.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(parallel: ParallelStrategy):
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    base = TorchDistLoadShardedStrategy()
    if parallel == "torch_dist":
        return base
    from megatron.core import parallel_state

    return FullyParallelLoadStrategyWrapper(base, parallel_state.get_data_parallel_group(with_context_parallel=True))


def _allow_sync_save_in_daemon_process() -> None:
    """Let Megatron's synchronous save run inside a daemonic process (a multiprocessing worker).

    Megatron's file writer creates its write-results queue through a `multiprocessing.Manager`, which starts a
    child process; daemonic processes may not have children, so the save fails there. In a synchronous save the
    queue only ever passes results within this process, so an in-process queue is equivalent.
    """
    if not multiprocessing.current_process().daemon:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _agreed_staging_dir(out: Path) -> Path:
    """Every rank must write into the same staging directory: rank 0 names it and tells the others."""
    names = [str(staging_dir_for(out)) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    return Path(names[0])


def save_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    out_dir: str | Path,
    extra_state: dict[str, Any] | None = None,
    hf_template_dir: str | Path | None = None,
    overwrite: bool = False,
    parallel: ParallelStrategy = "torch_dist",
) -> Path:
    """Collectively save the model (and picklable `extra_state`, e.g. step counters) to `out_dir`.

    `hf_template_dir`, when given, is a Hugging Face checkpoint whose config/tokenizer/processor files are kept in
    `out_dir/hf_template/`, so that `mcore_to_hf` can convert the checkpoint back without being told the model.
    """
    from megatron.core import dist_checkpointing

    out = Path(out_dir).absolute()
    is_rank0 = torch.distributed.get_rank() == 0
    if is_rank0:
        check_output_dir(out, overwrite)
    staging = _agreed_staging_dir(out)
    if is_rank0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    _allow_sync_save_in_daemon_process()
    state = model_sharded_state_dict(model_chunks)
    if extra_state:
        state["extra_state"] = extra_state
    dist_checkpointing.save(
        state, str(staging), sharded_strategy=_save_strategy(parallel), content_metadata={"format": CONTENT_FORMAT}
    )
    torch.distributed.barrier()
    if is_rank0:
        if hf_template_dir is not None:
            (staging / HF_TEMPLATE_SUBDIR).mkdir()
            copy_template_files(Path(hf_template_dir), staging / HF_TEMPLATE_SUBDIR)
        publish_dir(staging, out)
    torch.distributed.barrier()
    return out


def load_model_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    ckpt_dir: str | Path,
    strict: bool = True,
    parallel: ParallelStrategy = "torch_dist",
) -> dict[str, Any]:
    """Collectively load `ckpt_dir` into the model's parameters, whatever layout it was saved at.

    Returns the checkpoint's `extra_state` ({} if none). With `strict`, a parameter of the model that the
    checkpoint lacks is an error (and so is an unexpected key in the model's state dict).
    """
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise ValueError(f"{path} is not a Megatron-Core distributed checkpoint (no valid metadata.json)")
    state = model_sharded_state_dict(model_chunks)
    loaded = dist_checkpointing.load(
        state,
        str(path),
        sharded_strategy=_load_strategy(parallel),
        # Every other strictness mode first reads the checkpoint's tensor metadata with Megatron's
        # `load_tensors_metadata`, which fails on torch >= 2.15 (TensorProperties gained `strides`). A key the
        # checkpoint lacks still fails the load, and `load_state_dict(strict=...)` below checks the rest.
        strict="assume_ok_unexpected",
    )
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=strict)
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=strict)
    common = dist_checkpointing.load_common_state_dict(str(path))
    return dict(common.get("extra_state", {}))


def hf_template_of(ckpt_dir: str | Path) -> Path | None:
    """The Hugging Face template directory saved inside a checkpoint, if any."""
    template = Path(ckpt_dir) / HF_TEMPLATE_SUBDIR
    return template if (template / "config.json").is_file() else None


def is_staging_dir(path: Path) -> bool:
    """True for a directory an interrupted save left behind (never a loadable checkpoint)."""
    return ".tmp-" in path.name and path.name.rsplit(".tmp-", 1)[1].isdigit()


__all__ = [
    "HF_TEMPLATE_SUBDIR",
    "hf_template_of",
    "is_staging_dir",
    "load_model_checkpoint",
    "model_sharded_state_dict",
    "save_model_checkpoint",
]
