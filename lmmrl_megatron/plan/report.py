"""A whole plan: per-stage, per-phase memory on the chosen GPU, the engines' KV cache, the verdict, a step time.

    plan = make_plan(config, get_gpu("H100-80GB"))
    print(render(plan)); plan.fits  # -> bool; plan.verdict: the first thing that does not fit and the knobs
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.plan.gpus import GPU, GiB
from lmmrl_megatron.plan.layout import layout_notes, layout_problems
from lmmrl_megatron.plan.memory import (
    PHASES,
    VLLM_RESERVE,
    EngineMemory,
    PhaseMemory,
    data_parallel_size,
    engine_memory,
    stage_memory,
    swaps,
)
from lmmrl_megatron.plan.params import StageParams, stage_params

if TYPE_CHECKING:  # read by its fields: config/validate.py calls into plan/, so plan/ imports no config
    from lmmrl_megatron.config.schema import RunConfig
    from lmmrl_megatron.config.sections import RolloutConfig

# What to turn when a term does not fit, largest term first.
KNOBS: dict[str, str] = {
    "optimizer": "more data-parallel ranks (trainer.actor_world_size) with trainer.actor.use_distributed_optimizer, "
                 "a larger parallel.pp or parallel.tp, model.freeze_vision",
    "grads": "a larger parallel.pp or parallel.tp, model.freeze_vision",
    "weights": "a larger parallel.pp or parallel.tp",
    "activations": "model.recompute=full, a smaller trainer.max_tokens_per_micro_batch, parallel.sequence_parallel, "
                   "a larger parallel.tp or parallel.pp",
    "logits": "a smaller trainer.max_tokens_per_micro_batch, a larger parallel.tp",
    "adam temp": "more data-parallel ranks with trainer.actor.use_distributed_optimizer",
    "vllm": "a lower rollout.gpu_memory_utilization (or trainer.colocate_all_models: false)",
    "buckets": "a smaller rollout.weight_sync_bucket_mb",
    "cuda graphs": "model.cuda_graphs=false, a smaller trainer.max_tokens_per_micro_batch",
    "cuda context": "nothing: a smaller model layout elsewhere",
}
MFU = 0.35  # assumed for the rough step time
SYNC_GB_PER_S = 50.0  # export + load of the buckets, per engine GPU
SWAP_GB_PER_S = 45.0  # optimizer state to pinned host chunks and back, each way (45-51 GB/s measured on an H200)


@dataclass
class Plan:
    config: RunConfig
    qwen: QwenVLConfig
    gpu: GPU
    problems: list[str]  # layout: nothing else is planned when there are any
    notes: list[str] = field(default_factory=list)
    stages: list[StageParams] = field(default_factory=list)
    memory: list[list[PhaseMemory]] = field(default_factory=list)  # [stage][phase]
    engine: EngineMemory | None = None
    verdict: list[str] = field(default_factory=list)  # empty: it fits

    @property
    def fits(self) -> bool:
        return not self.problems and not self.verdict


def _whole_model_params(qwen: QwenVLConfig) -> int:
    return stage_params(qwen, ShardLayout())[0].total


def make_plan(config: RunConfig, gpu: GPU, qwen: QwenVLConfig | None = None) -> Plan:
    if qwen is None:
        qwen = QwenVLConfig.from_hf_dir(config.model.pretrain)
    plan = Plan(config, qwen, gpu, layout_problems(qwen, config), layout_notes(qwen, config))
    if plan.problems:
        return plan
    plan.stages = stage_params(qwen, config.parallel.layout)
    whole = _whole_model_params(qwen)
    plan.memory = [stage_memory(qwen, config, stage, gpu, whole) for stage in plan.stages]
    if config.rollout.backend == "vllm" and config.trainer.num_gpus_per_node > 0:
        plan.engine = engine_memory(qwen, config, gpu, whole)
    plan.verdict = _verdict(plan)
    return plan


def _verdict(plan: Plan) -> list[str]:
    """The first phase (in step order) and stage that does not fit, with the knobs of its largest terms."""
    found = []
    for phase_index, phase in enumerate(PHASES):
        for stage, phases in enumerate(plan.memory):
            memory = phases[phase_index]
            if memory.total > plan.gpu.memory_bytes:
                largest = sorted(memory.terms.items(), key=lambda kv: -kv[1])[:2]
                found.append(
                    f"{phase} on pipeline stage {stage} needs {memory.total / GiB:.1f} GiB > {plan.gpu.name}'s "
                    f"{plan.gpu.memory_bytes / GiB:.1f} GiB; largest: "
                    + ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in largest)
                    + "; to fit: " + "; or ".join(KNOBS[name] for name, _ in largest)
                )
                break
        if found:
            break
    engine, rollout = plan.engine, plan.config.rollout
    if engine is not None:
        need = longest_sequence(plan)
        if engine.kv_tokens < need:
            found.append(
                f"rollout: the KV cache of an engine GPU holds {engine.kv_tokens} tokens ({engine.kv_cache / GiB:.1f} "
                f"GiB after {engine.weights / GiB:.1f} GiB of weights) < rollout.max_model_len={need}; to fit: a higher "
                "rollout.gpu_memory_utilization, a larger rollout.engine_tp, or a smaller rollout.max_model_len"
            )
    return found


def longest_sequence(plan: Plan) -> int:
    """The engines' max_model_len: their KV cache must hold one sequence this long or vLLM does not start."""
    return plan.config.rollout.max_model_len or plan.qwen.text.max_position_embeddings


def typical_sequence_tokens(rollout: RolloutConfig) -> float:
    """Prompt + response of a typical sequence: half of max_model_len, or twice the response when that is unset."""
    return (rollout.max_model_len or rollout.max_new_tokens * 2) / 2


def sequences_per_engine(rollout: RolloutConfig) -> int:
    """One step's responses over the engines: what each engine generates (and caches) in a step."""
    return math.ceil(rollout.rollout_batch_size * rollout.n_samples_per_prompt / rollout.num_engines)


def step_time(plan: Plan) -> dict[str, float]:
    """Rough seconds per phase: decode bound by HBM bandwidth, forward/backward by FLOPs at MFU, sync by bytes.
    Sequences (prompt + response) are taken as half of max_model_len."""
    cfg, gpu, engine = plan.config, plan.gpu, plan.engine
    rollout = cfg.rollout
    whole = _whole_model_params(plan.qwen)
    sequences = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    seq_len = typical_sequence_tokens(rollout)
    times: dict[str, float] = {}
    if engine is not None:
        per_engine = sequences_per_engine(rollout)
        concurrent = max(1, min(per_engine, engine.kv_tokens // max(1, int(seq_len))))
        kv_read = concurrent * seq_len / 2 * engine.kv_bytes_per_token
        decode_step = (engine.weights + kv_read) / (gpu.hbm_tb_per_s * 1e12 * 0.7)
        times["generate"] = math.ceil(per_engine / concurrent) * rollout.max_new_tokens * decode_step
    flops_per_s = cfg.trainer.actor_world_size * gpu.bf16_tflops * 1e12 * MFU
    tokens = sequences * seq_len
    forwards = 1 + cfg.algorithm.needs_reference + cfg.algorithm.needs_critic
    times["logprob"] = forwards * 2 * whole * tokens / flops_per_s
    recompute = 2 if cfg.model.recompute == "full" else 0
    times["train"] = cfg.algorithm.ppo_epochs * (6 + recompute) * whole * tokens / flops_per_s
    times["sync"] = 2 * whole / max(1, rollout.engine_tp) / (SYNC_GB_PER_S * 1e9)
    if swaps(cfg) and plan.memory:  # the optimizer state goes off and comes back; the gradient buffers are freed
        optimizer = max(phases[PHASES.index("train")].terms.get("optimizer", 0) for phases in plan.memory)
        times["swap"] = 2 * optimizer / (SWAP_GB_PER_S * 1e9)
    return times


def without_swap(plan: Plan) -> Plan | None:
    """The same run with the training state left on the GPU while the engines generate (no colocated swap), the
    engines given the smallest share that holds one rollout's KV cache; None when there is no swap or it does not
    fit. The swap costs ~2 x optimizer bytes / SWAP_GB_PER_S a step (2 s at 3B), so a run that fits without it
    should drop it."""
    cfg, engine = plan.config, plan.engine
    if not (plan.fits and swaps(cfg) and engine is not None):
        return None
    rollout = cfg.rollout
    # the whole rollout at once
    kv_tokens = max(longest_sequence(plan), sequences_per_engine(rollout) * typical_sequence_tokens(rollout))
    share = (engine.weights + VLLM_RESERVE + kv_tokens * engine.kv_bytes_per_token) / plan.gpu.memory_bytes
    share = math.ceil(share * 100) / 100
    if share >= rollout.gpu_memory_utilization:
        return None  # no smaller share to give: the swap is what makes room
    config = dataclasses.replace(
        cfg, rollout=dataclasses.replace(rollout, enable_sleep=False, gpu_memory_utilization=share)
    )
    alternative = make_plan(config, plan.gpu, plan.qwen)
    return alternative if alternative.fits else None


def _gib(value: int) -> str:
    return f"{value / GiB:7.1f}"


def _stage_table(plan: Plan, stage: int) -> list[str]:
    phases = plan.memory[stage]
    terms = list(dict.fromkeys(name for phase in phases for name in phase.terms))
    lines = [f"  {'GiB per GPU':<14}" + "".join(f"{p.phase:>10}" for p in phases)]
    for name in terms:
        lines.append(f"  {name:<14}" + "".join(f"{_gib(p.terms.get(name, 0)):>10}" for p in phases))
    lines.append(f"  {'peak':<14}" + "".join(f"{_gib(p.total):>10}" for p in phases))
    lines.append(f"  {'fits':<14}" + "".join(f"{'yes' if p.total <= plan.gpu.memory_bytes else 'NO':>10}" for p in phases))
    return lines


def render(plan: Plan) -> str:
    cfg = plan.config
    p, t = cfg.parallel, cfg.trainer
    head = [
        f"lmmrl-plan: {plan.qwen.arch} ({cfg.model.pretrain}) on {t.num_nodes} x {t.num_gpus_per_node} "
        f"{plan.gpu.name} ({plan.gpu.memory_bytes / GiB:.1f} GiB)",
        f"layout: TP={p.tp} PP={p.pp}" + (f" VPP={p.vpp}" if p.vpp else "") + f" DP={data_parallel_size(cfg)} "
        f"(actor_world_size={t.actor_world_size}), sequence_parallel={p.sequence_parallel}, recompute="
        f"{cfg.model.recompute}, max_tokens_per_micro_batch={t.max_tokens_per_micro_batch}, colocated="
        f"{t.colocate_all_models}; engines: {cfg.rollout.num_engines} x TP={cfg.rollout.engine_tp}, "
        f"gpu_memory_utilization={cfg.rollout.gpu_memory_utilization}",
    ]
    if plan.problems:
        return "\n".join(head + ["VERDICT: the layout is invalid:"] + [f"  - {x}" for x in plan.problems])
    lines = head + [f"note: {n}" for n in plan.notes]
    for s in plan.stages:
        lines.append(f"pipeline stage {s.stage}: {s.layers} decoder layers, {s.total / 1e9:.3f} B parameters per rank"
                     + (f" (vision {s.vision / 1e9:.3f} B)" if s.vision else ""))
        lines += _stage_table(plan, s.stage)
    if plan.engine is not None:
        e = plan.engine
        lines.append(f"engine GPU: vLLM budget {e.budget / GiB:.1f} GiB = weights {e.weights / GiB:.1f} + KV cache "
                     f"{max(e.kv_cache, 0) / GiB:.1f} GiB ({e.kv_tokens} tokens) + reserve")
    times = step_time(plan)
    lines.append("rough step time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
                 + f", total {sum(times.values()):.0f} s (MFU {MFU}, sequences of max_model_len / 2)")
    if plan.fits:
        lines.append("VERDICT: fits")
        alternative = without_swap(plan)
        if alternative is not None:
            peak = max(phase.total for phases in alternative.memory for phase in phases)
            lines.append(
                f"faster: without the colocated swap ({times['swap']:.1f} s a step) it fits too, peak {peak / GiB:.1f} "
                f"GiB: rollout.enable_sleep=false rollout.gpu_memory_utilization="
                f"{alternative.config.rollout.gpu_memory_utilization}"
            )
    else:
        lines += ["VERDICT: does not fit:"] + [f"  - {x}" for x in plan.verdict]
    return "\n".join(lines)
