"""Save and load the trained models (actor, critic) with their optimizers as Megatron-Core distributed checkpoints.

Every rank of the model group writes its shards of each model and of its (distributed) optimizer state into the
directory the controller staged, one sub-directory per role; the layout-free format lets a run resume at another
TP/PP layout. The frozen reference is not saved: it is the initial checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from lmmrl_megatron.convert.mcore_ckpt import model_sharded_state_dict
from lmmrl_megatron.learner.megatron_learner import MegatronLearner


def _materialise_optimizer_state(optimizer) -> None:
    """Create Adam's state (step 0, zero moments) for parameters that have none yet, without touching them.

    torch's Adam makes its state at the first step, and Megatron's distributed optimizer can only describe the
    state it loads into once it exists (transformer-engine's and apex's Adams make theirs up front).
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, in its two parts, for torch's Adam.

    torch's Adam keeps a per-parameter `step` tensor beside the moments; megatron-core 0.19's fully-reshardable
    loader copies every tensor of a parameter's optimizer state from the checkpoint's tensors, which never hold
    `step` (it is stored once, per parameter group), and fails on it. The steps are restored by the first part;
    they are set aside while the second part copies parameters and moments.

    megatron-core 0.19.2's first part hands every parameter the *same* step tensor, and torch's Adam increments
    `state["step"]` in place once per parameter: after a resume the shared counter would run ahead by the number
    of parameters at every optimizer step (and with it Adam's bias correction). Each parameter gets its own copy.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(chained) == 1 else [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
    for dist_optimizer, part in zip(chained, parts, strict=True):
        part = dict(part)
        param_state = part.pop("param_state")
        assert part.pop("param_state_sharding_type") == "fully_reshardable"
        dist_optimizer.load_state_dict(part)  # param groups, steps; no 'param_state': parameters untouched
        inner = dist_optimizer.optimizer.state
        # One tensor per parameter (see above): clone, never share.
        steps = {param: moments.pop("step").detach().clone() for param, moments in inner.items() if "step" in moments}
        try:
            dist_optimizer.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step
    if len(chained) > 1:
        optimizer._synchronize_steps()  # what ChainedOptimizer.load_state_dict ends with


def _sharded_state(learner: MegatronLearner, is_loading: bool) -> dict:
    chunks = [chunk.module for chunk in learner.model]  # unwrap DDP: parameter names as in the plain model
    state = model_sharded_state_dict(chunks)
    assert learner.optimizer is not None
    if is_loading:
        _materialise_optimizer_state(learner.optimizer)
    # 'fully_reshardable' stores the optimizer state per parameter in model space, so a run can resume at another
    # TP/PP/DP layout (the default flattened format only reshards across DP).
    state["optimizer"] = learner.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    return state


def _in_process_results_queue() -> None:
    """Megatron's file writer passes its write results through a queue that a `multiprocessing.Manager` serves:
    a spawned server process (~0.7 GB) per rank that nothing stops when the rank is killed. A synchronous save
    only passes results within this process, so an in-process queue does the same without the extra process."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save_train_state(directory: Path, learners: Mapping[str, MegatronLearner]) -> None:
    from megatron.core import dist_checkpointing

    _in_process_results_queue()

    for role, learner in learners.items():
        if learner.optimizer is None:
            continue
        target = directory / role
        target.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(_sharded_state(learner, is_loading=False), str(target))


def load_train_state(directory: Path, learners: Mapping[str, MegatronLearner]) -> None:
    from megatron.core import dist_checkpointing

    for role, learner in learners.items():
        if learner.optimizer is None:
            continue
        source = directory / role
        if not dist_checkpointing.check_is_distributed_checkpoint(str(source)):
            raise ValueError(f"{source} is not a Megatron-Core distributed checkpoint of the {role}")
        loaded = dist_checkpointing.load(
            _sharded_state(learner, is_loading=True), str(source), strict="assume_ok_unexpected"
        )
        chunks = [chunk.module for chunk in learner.model]
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"])
        _load_optimizer_state(learner.optimizer, loaded["optimizer"])
