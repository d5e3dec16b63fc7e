"""Checks of a whole run configuration that no single section can make, run before any worker starts.

    validate_run_config(config)                  # the trainer calls this first; raises ValueError listing problems
    validate_run_config(config, training=False)  # lmmrl-eval: what generation and scoring need

Each section checks its own fields when it is built (a wrong type or range fails at load time, naming the key and
the line). What is left for here spans sections or needs the file system: the model folder, the data and eval
files, the reward functions, the rollout backend and what it can run, the placement, the model's layout and (on a
GPU machine) its memory plan from `plan/` (config.json only), the learning-rate schedule against the run's length. Every problem found is reported at once, each naming its key. Nothing here loads a model
or reads a data record, so it takes milliseconds: a 72B run learns it has a typo before it loads 72B parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmmrl_megatron.config.schema import RunConfig


def _model_problems(config: RunConfig, training: bool) -> list[str]:
    problems = []
    pretrain = config.model.pretrain
    if not pretrain:
        problems.append("model.pretrain is empty: name a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint folder")
    elif not (Path(pretrain).expanduser() / "config.json").is_file():
        problems.append(f"model.pretrain={pretrain!r} is not a Hugging Face checkpoint folder (no config.json)")
    if training and config.model.dtype == "fp16":
        problems.append(
            "model.dtype='fp16' is not supported for training: the Megatron learner has no fp16 loss scaling (an "
            "fp16 run would train fp16 weights with no loss scale and overflow or underflow); use 'bf16' on GPUs "
            "or 'fp32'"
        )
    if config.model.cuda_graphs and config.model.recompute == "full":
        problems.append("model.cuda_graphs needs model.recompute 'none' or 'selective': a graph keeps the "
                        "activations that full recompute exists to drop")
    if config.model.cuda_graphs and config.parallel.sequence_parallel:
        problems.append("model.cuda_graphs does not support parallel.sequence_parallel (Megatron's RNG tracker "
                        "fork in the decoder is not graph-safe)")
    return problems


def _placement_problems(config: RunConfig, training: bool) -> list[str]:
    trainer, rollout = config.trainer, config.rollout
    engine_devices = rollout.num_engines * rollout.engine_tp
    problems = []
    if training and trainer.colocate_all_models and engine_devices > trainer.actor_world_size:
        problems.append(
            f"rollout.num_engines * rollout.engine_tp = {engine_devices} engine devices do not fit on the "
            f"{trainer.actor_world_size} policy ranks they are colocated with (trainer.actor_world_size); "
            "use fewer engines or trainer.colocate_all_models: false"
        )
    if rollout.weight_transport == "cuda_ipc" and not (trainer.num_gpus_per_node > 0 and trainer.colocate_all_models):
        problems.append("rollout.weight_transport=cuda_ipc needs GPUs and trainer.colocate_all_models: true")
    if trainer.num_gpus_per_node > 0:
        total = trainer.num_nodes * trainer.num_gpus_per_node
        needed = (trainer.actor_world_size if training else 0) + (
            engine_devices if not (training and trainer.colocate_all_models) else 0
        )
        if needed > total:
            problems.append(
                f"the run needs {needed} GPUs (policy ranks and engines) but trainer.num_nodes * "
                f"trainer.num_gpus_per_node = {total}"
            )
    return problems


def _local_gpu_memory() -> int | None:
    """This machine's first GPU's memory through NVML (no CUDA context in the driver process), None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no GPU: nothing to plan against
        return None


def _plan_problems(config: RunConfig) -> list[str]:
    """lmmrl-plan's checks from config.json (no weights): the layout always, the memory verdict against this
    machine's GPU when it has one (the trainer's GPUs are taken to be of the same kind)."""
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
    from lmmrl_megatron.plan.gpus import gpu_from_memory
    from lmmrl_megatron.plan.layout import layout_problems

    pretrain = config.model.pretrain
    if not pretrain or not (Path(pretrain).expanduser() / "config.json").is_file():
        return []  # _model_problems reports it
    try:
        qwen = QwenVLConfig.from_hf_dir(Path(config.model.pretrain).expanduser())
    except ValueError as exc:
        return [f"model.pretrain: {exc}"]
    problems = layout_problems(qwen, config)
    # The memory verdict is a model (bench/plan_check.py measures its error); LMMRL_SKIP_MEMORY_PLAN=1 starts anyway.
    skip = os.environ.get("LMMRL_SKIP_MEMORY_PLAN") == "1"
    memory = _local_gpu_memory() if config.trainer.num_gpus_per_node > 0 and not problems and not skip else None
    if memory is not None:
        from lmmrl_megatron.plan.report import make_plan

        plan = make_plan(config, gpu_from_memory(memory), qwen)
        problems += [f"lmmrl-plan: {reason} (lmmrl-plan prints the whole plan; LMMRL_SKIP_MEMORY_PLAN=1 starts "
                     "anyway)" for reason in plan.verdict]
    return problems


def _data_problems(config: RunConfig, training: bool) -> list[str]:
    from lmmrl_megatron.data.sources import resolve_source

    problems = []
    if training:
        if not config.data.prompt_data:
            problems.append("data.prompt_data is empty: give at least one prompt source")
        for index, spec in enumerate(config.data.prompt_data):
            try:
                resolve_source(spec, config.data.split)
            except ValueError as exc:
                problems.append(f"data.prompt_data[{index}]: {exc}")
    for eval_set in config.eval.sets:
        try:
            resolve_source(eval_set.data, eval_set.split)
        except ValueError as exc:
            problems.append(f"eval.sets[{eval_set.name}]: {exc}")
    return problems


def _reward_function_problems(names: list[str], key: str) -> list[str]:
    from lmmrl_megatron.reward.config import BUILTIN_REWARD_FUNCTIONS
    from lmmrl_megatron.reward.user_functions import load_reward_function

    problems = []
    for name in names:
        if name in BUILTIN_REWARD_FUNCTIONS:
            continue
        try:
            load_reward_function(name)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _reward_problems(config: RunConfig, training: bool) -> list[str]:
    problems = []
    if training and config.reward.remote_rm_url is None:
        problems += _reward_function_problems(config.reward.function_names, "reward.functions")
    if config.eval.sets:
        try:
            eval_names = config.eval.scorer_config(config.reward).function_names
        except ValueError as exc:
            return problems + [f"eval.accuracy_function / eval.format_function: {exc}"]
        problems += _reward_function_problems(eval_names, "eval.accuracy_function / eval.format_function")
    return problems


def _schedule_problems(config: RunConfig) -> list[str]:
    trainer = config.trainer
    roles = [("actor", trainer.actor)] + ([("critic", trainer.critic)] if config.algorithm.needs_critic else [])
    problems = []
    for role, optimizer in roles:
        if optimizer.lr_warmup_steps >= trainer.max_steps and optimizer.lr_warmup_steps > 0:
            problems.append(
                f"trainer.{role}.lr_warmup_steps={optimizer.lr_warmup_steps} >= trainer.max_steps="
                f"{trainer.max_steps}: the run would end before the learning rate reaches trainer.{role}.lr"
            )
    return problems


def run_config_problems(config: RunConfig, training: bool = True, check_model: bool = True) -> list[str]:
    """Every problem `validate_run_config` would report, as a list (empty: the config can run)."""
    from lmmrl_megatron.rollout.registry import rollout_backend_problems

    problems = _model_problems(config, training) if check_model else []
    problems += rollout_backend_problems(config)
    problems += _placement_problems(config, training)
    if training and check_model:
        problems += _plan_problems(config)
    problems += _data_problems(config, training)
    problems += _reward_problems(config, training)
    if training:
        problems += _schedule_problems(config)
    return problems


def validate_run_config(config: RunConfig, training: bool = True, check_model: bool = True) -> None:
    """Raise ValueError listing every problem that would stop `config` later (see the module docstring);
    `training=False` checks only what evaluation needs (no training data, optimizer or policy placement);
    `check_model=False` leaves `model` out (lmmrl-eval checks the rest once before it resolves its models)."""
    problems = run_config_problems(config, training, check_model)
    if problems:
        raise ValueError("invalid run configuration:\n  - " + "\n  - ".join(problems))
