"""lmmrl-plan on the 72B config: the per-phase table and verdict, layouts that do not fit or are not legal (each
with its named reason and knobs), and the parameter counts against our model built on the meta device."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
from lmmrl_megatron.plan.gpus import get_gpu
from lmmrl_megatron.plan.layout import layout_problems
from lmmrl_megatron.plan.report import SWAP_GB_PER_S, make_plan, render, step_time, without_swap

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "configs" / "models"


def config_72b(*overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / "rloo_qwen2_5_vl_72b.yaml",
                       [f"model.pretrain={MODELS / 'qwen2_5_vl_72b'}", *overrides])


def test_the_72b_plan_fits_on_4x8_h100_and_renders_every_phase() -> None:
    plan = make_plan(config_72b(), get_gpu("H100-80GB"))
    assert plan.fits, plan.verdict
    text = render(plan)
    # Under full recompute every stage's train phase peaks at the Adam step (adam temp), not in the backward.
    for needle in ("generate", "logprob", "train", "sync", "optimizer", "adam temp", "logits", "vllm", "KV cache",
                   "pipeline stage 3", "rough step time", "VERDICT: fits"):
        assert needle in text, needle
    # Four stages of 20 layers; stage 0 also holds the vision tower, the last the output layer.
    assert [s.layers for s in plan.stages] == [20] * 4
    assert plan.stages[0].vision > 0 and all(s.vision == 0 for s in plan.stages[1:])
    peak = max(phase.total for phases in plan.memory for phase in phases)
    assert 0.5 * plan.gpu.memory_bytes < peak <= plan.gpu.memory_bytes


def config_3b_one_gpu(*overrides: str) -> RunConfig:
    """bench/vs_trl.py's run: Qwen2.5-VL-3B on one GPU, the engine colocated, 16 prompts x 4 answers x 256 tokens."""
    return load_config(RunConfig, REPO / "configs" / "rloo_tiny.yaml", [
        f"model.pretrain={MODELS / 'qwen2_5_vl_3b'}", "model.dtype=bf16", "trainer.num_gpus_per_node=1",
        "trainer.actor_world_size=1", "parallel.tp=1", "rollout.backend=vllm", "rollout.rollout_batch_size=16",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=256", "trainer.train_batch_size=64",
        "trainer.max_tokens_per_micro_batch=8192", *overrides,
    ])


def test_a_swap_that_is_not_needed_is_priced_and_the_run_without_it_is_named() -> None:
    plan = make_plan(config_3b_one_gpu(), get_gpu("H200-141GB"))
    assert plan.fits, plan.verdict
    optimizer = plan.memory[0][2].terms["optimizer"]
    assert step_time(plan)["swap"] == pytest.approx(2 * optimizer / (SWAP_GB_PER_S * 1e9))
    # 3.755 B parameters: 12 bytes each of fp32 master weights and Adam moments go off and back every step
    assert 1.8 < step_time(plan)["swap"] < 2.2
    alternative = without_swap(plan)
    assert alternative is not None and alternative.fits
    rollout = alternative.config.rollout
    assert rollout.enable_sleep is False and 0 < rollout.gpu_memory_utilization < 0.2
    # the smallest share whose KV cache still holds one sequence of the model's full length
    assert alternative.engine.kv_tokens >= plan.qwen.text.max_position_embeddings
    assert "swap" not in step_time(alternative)
    assert (f"rollout.enable_sleep=false rollout.gpu_memory_utilization={rollout.gpu_memory_utilization}"
            in render(plan))
    assert without_swap(alternative) is None  # nothing to drop any more
    assert "faster: without the colocated swap" not in render(alternative)


def test_a_swap_that_makes_the_room_is_kept() -> None:
    plan = make_plan(config_72b(), get_gpu("H100-80GB"))
    assert plan.fits and "swap" in step_time(plan), plan.verdict
    assert without_swap(plan) is None  # the engines' share is the room the sleeping training state leaves
    assert "faster: without" not in render(plan)


def test_selective_recompute_does_not_fit_and_names_the_activations_and_the_knobs() -> None:
    plan = make_plan(config_72b("model.recompute=selective"), get_gpu("H100-80GB"))
    assert not plan.fits
    reason = plan.verdict[0]
    assert reason.startswith("train on pipeline stage 0 needs"), reason
    assert "activations" in reason and "model.recompute=full" in reason and "max_tokens_per_micro_batch" in reason
    text = render(plan)
    assert "\n  activations " in text and "VERDICT: does not fit" in text
    # The same layout on the larger GPU fits.
    assert make_plan(config_72b("model.recompute=selective"), get_gpu("H200-141GB")).fits


def test_a_greedy_vllm_share_does_not_fit_generate() -> None:
    plan = make_plan(config_72b("rollout.gpu_memory_utilization=0.95"), get_gpu("A100-80GB"))
    assert plan.verdict and plan.verdict[0].startswith("generate on pipeline stage 0"), plan.verdict
    assert "rollout.gpu_memory_utilization" in plan.verdict[0]


def test_a_kv_cache_smaller_than_max_model_len_is_reported() -> None:
    plan = make_plan(config_72b("rollout.gpu_memory_utilization=0.25", "rollout.max_model_len=131072"),
                     get_gpu("H100-80GB"))
    assert any(r.startswith("rollout: the KV cache") and "rollout.max_model_len=131072" in r for r in plan.verdict)


def test_cuda_graphs_keep_gradient_buffers_and_one_micro_batch_on_stage_0() -> None:
    import inspect

    from lmmrl_megatron.models.decoder_graphs import DecoderGraphs
    from lmmrl_megatron.plan import memory

    assert memory.CUDA_GRAPHS_MAX == inspect.signature(DecoderGraphs.attach).parameters["max_graphs"].default
    config = config_72b("model.recompute=selective", "model.cuda_graphs=true")
    base = make_plan(config_72b("model.recompute=selective"), get_gpu("H200-141GB"))
    graphed = make_plan(config, get_gpu("H200-141GB"))
    stage0 = base.stages[0]
    layer, _ = memory.activation_bytes_per_token(QwenVLConfig.from_hf_dir(MODELS / "qwen2_5_vl_72b"), config)
    grads = memory.CUDA_GRAPHS_MAX * 2 * stage0.decoder  # bf16 weights: a 2-byte gradient buffer per graph
    pool = int(config.trainer.max_tokens_per_micro_batch * layer * stage0.layers)
    assert grads > 0 and pool > 0
    for phase, with_graphs in zip(base.memory[0], graphed.memory[0]):
        # In the train phase the pool's micro-batch is what the activations term already counts.
        expected = grads + (0 if phase.phase == "train" else pool)
        assert with_graphs.terms["cuda graphs"] == expected, phase.phase
        assert with_graphs.total == phase.total + expected, phase.phase
    assert all("cuda graphs" not in phase.terms for phases in graphed.memory[1:] for phase in phases)
    assert "cuda graphs" in render(graphed)


def test_the_distributed_optimizer_shards_over_data_parallel_ranks() -> None:
    one = make_plan(config_72b(), get_gpu("H200-141GB")).memory[0][2].terms["optimizer"]
    two = make_plan(config_72b("trainer.num_nodes=8", "trainer.actor_world_size=64"), get_gpu("H200-141GB"))
    assert two.memory[0][2].terms["optimizer"] == pytest.approx(one / 2, rel=1e-6)


@pytest.mark.parametrize("overrides, reason", [
    (["parallel.tp=3", "parallel.pp=1", "parallel.sequence_parallel=true", "trainer.actor_world_size=3"],
     "parallel.tp=3 does not divide the model's num_attention_heads=64"),
    (["parallel.tp=16", "parallel.pp=2"], "parallel.tp=16 > trainer.num_gpus_per_node=8"),
    (["parallel.pp=3", "trainer.actor_world_size=24"], "do not split evenly over the 3"),
    (["parallel.num_layers_in_first_pipeline_stage=18"], "do not split evenly"),
    (["parallel.vpp=3"], "parallel.vpp=3"),
    (["rollout.engine_tp=16", "rollout.num_engines=2"], "rollout.engine_tp=16 > trainer.num_gpus_per_node=8"),
    (["rollout.engine_tp=3", "rollout.num_engines=8"], "rollout.engine_tp=3 does not divide num_attention_heads"),
])
def test_layout_errors_name_their_keys(overrides: list[str], reason: str) -> None:
    config = config_72b(*overrides)
    problems = layout_problems(QwenVLConfig.from_hf_dir(MODELS / "qwen2_5_vl_72b"), config)
    assert any(reason in p for p in problems), problems
    plan = make_plan(config, get_gpu("H100-80GB"))
    assert not plan.fits and "VERDICT: the layout is invalid" in render(plan)


def test_kv_heads_that_tp_cannot_split_or_replicate() -> None:
    qwen = QwenVLConfig.from_hf_dir(MODELS / "qwen2_5_vl_72b")  # 8 KV heads: TP 16 replicates, TP 12 cannot
    ok = config_72b("parallel.tp=16", "parallel.pp=2", "trainer.num_gpus_per_node=16")
    assert layout_problems(qwen, ok) == []
    bad = config_72b("parallel.tp=12", "parallel.pp=1", "parallel.sequence_parallel=true",
                     "trainer.actor_world_size=36", "trainer.num_gpus_per_node=12", "rollout.num_engines=3")
    assert any("tp=12 is not a multiple of num_key_value_heads=8" in p for p in layout_problems(qwen, bad))


def test_uneven_first_and_last_stages_move_layers_and_parameters() -> None:
    plan = make_plan(config_72b("parallel.num_layers_in_first_pipeline_stage=17",
                                "parallel.num_layers_in_last_pipeline_stage=21"), get_gpu("H100-80GB"))
    assert [s.layers for s in plan.stages] == [17, 21, 21, 21]
    assert plan.stages[0].decoder < plan.stages[1].decoder


def test_engines_beyond_the_colocated_gpus_are_a_placement_problem() -> None:
    from lmmrl_megatron.config.validate import run_config_problems

    problems = run_config_problems(config_72b("rollout.num_engines=5"))
    assert any("engine devices do not fit on the 32 policy ranks" in p for p in problems), problems


@pytest.mark.parametrize("name", ["qwen2_5_vl_72b", "qwen2_vl_72b"])
def test_parameter_counts_match_the_meta_device_build(name: str) -> None:
    from lmmrl_megatron.parallel.layout import ShardLayout
    from lmmrl_megatron.plan.meta import meta_stage_counts
    from lmmrl_megatron.plan.params import stage_params

    qwen = QwenVLConfig.from_hf_dir(MODELS / name)
    layout = ShardLayout(tp=8, pp=4, num_layers_in_first_pipeline_stage=18, num_layers_in_last_pipeline_stage=22)
    built = meta_stage_counts(qwen, layout)
    planned = stage_params(qwen, layout)
    assert [(s.total, s.vision) for s in planned] == [(c["total"], c["vision"]) for c in built]
    assert sum(s.total for s in stage_params(qwen, ShardLayout())) > 72e9


def test_the_3b_config_counts_as_built_and_as_transformers_counts_it() -> None:
    from lmmrl_megatron.parallel.layout import ShardLayout
    from lmmrl_megatron.plan.meta import meta_stage_counts
    from lmmrl_megatron.plan.params import stage_params

    qwen = QwenVLConfig.from_hf_dir(MODELS / "qwen2_5_vl_3b")
    layout = ShardLayout(tp=2, pp=2)
    assert [(s.total, s.vision) for s in stage_params(qwen, layout)] == [
        (c["total"], c["vision"]) for c in meta_stage_counts(qwen, layout)
    ]
    # transformers' Qwen2_5_VLForConditionalGeneration at these shapes: 3.755 B (bench/model_step.py on the H200),
    # the tied output layer counted once
    whole = stage_params(qwen, ShardLayout())[0]
    assert abs(whole.total - 3.755e9) < 1e6 and abs(whole.vision - 0.669e9) < 1e6


def test_run_rloo_72b_dry_run_prints_the_plan_and_exits_0_when_it_fits() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MODEL", None)  # the dry run needs no checkpoint: configs/models/qwen2_5_vl_72b's config.json
    done = subprocess.run(["bash", str(REPO / "scripts" / "run_rloo_72b.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 4 x 8 H100-80GB" in done.stdout and "VERDICT: fits" in done.stdout and "peak" in done.stdout


@pytest.mark.parametrize("overrides, status, needle", [
    ([], 0, "VERDICT: fits"),
    (["model.recompute=selective"], 1, "VERDICT: does not fit"),
    (["parallel.vpp=3"], 2, "the layout is invalid"),
])
def test_lmmrl_plan_exit_status_follows_the_verdict(overrides, status, needle, capsys) -> None:
    from lmmrl_megatron.cli.plan import main

    args = ["--config", str(REPO / "configs" / "rloo_qwen2_5_vl_72b.yaml"), f"model.pretrain={MODELS / 'qwen2_5_vl_72b'}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args + overrides)
    assert exit_info.value.code == status
    assert needle in capsys.readouterr().out
