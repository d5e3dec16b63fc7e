"""Save and load the trained models (actor, critic) with their optimizers as Megatron-Core distributed checkpoints.

Every rank of the model group writes its shards of each model and of its (distributed) optimizer state into the
directory the controller staged, one sub-directory per role; the layout-free format lets a run resume at another
TP/PP layout. The frozen reference is not saved: it is the initial checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lmmrl_megatron.convert.mcore_ckpt import model_sharded_state_dict
from lmmrl_megatron.engine.megatron_engine import MegatronEngine


def _sharded_state(engine: MegatronEngine, is_loading: bool) -> dict:
    chunks = [chunk.module for chunk in engine.model]  # unwrap DDP: parameter names as in the plain model
    state = model_sharded_state_dict(chunks)
    assert engine.optimizer is not None
    # 'fully_reshardable' stores the optimizer state per parameter in model space, so a run can resume at another
    # TP/PP/DP layout (the default flattened format only reshards across DP).
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    return state


def save_train_state(directory: Path, engines: Mapping[str, MegatronEngine]) -> None:
    from megatron.core import dist_checkpointing

    for role, engine in engines.items():
        if engine.optimizer is None:
            continue
        target = directory / role
        target.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(_sharded_state(engine, is_loading=False), str(target))


def load_train_state(directory: Path, engines: Mapping[str, MegatronEngine]) -> None:
    from megatron.core import dist_checkpointing

    for role, engine in engines.items():
        if engine.optimizer is None:
            continue
        source = directory / role
        if not dist_checkpointing.check_is_distributed_checkpoint(str(source)):
            raise ValueError(f"{source} is not a Megatron-Core distributed checkpoint of the {role}")
        loaded = dist_checkpointing.load(
            _sharded_state(engine, is_loading=True), str(source), strict="assume_ok_unexpected"
        )
        chunks = [chunk.module for chunk in engine.model]
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"])
        engine.optimizer.load_state_dict(loaded["optimizer"])
