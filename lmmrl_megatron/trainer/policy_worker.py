"""One rank of the Megatron model group: the trained actor and, colocated with it, the frozen reference and the
critic (PPO with GAE) when the algorithm needs them.

The controller creates `world_size` of these as Ray actors. Each joins one torch.distributed world (NCCL on
GPUs, gloo on CPU), builds its pipeline stage of the model at the configured TP x PP layout, loads the
Hugging Face weights through the shared mapping, and then serves the controller's requests; it knows the model only
through its family (`models/registry.py`: build, forward, export mapping). Every request carries a whole
`RolloutBatch` (one Ray object, not copied per rank); each rank takes its data-parallel share.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import torch

from lmmrl_megatron.algorithms import AlgorithmConfig, PolicyLossInputs, metrics_to_dict, policy_loss, value_loss
from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.learner.megatron_learner import MegatronLearner
from lmmrl_megatron.learner.micro_batch import MicroBatch, collate, response_values, split_by_token_budget
from lmmrl_megatron.learner.rollout_batch import RolloutBatch, RowValues

Role = Literal["actor", "reference", "critic"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def make_policy_loss(config: AlgorithmConfig, normaliser: float, kl_coef: float):
    """The learner's loss function for one optimizer step: this micro-batch's share of the global policy loss."""

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = PolicyLossInputs(
            log_probs=logprobs,
            old_log_probs=mb.old_logprobs,
            advantages=mb.advantages,
            mask=mb.loss_mask,
            rollout_log_probs=mb.rollout_logprobs,
            ref_log_probs=mb.ref_logprobs,
            entropy=entropy,
        )
        loss, metrics = policy_loss(inputs, config, normaliser, kl_coef)
        return loss, metrics_to_dict(metrics, "policy")

    return loss_fn


def make_value_loss(config: AlgorithmConfig, normaliser: float):
    """The critic's loss function: clipped value regression onto the returns, this micro-batch's share."""

    def loss_fn(values: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = value_loss(
            values, mb.old_values, mb.returns, mb.loss_mask, config.value_clip, config.loss_agg_mode, normaliser
        )
        return loss, metrics_to_dict(metrics, "critic")

    return loss_fn


def _family_of(pretrain: str):
    from lmmrl_megatron.models.registry import family_of_hf_dir

    if not pretrain:
        raise ValueError("model.pretrain must name a Hugging Face checkpoint directory")
    return family_of_hf_dir(Path(pretrain))


def optimizer_step_count(optimizer) -> float:
    """Adam's step count as its state holds it (the largest over this rank's parameters; 0 before the first
    step). Logged every step, so a resumed run whose restored counters drift from the uninterrupted one shows it."""
    steps = [
        float(state["step"])
        for chained in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in chained.optimizer.state.values()
        if "step" in state
    ]
    return max(steps, default=0.0)


class PolicyWorker:
    def __init__(self, config: RunConfig, rank: int, world_size: int, with_reference: bool, with_critic: bool) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.with_reference = with_reference
        self.with_critic = with_critic
        self.use_gpu = config.trainer.num_gpus_per_node > 0
        self.device = torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")  # Ray shows one GPU
        self.learners: dict[Role, MegatronLearner] = {}
        self.actor_chunks: list[torch.nn.Module] = []
        self.weight_sender = None  # the weight-sync transport's sender (trainer/weight_sync.py), made at the first sync

    # -- setup --------------------------------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process-group rendezvous: this node's address as Ray knows it (a
        hostname lookup can fail on cluster nodes), loopback on CPU runs, which are always one machine."""
        import ray

        return ray.util.get_node_ip_address() if self.use_gpu else "127.0.0.1", free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, int]:
        from megatron.core import parallel_state as ps

        from lmmrl_megatron.parallel.megatron_state import init_megatron_parallel

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        if self.use_gpu:
            torch.cuda.set_device(0)  # Ray gives each worker one visible GPU
            backend = "nccl"
        else:
            from lmmrl_megatron.parallel.cpu_backend import install_cpu_backend

            install_cpu_backend()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
            backend = "gloo"
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        parallel = self.config.parallel
        init_megatron_parallel(parallel.layout, self.config.trainer.seed)

        temperature = self.config.rollout.temperature or 1.0
        bf16 = self.config.model.dtype == "bf16"
        self.family = _family_of(self.config.model.pretrain)
        self.actor_chunks = self._build_model()
        # The rollout engines never sample vision placeholders; the log-probs are those of what they sample.
        never_sampled = self.never_sampled_token_ids
        forward = self.family.forward
        self.learners["actor"] = MegatronLearner(
            self.actor_chunks, forward, self.num_real_vocab, self.config.trainer.actor, temperature, bf16,
            excluded_token_ids=never_sampled,
        )
        if self.with_reference:
            self.learners["reference"] = MegatronLearner(
                self._build_model(), forward, self.num_real_vocab, None, temperature, bf16,
                excluded_token_ids=never_sampled,
            )
        if self.with_critic:
            critic_chunks = self._build_model()
            for chunk in critic_chunks:
                self.family.attach_value_head(chunk)
            self.learners["critic"] = MegatronLearner(
                critic_chunks, forward, self.num_real_vocab, self.config.trainer.critic, bf16=bf16, head="values"
            )
        return {"dp": ps.get_data_parallel_world_size(), "tp": parallel.tp, "pp": parallel.pp}

    def _build_model(self) -> list[torch.nn.Module]:
        chunks, model_config = self.family.build_policy_chunks(self.config.model, self.config.parallel, self.use_gpu)
        self.num_real_vocab = self.family.vocab_size(model_config)
        self.never_sampled_token_ids = self.family.never_sampled_token_ids(model_config)
        self.shards_to_hf = self.family.shards_to_hf(model_config, self.config.model.transformer_impl)
        return chunks

    # -- requests -------------------------------------------------------------------------------------------------
    def _my_micro_batches(self, batch: RolloutBatch) -> list[MicroBatch]:
        from megatron.core import parallel_state as ps

        mine = batch.shard(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        num_tokens = batch.num_tokens()
        groups = split_by_token_budget([num_tokens[i] for i in mine], self.config.trainer.max_tokens_per_micro_batch)
        return [collate(batch, [mine[j] for j in group]).to(self.device) for group in groups]

    def forward(self, batch: RolloutBatch, role: Role) -> RowValues | None:
        """Per response token of this rank's rows: log-probs and entropy for actor/reference, values for the
        critic; answered by the last-stage, TP-rank-0 member of each data-parallel group, None by the others."""
        from megatron.core import parallel_state as ps

        if role not in self.learners:
            raise ValueError(f"this worker holds no {role} model")
        stats = self.learners[role].forward_only(self._my_micro_batches(batch))
        if ps.get_tensor_model_parallel_rank() != 0 or not stats:
            return None
        return RowValues(
            rows=torch.cat([st.micro_batch.sample_index.cpu() for st in stats]),
            values=torch.cat([response_values(st.micro_batch, st.values, batch) for st in stats]),
            entropy=None if stats[0].entropy is None else torch.cat(
                [response_values(st.micro_batch, st.entropy, batch) for st in stats]
            ),
        )

    def train_actor(self, batch: RolloutBatch, normaliser: float, kl_coef: float, lr: float) -> dict[str, float]:
        """One actor optimizer step on this mini-batch at learning rate `lr`."""
        loss_fn = make_policy_loss(self.config.algorithm, normaliser, kl_coef)
        return self._train("actor", batch, loss_fn, lr)

    def train_critic(self, batch: RolloutBatch, normaliser: float, lr: float) -> dict[str, float]:
        """One critic optimizer step on this mini-batch at learning rate `lr`."""
        return self._train("critic", batch, make_value_loss(self.config.algorithm, normaliser), lr)

    def _train(self, role: Role, batch: RolloutBatch, loss_fn, lr: float) -> dict[str, float]:
        """Metrics come back from the last-stage, TP-rank-0 member of the first data-parallel group."""
        from megatron.core import parallel_state as ps

        metrics = self.learners[role].train_step(self._my_micro_batches(batch), loss_fn, lr)
        metrics["optimizer_step"] = optimizer_step_count(self.learners[role].optimizer)
        if role == "critic":
            metrics = {("critic/" + k if not k.startswith("critic/") else k): v for k, v in metrics.items()}
        # Loss metrics are shares of global means: summing them over data-parallel ranks gives the step's value.
        keys = sorted(k for k in metrics if k.startswith(("policy/", "critic/")) and k not in ("critic/grad_norm", "critic/update_skipped"))
        if keys:
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
            torch.distributed.all_reduce(values, group=ps.get_data_parallel_group())
            metrics.update(zip(keys, values.tolist()))
        is_reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        return metrics if is_reporter else {}

    def offload(self) -> dict[str, float]:
        """Free the trained roles' gradient buffers and optimizer state for a colocated rollout engine; the bytes
        copied to the host and the seconds it took on this rank."""
        return self._swap_stats([learner.offload() for learner in self.learners.values()])

    def onload(self) -> dict[str, float]:
        return self._swap_stats([learner.onload() for learner in self.learners.values()])

    @staticmethod
    def _swap_stats(parts: list) -> dict[str, float]:
        from lmmrl_megatron.learner.swap import SwapStats

        total = sum(parts, SwapStats())
        return {"bytes": float(total.bytes), "seconds": total.seconds}

    def push_weights(self, engines: list[Any]) -> dict[str, float]:
        """Send the actor's weights, in Hugging Face names and layout, to every rollout engine, bucket by bucket,
        through the configured transport (`trainer/weight_sync.py`); every rank takes part."""
        from lmmrl_megatron.rollout.transport import choose_transport
        from lmmrl_megatron.trainer.weight_sync import BroadcastSender, CudaIpcSender, ObjectStoreSender

        rollout = self.config.rollout
        if self.weight_sender is None:  # kept for the run: its plan, buffers and groups are made at the first sync
            transport = choose_transport(rollout.weight_transport, self.use_gpu, self.config.trainer.colocate_all_models)
            senders = {"broadcast": lambda: BroadcastSender(rollout.engine_tp), "cuda_ipc": CudaIpcSender,
                       "object_store": ObjectStoreSender}
            self.weight_sender = senders[transport]()
        return self.weight_sender.sync(self.actor_chunks, self.shards_to_hf, engines, rollout.weight_sync_bucket_mb * 2**20)

    def save_hf(self, directory: str) -> None:
        """Write the actor as a Hugging Face checkpoint (sharded safetensors + the pretrained model's config,
        tokenizer, processor and chat template), streamed bucket by bucket through the weight export."""
        from megatron.core import parallel_state as ps

        from lmmrl_megatron.convert.export import export_hf_weights
        from lmmrl_megatron.convert.hf_io import HFCheckpointReader, TensorSpec, write_hf_checkpoint

        if ps.get_data_parallel_rank() != 0:
            return
        bucket_bytes = self.config.rollout.weight_sync_bucket_mb * 2**20
        buckets = export_hf_weights(self.actor_chunks, self.shards_to_hf, bucket_bytes, receivers="first_rank")
        if torch.distributed.get_rank() != 0:
            for _ in buckets:  # take part in the gathers; only the first rank receives
                pass
            return
        dtype = next(self.actor_chunks[0].parameters()).dtype
        pretrain = self.config.model.pretrain
        with HFCheckpointReader(pretrain, check_config_shapes=False) as reader:
            specs = [TensorSpec(name, reader.spec(name).shape, dtype) for name in reader.names]
        tensors = ((name, tensor) for bucket in buckets for name, tensor in bucket)
        write_hf_checkpoint(directory, specs, tensors, template_dir=pretrain)

    def pid(self) -> int:
        """This rank's process id (the controller's fault injection, LMMRL_FAULT, kills it by it)."""
        return os.getpid()

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        from lmmrl_megatron.trainer.train_state import save_train_state

        save_train_state(Path(directory), self.learners)

    def load_checkpoint(self, directory: str) -> None:
        from lmmrl_megatron.trainer.train_state import load_train_state

        load_train_state(Path(directory), self.learners)

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
