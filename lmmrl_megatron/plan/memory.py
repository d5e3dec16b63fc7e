"""The memory model: bytes on one GPU of each pipeline stage, per phase of a step, term by term.

Phases, in the order a colocated step runs them (`trainer/controller.py`):
    generate  the engines sample; the policy holds only its weights (grads and optimizer state offloaded to the
              host by `MegatronLearner.offload`, reference weights stay); vLLM holds gpu_memory_utilization x GPU
    logprob   engines asleep (level 2: weights and KV cache freed), the policy onloaded: forward only
    train     forward + backward + Adam step, micro-batches of max_tokens_per_micro_batch tokens
    sync      the policy offloaded again, the engines' weights woken (KV cache not yet), export buckets in flight
Not colocated (or sleep off) nothing is swapped: every phase holds the training state, and the engines' GPUs are
planned on their own (`engine_memory`).

Terms (bytes per parameter of this rank; `params.py` counts the parameters):
    weights      2 (bf16) or 4 (fp32), every role on the GPU (actor, reference when kl_coef > 0, critic for GAE)
    grads        4 per trainable parameter: Megatron DDP's fp32 main-grad buffer (grad_reduce_in_fp32)
    optimizer    12 (bf16: fp32 master + Adam m, v) or 8 (fp32: m, v), divided by DP with the distributed optimizer
    activations  saved for backward per micro-batch, per decoder layer and token (none / selective: our attention
                 is SDPA, so selective recompute of core_attn saves nothing less), bf16 unless noted, as autograd's
                 saved-tensor hooks count them on our layer (`tests/plan` checks this on a tiny model):
                   each RMSNorm: fp32 input, bf16 cast, bf16 scaled output (8h; x2 norms)
                   M-RoPE cos/sin of q and k (8d), the fused QKV output 2(H+2K)d (v is a view of it), rotated
                   q and k 2(H+K)d, attention output 2Hd, its log-sum-exp fp32 4H
                   SwiGLU: fc1 output 4F, three F-wide products 6F
                 (h-terms / TP under sequence parallelism, d-terms per token, the rest / TP); the final norm 8h on
                 the last stage; full recompute keeps the 2h layer input per layer plus one layer's worth; 1F1B
                 keeps (pp - stage) micro-batches in flight on a stage
    logits       the log-prob pass over this rank's vocabulary slice (`parallel/vocab_parallel.py`): the bf16 logits
                 (2 bytes per token and vocabulary column) in forward, the logits and their bf16 gradient (4) in
                 backward, plus LOGITS_PIECES for the fp32 temporaries of the eager kernels (row pieces of at most
                 2**25 elements; nothing when compiled). `bench/logprob_memory.py` (CPU, eager, 256 and 1024 x
                 151936) fits 2.0 bytes + 0.54 GB forward and 3.3 bytes + 0.87 GB backward; an fp32 working copy
                 gave 10 / 10 before, and 25 / 31 the implementation before that
    adam temp    4 per trainable parameter / DP: torch's foreach Adam's sqrt(v) temporaries at the step
    buckets      buckets in flight (2 with cuda_ipc) x weight_sync_bucket_mb (or the largest parameter when larger:
                 the export packs whole parameters), at most the whole model; under TP > 1 also the gathered
                 shards and converted copy of the largest parameter (2 x its full size)
    vllm         gpu_memory_utilization x GPU while generating; asleep: its CUDA graph pool and allocator slack;
                 woken for the sync: its weight shard (params / engine_tp, bf16)
    cuda graphs  with model.cuda_graphs, on stage 0 (`models/decoder_graphs.py`): each of up to CUDA_GRAPHS_MAX
                 graphs keeps a gradient buffer per decoder parameter (the weights' dtype), and the graphs' pool
                 keeps one micro-batch's activations for good (in the train phase those are the activations term)
    cuda context per process on the GPU (trainer, and the colocated engine), outside PyTorch's allocator
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmmrl_megatron.convert.mapping import padded_vocab_size
from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig, kv_replication
from lmmrl_megatron.plan.gpus import GPU, GiB
from lmmrl_megatron.plan.params import StageParams

if TYPE_CHECKING:  # read by its fields: config/validate.py calls into plan/, so plan/ imports no config
    from lmmrl_megatron.config.schema import RunConfig

PHASES = ("generate", "logprob", "train", "sync")
CUDA_CONTEXT = int(0.75 * GiB)
VLLM_ASLEEP = int(1.0 * GiB)
VLLM_RESERVE = int(2.5 * GiB)  # vLLM's profiled activation peak and non-torch memory inside its budget
LOGITS_FWD_BYTES, LOGITS_BWD_BYTES = 2, 4
LOGITS_PIECES = int(1.0 * GiB)
# Terms PyTorch's caching allocator of the trainer process holds (torch.cuda.max_memory_allocated sees these).
ALLOCATOR_TERMS = ("weights", "grads", "optimizer", "activations", "logits", "adam temp", "buckets", "cuda graphs")
CUDA_GRAPHS_MAX = 4  # DecoderGraphs.attach's max_graphs (tests/plan checks the two agree)


@dataclass
class PhaseMemory:
    phase: str
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def allocated(self) -> int:
        """What the trainer's allocator holds: the figure `bench/plan_check.py` measures."""
        return sum(v for k, v in self.terms.items() if k in ALLOCATOR_TERMS)


@dataclass(frozen=True)
class Roles:
    reference: bool
    critic: bool

    @staticmethod
    def of(config: RunConfig) -> "Roles":
        return Roles(reference=config.algorithm.needs_reference, critic=config.algorithm.needs_critic)


def data_parallel_size(config: RunConfig) -> int:
    return config.parallel.layout.data_parallel_size(config.trainer.actor_world_size)


def swaps(config: RunConfig) -> bool:
    """The colocated swap of `trainer/controller.py`: the policy offloads while the engines generate."""
    return config.trainer.colocate_all_models and config.rollout.enable_sleep


def _weight_bytes(config: RunConfig) -> int:
    return 4 if config.model.dtype == "fp32" else 2


def _static(config: RunConfig, stage: StageParams, roles: Roles) -> dict[str, int]:
    """Weights of every role, grads and optimizer state of the trained ones."""
    fp32 = config.model.dtype == "fp32"
    trainable = stage.trainable(config.model.freeze_vision)
    # The critic's value head (hidden -> 1) replaces the output layer: about the actor's size less the vocabulary.
    critic = stage.total - stage.output if roles.critic else 0
    trained = trainable + (critic if roles.critic else 0)
    shards = data_parallel_size(config) if config.trainer.actor.use_distributed_optimizer else 1
    return {
        "weights": _weight_bytes(config) * (stage.total * (1 + roles.reference) + critic),
        "grads": 4 * trained,
        "optimizer": (8 if fp32 else 12) * trained // shards,
    }


def activation_bytes_per_token(qwen: QwenVLConfig, config: RunConfig) -> tuple[float, float]:
    """(bytes saved per token per decoder layer, bytes of the full-recompute checkpoint per token per layer)."""
    text, tp = qwen.text, config.parallel.tp
    h, d, f, heads = text.hidden_size, text.head_dim, text.intermediate_size, text.num_attention_heads
    kv = text.num_key_value_heads * kv_replication(text.num_key_value_heads, tp)
    sp = tp if config.parallel.sequence_parallel else 1
    # What the fused decoder layer (models/qwen_vl/fused.py) saves, bf16: the inputs of its two RMSNorms and of
    # the qkv and fc1 linears (8h); the qkv output (v is a view of it), the rotated q and k, the attention output
    # (o_proj's input is a view of it) and its fp32 log-sum-exp; SwiGLU's input (2f wide) and fc2's input.
    attention = 2 * (heads + 2 * kv) * d + 2 * (heads + kv) * d + 2 * heads * d + 4 * heads
    layer = 8 * h / sp + (attention + 6 * f) / tp
    return layer, 2 * h / sp


def train_activations(qwen: QwenVLConfig, config: RunConfig, stage: StageParams) -> tuple[int, int]:
    """(activations saved by the forward passes in flight on this stage, the one layer a full recompute rebuilds
    during backward)."""
    tokens = config.trainer.max_tokens_per_micro_batch
    layer, checkpoint = activation_bytes_per_token(qwen, config)
    full = config.model.recompute == "full"
    # Once per stage, not per layer: the rotary cos/sin tables (fp32, computed once per forward and shared).
    per_micro_batch = stage.layers * (checkpoint if full else layer) + 8 * qwen.text.head_dim
    if stage.stage == config.parallel.pp - 1:  # the inputs of the final norm and of the output layer
        per_micro_batch += 4 * qwen.text.hidden_size / (config.parallel.tp if config.parallel.sequence_parallel else 1)
    in_flight = config.parallel.pp - stage.stage
    return int(tokens * per_micro_batch * in_flight), int(tokens * layer) if full else 0


def cuda_graph_bytes(qwen: QwenVLConfig, config: RunConfig, stage: StageParams) -> tuple[int, int]:
    """(the graphs' gradient buffers, the pool's activations of one micro-batch) on this stage; 0 without graphs."""
    if not config.model.cuda_graphs or stage.stage != 0:
        return 0, 0
    layer, _ = activation_bytes_per_token(qwen, config)
    return (CUDA_GRAPHS_MAX * _weight_bytes(config) * stage.decoder,
            int(config.trainer.max_tokens_per_micro_batch * layer * stage.layers))


def _logits(qwen: QwenVLConfig, config: RunConfig, per_column: int) -> int:
    vocab = padded_vocab_size(qwen.text.vocab_size, config.parallel.tp) // config.parallel.tp
    return per_column * config.trainer.max_tokens_per_micro_batch * vocab + LOGITS_PIECES


def _buckets(config: RunConfig, stage: StageParams, total_params: int) -> int:
    """Buckets alive at once: each up to weight_sync_bucket_mb, or one parameter when it is larger (the export packs
    whole parameters), never more than the whole model; under TP the gathered shards and their conversion."""
    from lmmrl_megatron.rollout.transport import choose_transport

    rollout = config.rollout
    use_gpu = config.trainer.num_gpus_per_node > 0
    transport = choose_transport(rollout.weight_transport, use_gpu, config.trainer.colocate_all_models)
    in_flight = 2 if transport == "cuda_ipc" else 1
    weight_bytes = 4 if config.model.dtype == "fp32" else 2
    bucket = max(rollout.weight_sync_bucket_mb * 2**20, weight_bytes * stage.largest)
    gather = 2 * weight_bytes * stage.largest if config.parallel.tp > 1 else 0
    return min(in_flight * bucket, weight_bytes * total_params) + gather


def vllm_weight_bytes(total_params: int, config: RunConfig) -> int:
    return 2 * total_params // config.rollout.engine_tp


def stage_memory(
    qwen: QwenVLConfig, config: RunConfig, stage: StageParams, gpu: GPU, total_params: int
) -> list[PhaseMemory]:
    """The four phases on one GPU of this pipeline stage (`total_params`: the whole model, for vLLM's shard)."""
    roles = Roles.of(config)
    static = _static(config, stage, roles)
    swap = swaps(config)
    colocated = config.trainer.colocate_all_models and config.trainer.num_gpus_per_node > 0
    last = stage.stage == config.parallel.pp - 1
    weights_only = {"weights": static["weights"]} if swap else dict(static)
    vllm_generate = int(config.rollout.gpu_memory_utilization * gpu.memory_bytes) if colocated else 0
    vllm_asleep = (VLLM_ASLEEP if swap else vllm_generate) if colocated else 0
    context = CUDA_CONTEXT * (2 if colocated else 1)
    trained = stage.trainable(config.model.freeze_vision) + (stage.total - stage.output if roles.critic else 0)
    shards = data_parallel_size(config) if config.trainer.actor.use_distributed_optimizer else 1

    # Backward peaks at the loss (the logits' gradient) or, under full recompute, at a rebuilt layer, whichever
    # is larger; the optimizer step comes after every activation is freed.
    saved, rebuilt = train_activations(qwen, config, stage)
    logits = _logits(qwen, config, LOGITS_BWD_BYTES) if last else 0
    backward = {"activations": saved + (rebuilt if rebuilt > logits else 0), "logits": logits if logits >= rebuilt else 0}
    adam_temp = 4 * trained // shards
    train = dict(static) | (backward if sum(backward.values()) >= adam_temp else {"adam temp": adam_temp})
    logprob = dict(static) | ({"logits": _logits(qwen, config, LOGITS_FWD_BYTES)} if last else {})
    sync = dict(weights_only) | {"buckets": _buckets(config, stage, total_params)}
    if colocated:
        sync["vllm"] = vllm_weight_bytes(total_params, config) if swap else vllm_generate
    phases = [
        PhaseMemory("generate", dict(weights_only) | ({"vllm": vllm_generate} if colocated else {})),
        PhaseMemory("logprob", logprob | ({"vllm": vllm_asleep} if colocated else {})),
        PhaseMemory("train", train | ({"vllm": vllm_asleep} if colocated else {})),
        PhaseMemory("sync", sync),
    ]
    graph_grads, graph_pool = cuda_graph_bytes(qwen, config, stage)
    for phase in phases:
        if graph_grads:
            phase.terms["cuda graphs"] = graph_grads + (0 if phase.phase == "train" else graph_pool)
        phase.terms["cuda context"] = context
    return phases


@dataclass(frozen=True)
class EngineMemory:
    """One engine GPU: vLLM's budget, its weight shard, and the KV cache left (bytes, and tokens it holds)."""

    budget: int
    weights: int
    kv_cache: int
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_bytes_per_token


def engine_memory(qwen: QwenVLConfig, config: RunConfig, gpu: GPU, total_params: int) -> EngineMemory:
    text, etp = qwen.text, config.rollout.engine_tp
    kv_heads_per_gpu = max(1, text.num_key_value_heads // etp)  # vLLM replicates KV heads below engine TP
    per_token = 2 * text.num_layers * kv_heads_per_gpu * text.head_dim * 2  # K and V, bf16
    budget = int(config.rollout.gpu_memory_utilization * gpu.memory_bytes)
    weights = vllm_weight_bytes(total_params, config)
    return EngineMemory(budget, weights, budget - weights - VLLM_RESERVE, per_token)
