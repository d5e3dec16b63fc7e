"""Live weight export for rollout engines: Hugging Face tensors out of a model sharded over TP x PP, in buckets.

    for bucket in export_hf_weights(model_chunks, shards_to_hf, bucket_bytes=512 << 20):
        engine.update_weights(bucket)          # [(hf_name, tensor), ...]; valid until the next bucket

Every rank of one model replica (all its TP x PP ranks) must drive the generator to the end, because each bucket
is made by collectives: the stage that holds a bucket's parameters all-gathers each parameter's TP shards over its
TP group, turns them into Hugging Face tensors with the mapping (unpadded vocabulary, split qkv and gate/up, a tied
embedding exported once) and packs them into one flat buffer, which is then brought to the receiving ranks over the
PP group. With `receivers="all_ranks"` every rank gets every bucket (broadcast; for engines colocated with every
trainer rank); with `receivers="first_rank"` only the replica's first rank (PP stage 0, TP rank 0) does (point to
point from each stage's TP rank 0), the others get nothing yielded but still take part.

Memory: one bucket buffer per rank, plus one parameter's gathered shards and its Hugging Face tensors while that
parameter is being packed. A parameter whose Hugging Face tensors alone exceed `bucket_bytes` gets a bucket to
itself (of its own size). Buckets hold parameters of one stage only.

No values are cached between calls: every export reads the parameters as they are now, so a second export after
another optimizer step sends the new values. What may be kept is the plan (`plan_export`: names, shapes, byte
offsets), which the weight sync computes once, and the bucket buffers (`buffer_for`), which it reuses so the
engines open each buffer once. Call it after the optimizer has finished writing the parameters
(with Megatron's overlapped parameter all-gather, force it first: `chunk.start_param_sync(force_sync=True)`).

`save_hf_checkpoint` uses the same export to write a live model as a Hugging Face checkpoint (the trainer's
`save_hf`), without going through a Megatron checkpoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol, Sequence

import torch

from lmmrl_megatron.convert.hf_io import DEFAULT_MAX_SHARD_BYTES, TensorSpec, write_hf_checkpoint
from lmmrl_megatron.convert.mapping import pad_to_multiple
from lmmrl_megatron.convert.param_names import global_param_names

Receivers = Literal["all_ranks", "first_rank"]
_MAX_PENDING_COPIES = 128  # tensors per multi-tensor copy: bounds the mapping's temporaries kept alive meanwhile
_ALIGN_BYTES = 16  # every tensor starts at a multiple of this in a bucket, so any dtype can view its bytes

HFTensors = list[tuple[str, torch.Tensor]]


class ShardsToHF(Protocol):
    """Turns one Megatron parameter into Hugging Face tensors (the one mapping provides this).

    `global_name` is the parameter's whole-model name (layer indices global, not stage-local); `tp_shards` holds
    one tensor per TP rank in rank order for a tensor-parallel parameter, and a single tensor for a replicated one.
    It returns [] for a parameter with no Hugging Face counterpart of its own (the last stage's copy of a tied
    embedding). It must be pure tensor code: it is also called on meta tensors to learn names and shapes.
    """

    def __call__(self, global_name: str, tp_shards: Sequence[torch.Tensor]) -> HFTensors: ...


@dataclass(frozen=True)
class ParamExport:
    """One parameter of one pipeline stage and the Hugging Face tensors it becomes."""

    stage: int
    chunk: int  # virtual pipeline chunk on that stage
    local_name: str
    global_name: str
    hf_specs: tuple[TensorSpec, ...]

    @property
    def num_bytes(self) -> int:
        return sum(pad_to_multiple(spec.num_bytes, _ALIGN_BYTES) for spec in self.hf_specs)


@dataclass(frozen=True)
class BucketPlan:
    """The parameters (all of one stage) packed into one bucket, in order."""

    stage: int
    params: tuple[ParamExport, ...]
    # global name -> (the parameter's data pointer, the mapping's outputs), for parameters whose outputs are all
    # views of the parameter itself (see `_hf_tensors`); filled by the first export that uses this plan
    view_cache: dict[str, tuple[int, HFTensors]] = field(default_factory=dict, compare=False, repr=False)
    # a kept buffer's data pointer -> this bucket's views of it (`views_in`)
    buffer_views: dict[int, HFTensors] = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def num_bytes(self) -> int:
        return sum(p.num_bytes for p in self.params)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of each Hugging Face tensor in the bucket, in order (computed once: syncs reuse the plan)."""
        offsets, offset = [], 0
        for param in self.params:
            for spec in param.hf_specs:
                offsets.append(offset)
                offset += pad_to_multiple(spec.num_bytes, _ALIGN_BYTES)
        return tuple(offsets)


    def views_in(self, buffer: torch.Tensor) -> HFTensors:
        """The bucket's views of a buffer the caller keeps across exports (`buffer_for`), made once per buffer. The
        kept views hold that buffer's storage alive, so another buffer cannot take its address."""
        views = self.buffer_views.get(buffer.data_ptr())
        if views is None:
            views = self.buffer_views[buffer.data_ptr()] = _views(buffer, self)
        return views


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers, which hold the model as `.module`."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def _tp_split_dim(param: torch.nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _meta_shards(param: torch.nn.Parameter, tp_size: int) -> list[torch.Tensor]:
    count = tp_size if _tp_split_dim(param) is not None else 1
    return [torch.empty(param.shape, dtype=param.dtype, device="meta") for _ in range(count)]


def local_param_exports(
    model_chunks: Sequence[torch.nn.Module], shards_to_hf: ShardsToHF, stage: int, tp_size: int
) -> list[ParamExport]:
    """What this stage exports, learned by running the mapping on meta tensors (no values touched)."""
    exports = []
    for chunk_index, chunk in enumerate(model_chunks):
        module = _unwrap(chunk)
        names = global_param_names(module)
        for local_name, param in module.named_parameters():
            hf = shards_to_hf(names[local_name], _meta_shards(param, tp_size))
            if not hf:
                continue
            specs = tuple(TensorSpec(name, tuple(t.shape), t.dtype) for name, t in hf)
            exports.append(ParamExport(stage, chunk_index, local_name, names[local_name], specs))
    return exports


def plan_buckets(params_by_stage: Sequence[Sequence[ParamExport]], bucket_bytes: int) -> list[BucketPlan]:
    """Pack parameters, stage by stage and in order, into buckets of at most `bucket_bytes` (or one parameter)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets = []
    for stage, params in enumerate(params_by_stage):
        current: list[ParamExport] = []
        current_bytes = 0
        for param in params:
            if current and current_bytes + param.num_bytes > bucket_bytes:
                buckets.append(BucketPlan(stage, tuple(current)))
                current, current_bytes = [], 0
            current.append(param)
            current_bytes += param.num_bytes
        if current:
            buckets.append(BucketPlan(stage, tuple(current)))
    return buckets


def _check_unique_names(buckets: Sequence[BucketPlan]) -> None:
    seen: dict[str, str] = {}
    for bucket in buckets:
        for param in bucket.params:
            for spec in param.hf_specs:
                if spec.name in seen:
                    raise AssertionError(f"{spec.name} is exported by both {seen[spec.name]} and {param.global_name}")
                seen[spec.name] = param.global_name


def _views(buffer: torch.Tensor, bucket: BucketPlan) -> HFTensors:
    """The bucket's Hugging Face tensors as views of its flat byte buffer."""
    specs = (spec for param in bucket.params for spec in param.hf_specs)
    return [
        (spec.name, buffer[offset : offset + spec.num_bytes].view(spec.dtype).view(spec.shape))
        for spec, offset in zip(specs, bucket.offsets, strict=True)
    ]


def _gather_tp(param: torch.Tensor, group: torch.distributed.ProcessGroup, tp_size: int) -> list[torch.Tensor]:
    if tp_size == 1:
        return [param.detach()]
    shards = [torch.empty_like(param) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, param.detach().contiguous(), group=group)
    return shards


class _StageView:
    """The parallel layout of this rank as the exporter needs it."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.pp_ranks = torch.distributed.get_process_group_ranks(self.pp_group)


def _fill_bucket(
    views: HFTensors,
    bucket: BucketPlan,
    model_chunks: Sequence[torch.nn.Module],
    shards_to_hf: ShardsToHF,
    view: _StageView,
) -> None:
    """On the owning stage: gather each parameter over TP, map it to HF tensors, copy them into the buffer.

    Without TP the mapping's outputs are views of the parameters (or small temporaries of the qkv / gate-up
    splits), so they are copied by multi-tensor copies of up to 128 tensors instead of a launch per tensor; with TP
    each parameter's gathered shards are copied and dropped before the next one is gathered (one parameter's
    shards alive at a time). A strided output (a slice the mapping did not copy) is copied on its own."""
    params = [dict(_unwrap(chunk).named_parameters()) for chunk in model_chunks]
    targets = iter(views)
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for export in bucket.params:
        hf = _hf_tensors(export, params[export.chunk][export.local_name], shards_to_hf, view, bucket.view_cache)
        for (name, tensor), spec in zip(hf, export.hf_specs, strict=True):
            target_name, target = next(targets)
            same = name == spec.name == target_name and tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype
            assert same, f"the mapping gave {name} {tuple(tensor.shape)} {tensor.dtype} where the plan has {spec}"
            if tensor.is_contiguous():
                dsts.append(target)
                srcs.append(tensor)
            else:  # one strided tensor would send the whole multi-tensor copy down its per-tensor path
                target.copy_(tensor)
        if view.tp_size > 1 or len(dsts) >= _MAX_PENDING_COPIES:
            torch._foreach_copy_(dsts, srcs)
            dsts, srcs = [], []
        del hf  # a gathered parameter goes before the next one is gathered
    if dsts:
        torch._foreach_copy_(dsts, srcs)


def _hf_tensors(
    export: ParamExport, param: torch.nn.Parameter, shards_to_hf: ShardsToHF, view: _StageView,
    cache: dict[str, tuple[int, HFTensors]],
) -> HFTensors:
    """The mapping's Hugging Face tensors of one parameter (gathered over TP first when it is split).

    Most of a model's parameters map to views of themselves (norms, projections, an embedding; gate/up halves),
    and running the mapping again each sync costs host time and nothing else: such outputs are kept and reused
    while the parameter's storage is the same (its data pointer; a kept view holds the old storage alive, so a
    replaced `param.data` cannot reuse its address). Views read the live values, so nothing stale is sent."""
    if _tp_split_dim(param) is not None and view.tp_size > 1:
        return shards_to_hf(export.global_name, _gather_tp(param, view.tp_group, view.tp_size))
    cached = cache.get(export.global_name)
    if cached is not None and cached[0] == param.data_ptr():
        return cached[1]
    hf = shards_to_hf(export.global_name, [param.detach()])
    storage = param.untyped_storage().data_ptr()
    if all(tensor.untyped_storage().data_ptr() == storage for _, tensor in hf):
        cache[export.global_name] = (param.data_ptr(), hf)
    return hf


def plan_export(
    model_chunks: Sequence[torch.nn.Module], shards_to_hf: ShardsToHF, bucket_bytes: int
) -> list[BucketPlan]:
    """The buckets of the whole model, the same on every rank (collective over the PP group; metadata only)."""
    view = _StageView()
    local = local_param_exports(model_chunks, shards_to_hf, view.stage, view.tp_size)
    by_stage: list[list[ParamExport] | None] = [None] * view.pp_size
    torch.distributed.all_gather_object(by_stage, local, group=view.pp_group)
    buckets = plan_buckets([list(stage_params or []) for stage_params in by_stage], bucket_bytes)
    _check_unique_names(buckets)
    return buckets


def export_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    shards_to_hf: ShardsToHF,
    bucket_bytes: int,
    receivers: Receivers = "all_ranks",
    plan: list[BucketPlan] | None = None,
    buffer_for: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[HFTensors]:
    """Yield the model's Hugging Face tensors in buckets; see the module docstring for who must call it.

    `plan` (from `plan_export`, same arguments) may be passed when the caller needs the names up front; it holds
    no values, so reusing it across exports cannot send stale weights. `buffer_for(i)` may give the flat uint8
    buffer (at least the bucket's size) that bucket i is packed into, one the caller keeps for the plan's life
    (the plan keeps its views); by default each bucket gets a new one.
    """
    view = _StageView()
    device = next(_unwrap(model_chunks[0]).parameters()).device
    buckets = plan if plan is not None else plan_export(model_chunks, shards_to_hf, bucket_bytes)
    is_first_rank = view.stage == 0 and view.tp_rank == 0
    for index, bucket in enumerate(buckets):
        if buffer_for is None:
            buffer = torch.empty(bucket.num_bytes, dtype=torch.uint8, device=device)
            views = _views(buffer, bucket)
        else:
            buffer = buffer_for(index)[: bucket.num_bytes]
            assert buffer.dtype == torch.uint8 and buffer.numel() == bucket.num_bytes, "buffer_for gave too small a buffer"
            views = bucket.views_in(buffer)
        if view.stage == bucket.stage:
            _fill_bucket(views, bucket, model_chunks, shards_to_hf, view)
        if receivers == "all_ranks":
            if view.pp_size > 1:
                torch.distributed.broadcast(buffer, src=view.pp_ranks[bucket.stage], group=view.pp_group)
            yield views
        else:
            if bucket.stage != 0 and view.tp_rank == 0:
                if view.stage == bucket.stage:
                    torch.distributed.send(buffer, dst=view.pp_ranks[0], group=view.pp_group)
                elif view.stage == 0:
                    torch.distributed.recv(buffer, src=view.pp_ranks[bucket.stage], group=view.pp_group)
            if is_first_rank:
                yield views
        del buffer, views


def save_hf_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    shards_to_hf: ShardsToHF,
    out_dir: str | Path,
    template_dir: str | Path,
    bucket_bytes: int = 512 * 1024**2,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Collectively write the live model as a Hugging Face checkpoint (every rank of the replica calls it).

    The replica's first rank receives the buckets and streams them into pre-planned safetensors shards (written
    aside, renamed when complete), with the config/tokenizer/processor files of `template_dir`. Memory: one bucket.
    """
    plan = plan_export(model_chunks, shards_to_hf, bucket_bytes)
    buckets = export_hf_weights(model_chunks, shards_to_hf, bucket_bytes, receivers="first_rank", plan=plan)
    view = _StageView()
    if not (view.stage == 0 and view.tp_rank == 0):
        for _ in buckets:  # take part in the collectives; nothing is yielded here
            pass
        return Path(out_dir)
    specs = [spec for bucket in plan for param in bucket.params for spec in param.hf_specs]
    tensors = (item for bucket in buckets for item in bucket)
    return write_hf_checkpoint(out_dir, specs, tensors, template_dir, max_shard_bytes, overwrite)
