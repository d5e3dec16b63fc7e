"""The Megatron-Core learner: log-probs and PPO updates through Megatron's pipeline schedule.

The learner owns one model (a list of virtual-pipeline chunks on this rank), wrapped in Megatron's
DistributedDataParallel with its (distributed) optimizer when it is trained, bare when it is frozen (reference).
It knows nothing about RL: the controller hands it micro-batches and a loss function.

Loss scaling. The caller's loss function returns the micro-batch's share of the *global* loss (its token or
sequence sum divided by the global normaliser). Megatron's schedule divides each micro-batch loss by the number
of micro-batches and DDP averages gradients over data-parallel ranks; multiplying by both undoes that, so the sum
of gradients over all micro-batches and ranks is exactly the gradient of the global loss, however unevenly the
tokens fall across micro-batches and ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

from lmmrl_megatron.config.sections import OptimizerConfig
from lmmrl_megatron.learner.lr_schedule import set_optimizer_hyperparams
from lmmrl_megatron.learner.micro_batch import MicroBatch
from lmmrl_megatron.learner.swap import DEFAULT_CHUNK_BYTES, HostSwap, SwapStats, optimizer_state_tensors
from lmmrl_megatron.parallel.vocab_parallel import vocab_parallel_log_probs


class ForwardFn(Protocol):
    """Run one model chunk on a micro-batch: logits [B, S, vocab/tp] on the last stage, hidden states elsewhere."""

    def __call__(self, model: torch.nn.Module, micro_batch: MicroBatch) -> Tensor: ...


Head = Literal["logprobs", "values"]


@dataclass
class TokenStats:
    """What a forward pass yields per micro-batch on the last pipeline stage."""

    micro_batch: MicroBatch
    values: Tensor  # [B, S]: log p(labels) at the learner's temperature (policy head), or V(s_t) (value head)
    entropy: Tensor | None  # [B, S] policy entropy (policy head only)


# loss_fn(values, entropy, micro_batch) -> (share of the global loss, metrics to sum over micro-batches);
# values/entropy as in TokenStats, with gradient.
LossFn = Callable[[Tensor, Tensor | None, MicroBatch], tuple[Tensor, dict[str, float]]]


class MegatronLearner:
    def __init__(
        self,
        model_chunks: list[torch.nn.Module],
        forward_fn: ForwardFn,
        num_real_vocab: int,
        optimizer_config: OptimizerConfig | None,
        temperature: float = 1.0,
        bf16: bool = False,
        head: Head = "logprobs",
        excluded_token_ids: tuple[int, ...] = (),
        swap_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        self.forward_fn = forward_fn
        self.head = head
        self.num_real_vocab = num_real_vocab
        self.temperature = temperature
        self.excluded_token_ids = excluded_token_ids
        self.transformer_config = model_chunks[0].config
        self.optimizer = None
        self.optimizer_config = optimizer_config
        if optimizer_config is None:  # frozen (reference): no DDP, no optimizer, no grads
            for chunk in model_chunks:
                chunk.requires_grad_(False)
            self.model = model_chunks
        else:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
            )
            self.model = [
                DistributedDataParallel(self.transformer_config, ddp_config, chunk, disable_bucketing=i > 0)
                for i, chunk in enumerate(model_chunks)
            ]
            # Without this the schedule never reduces gradients across data-parallel ranks.
            self.transformer_config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = self._build_optimizer(optimizer_config, bf16)
        # Pipeline stages exchange activations whose sequence length changes from micro-batch to micro-batch.
        self.transformer_config.variable_seq_lengths = True
        self._offloaded = False
        self._swap: HostSwap | None = None  # built at the first offload, on the weights' device
        self.swap_chunk_bytes = swap_chunk_bytes
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()

    def _build_optimizer(self, cfg: OptimizerConfig, bf16: bool):
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        # The learning rate is set before every step (`train_step(lr=...)`, the schedule of learner/lr_schedule.py).
        mcore_cfg = McoreOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            clip_grad=cfg.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        return get_megatron_optimizer(mcore_cfg, self.model)

    def offload(self) -> SwapStats:
        """Free what only training needs while a colocated role uses the device; `onload` brings it back. The
        gradient buffers are freed without a copy (`train_step` zeroes them first); the optimizer state goes to
        host chunks allocated once (learner/swap.py). The weights stay: log-probs and weight sync use them."""
        if self.optimizer is None or self._offloaded:
            return SwapStats()
        device = next(self.model[0].parameters()).device
        on_gpu = device.type == "cuda"
        if self._swap is None:
            self._swap = HostSwap(device, self.swap_chunk_bytes)
        start = time.perf_counter()
        keep = self._weight_storages()
        for chunk in self.model:
            chunk.offload_grad_buffers(synchronize=on_gpu, empty_cache=False)
        stats = self._swap.offload(optimizer_state_tensors(self.optimizer), keep)
        if on_gpu:  # the freed blocks go back to the driver, for the rollout engine's process
            torch.cuda.empty_cache()
        stats.memory_s = time.perf_counter() - start - stats.copy_s - stats.alloc_s
        self._offloaded = True
        return stats

    def onload(self) -> SwapStats:
        if not self._offloaded:
            return SwapStats()
        on_gpu = next(self.model[0].parameters()).is_cuda
        start = time.perf_counter()
        stats = self._swap.onload()
        for chunk in self.model:
            chunk.restore_grad_buffers(synchronize=on_gpu)
        stats.memory_s = time.perf_counter() - start - stats.copy_s
        self._offloaded = False
        return stats

    @property
    def host_swap(self) -> HostSwap | None:
        """The host side of the colocated swap (None before the first offload)."""
        return self._swap

    def _weight_storages(self) -> set[int]:
        """The storages the swap must leave in place: the weights (an fp32 optimizer steps the model's own
        parameters, or views of them) and the gradient buffers (freed by DDP, not copied)."""
        keep = {p.untyped_storage().data_ptr() for chunk in self.model for p in chunk.parameters()}
        for chunk in self.model:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                if buffer.grad_data is not None:
                    keep.add(buffer.grad_data.untyped_storage().data_ptr())
        return keep

    def _token_stats(self, output: Tensor, micro_batch: MicroBatch) -> tuple[Tensor, Tensor | None]:
        if self.head == "values":
            return output.squeeze(-1).float(), None
        return vocab_parallel_log_probs(
            output, micro_batch.labels, self.num_real_vocab, self.tp_group, self.temperature,
            self.excluded_token_ids, with_entropy=True,
        )

    def _run(self, micro_batches: list[MicroBatch], loss_fn: LossFn | None, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        num_micro_batches = len(micro_batches)

        def forward_step(data_iterator, model):
            micro_batch = next(data_iterator)
            output = self.forward_fn(model, micro_batch)

            def loss_func(logits: Tensor):
                values, entropy = self._token_stats(logits, micro_batch)
                if loss_fn is None:
                    stats = TokenStats(micro_batch, values.detach(), None if entropy is None else entropy.detach())
                    return logits.new_zeros(()), {"stats": stats}
                loss, metrics = loss_fn(values, entropy, micro_batch)
                return loss * num_micro_batches * self.dp_size, {"metrics": metrics}

            return output, loss_func

        chunks = len(self.model)
        iterators = [iter(micro_batches) for _ in range(chunks)] if chunks > 1 else iter(micro_batches)
        seq_length = max(mb.input_ids.shape[1] for mb in micro_batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model,
            num_microbatches=num_micro_batches,
            seq_length=seq_length,
            micro_batch_size=max(mb.num_rows for mb in micro_batches),
            forward_only=forward_only,
        )

    @torch.no_grad()
    def forward_only(self, micro_batches: list[MicroBatch]) -> list[TokenStats]:
        """Per-token outputs of every micro-batch (see TokenStats); non-empty on the last pipeline stage only."""
        for chunk in self.model:
            chunk.eval()
        outputs = self._run(micro_batches, loss_fn=None, forward_only=True)
        return [out["stats"] for out in outputs] if self.is_last_stage else []

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, lr: float | None = None) -> dict[str, float]:
        """One optimizer step over all micro-batches at learning rate `lr` (None: the configured `lr`); returns
        summed loss metrics (last stage) and grad_norm."""
        assert self.optimizer is not None and self.optimizer_config is not None, "train_step on a frozen learner"
        assert not self._offloaded, "onload() the learner before train_step()"
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        cfg = self.optimizer_config
        set_optimizer_hyperparams(self.optimizer, cfg.lr if lr is None else lr, cfg.weight_decay)
        outputs = self._run(micro_batches, loss_fn=loss_fn, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        metrics: dict[str, float] = {}
        for out in outputs if self.is_last_stage else []:
            for key, value in out["metrics"].items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = 0.0 if update_ok else 1.0
        return metrics
