"""Write and read Megatron-Core `torch_dist` checkpoints one parameter at a time, in one process, without ranks.

A Megatron-Core distributed checkpoint holds *global* tensors (keyed by `ShardedTensor.key`, decoder layers
stacked on a leading axis) cut into chunks, plus pickled `ShardedObject`s and a "common" state. Apart from the
vocabulary padding (which Megatron loads across sizes: `allow_shape_mismatch`), nothing in it depends on the TP/PP
layout that wrote it (KV heads a model replicates over TP ranks are stored once: models/qwen_vl/kv_checkpoint.py). So a
converter can write one directly: build the model once at TP=1, PP=1 on the meta device, take its
`sharded_state_dict()` as the *template* (keys, global shapes, offsets, and for every chunk which parameter and which
view of it holds the values), and let PyTorch's checkpoint writer ask for each chunk's values only when it writes
that chunk. Values are produced by a callback, one parameter at a time, so memory stays at about one parameter
(plus the inputs the callback reads and one copy of one chunk).

Reading is the mirror image: `read_params` fills the template's parameters a few at a time, asking PyTorch's
checkpoint reader for exactly the byte ranges that overlap their chunks, whatever chunking (TP/PP) wrote them.

Checked against Megatron's loader by tests/convert/test_dcp_stream.py: a checkpoint written here loads into live
models at TP=2, PP=2, and one saved by a live model reads back here.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

COMMON_STATE_KEY = "common_state"
CONTENT_METADATA_KEY = "content_metadata"  # where Megatron's save(..., content_metadata=...) keeps it


@dataclass(frozen=True)
class ChunkSource:
    """Which parameter of the template holds a chunk's values, and which strided view of it."""

    param_name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk of one global tensor of the checkpoint."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    chunk_shape: tuple[int, ...]  # with Megatron's prepended (layer) axes as leading 1s
    dtype: torch.dtype
    source: ChunkSource
    allow_shape_mismatch: bool = False  # Megatron's flag on the (padded) vocabulary tensors


@dataclass
class CheckpointTemplate:
    """Everything a TP=1, PP=1 model's sharded state dict says about the checkpoint, without values."""

    chunks: list[PlannedChunk]
    param_shapes: dict[str, tuple[int, ...]]  # state-dict name -> full (TP=1) shape
    param_dtypes: dict[str, torch.dtype]
    objects: dict[str, Any] = field(default_factory=dict)  # ShardedObject unique key -> its (picklable) value


def _sharded_tensors_of(value: Any) -> list[Any]:
    """A factory's build() may return a ShardedTensor, or lists/dicts of them."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in _sharded_tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _sharded_tensors_of(v)]
    return [value]


def template_from_sharded_state_dict(sharded_state_dict: dict[str, Any]) -> CheckpointTemplate:
    """Describe the checkpoint a (meta-device, TP=1, PP=1) model's flat `sharded_state_dict()` would save."""
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    chunks: list[PlannedChunk] = []
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    objects: dict[str, Any] = {}
    for name, value in sharded_state_dict.items():
        if isinstance(value, ShardedObject):
            objects[value.unique_key] = value.data
            continue
        if isinstance(value, LocalNonpersistentObject):
            continue
        if isinstance(value, ShardedTensorFactory):
            base, pieces = value.data, _sharded_tensors_of(value.build())
        elif isinstance(value, ShardedTensor):
            base, pieces = value.data, [value]
        else:
            raise ValueError(f"template entry {name!r} is a {type(value).__name__}, not a sharded tensor or object")
        assert base.is_contiguous(), f"parameter {name} is not contiguous; its chunk views cannot be rebuilt"
        shapes[name], dtypes[name] = tuple(base.shape), base.dtype
        for piece in pieces:
            assert isinstance(piece, ShardedTensor) and piece.flattened_range is None, piece
            view = piece.data
            source = ChunkSource(
                param_name=name,
                size=tuple(view.shape),
                stride=tuple(view.stride()),
                storage_offset=view.storage_offset() - base.storage_offset(),
            )
            chunks.append(
                PlannedChunk(
                    key=piece.key,
                    global_shape=tuple(piece.global_shape),
                    global_offset=tuple(piece.global_offset),
                    chunk_shape=(1,) * piece.prepend_axis_num + tuple(piece.local_shape),
                    dtype=base.dtype,
                    source=source,
                    allow_shape_mismatch=piece.allow_shape_mismatch,
                )
            )
    return CheckpointTemplate(chunks, shapes, dtypes, objects)


@contextlib.contextmanager
def _single_process_io() -> Iterator[None]:
    """PyTorch warns that no_dist=True means one process; here that is the point, so keep the log clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _object_bytes(value: Any) -> io.BytesIO:
    """Serialise a ShardedObject's value the way Megatron's torch_dist strategy does (a one-element list)."""
    buffer = io.BytesIO()
    torch.save([value], buffer)
    buffer.seek(0)
    return buffer


def common_state_unique_key() -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(COMMON_STATE_KEY, None, (1,), (0,)).unique_key


class _StreamingSavePlanner(DefaultSavePlanner):
    """A save planner whose tensors exist only when the writer asks for them."""

    def __init__(
        self,
        template: CheckpointTemplate,
        produce_param: Callable[[str], torch.Tensor],
        common_state: dict[str, Any],
        on_chunk_written: Callable[[PlannedChunk], None] | None,
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.template = template
        self.produce_param = produce_param
        self.byte_objects = dict(template.objects)
        self.byte_objects[common_state_unique_key()] = common_state
        self.on_chunk_written = on_chunk_written
        self._chunk_by_index = {(c.key, c.global_offset): c for c in template.chunks}
        self._cached: tuple[str, torch.Tensor] | None = None  # the one parameter in memory

    def create_local_plan(self) -> SavePlan:
        items = []
        for chunk in self.template.chunks:
            offsets = torch.Size(chunk.global_offset)
            items.append(
                WriteItem(
                    index=MetadataIndex(chunk.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.chunk_shape)),
                        properties=TensorProperties(dtype=chunk.dtype),
                        size=torch.Size(chunk.global_shape),
                    ),
                )
            )
        for unique_key in self.byte_objects:
            items.append(WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def _param(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous parameter before producing the next
            tensor = self.produce_param(name)
            want_shape, want_dtype = self.template.param_shapes[name], self.template.param_dtypes[name]
            if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                raise ValueError(
                    f"parameter {name}: produced {list(tensor.shape)} {tensor.dtype}, the model has "
                    f"{list(want_shape)} {want_dtype}"
                )
            self._cached = (name, tensor.contiguous())
        return self._cached[1]

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return _object_bytes(self.byte_objects[write_item.index.fqn])
        chunk = self._chunk_by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
        source = chunk.source
        values = self._param(source.param_name).as_strided(source.size, source.stride, source.storage_offset)
        if self.on_chunk_written is not None:
            self.on_chunk_written(chunk)
        return values.reshape(chunk.chunk_shape)


def write_checkpoint(
    out_dir: Path,
    template: CheckpointTemplate,
    produce_param: Callable[[str], torch.Tensor],
    common_state: dict[str, Any] | None = None,
    on_chunk_written: Callable[[PlannedChunk], None] | None = None,
) -> None:
    """Write a complete `torch_dist` checkpoint into the (empty, existing) directory `out_dir`.

    `produce_param(name)` returns the full TP=1 value of a template parameter; it is called about once per
    parameter (again only if the writer's order separates a parameter's chunks) and its result is dropped as soon
    as the writer moves on to the next parameter.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    planner = _StreamingSavePlanner(template, produce_param, dict(common_state or {}), on_chunk_written)
    # One thread and no copy-ahead: the writer resolves (produces) one chunk at a time.
    writer = FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    with _single_process_io():
        dcp_save(state_dict={}, storage_writer=writer, planner=planner, no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(out_dir))


# ----------------------------------------------------------------------------------------------- reading


def stored_dtypes(ckpt_dir: Path) -> dict[str, torch.dtype]:
    """The dtype each global tensor of a checkpoint is stored in."""
    metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {
        key: md.properties.dtype
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def read_common_state(ckpt_dir: Path) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import load_common_state_dict

    return dict(load_common_state_dict(str(ckpt_dir)))


class _StreamingLoadPlanner(LoadPlanner):
    """Reads the chunks of a few template parameters straight into their (TP=1) buffers."""

    def __init__(self, targets: dict[str, list[tuple[PlannedChunk, torch.Tensor]]]) -> None:
        self.targets = targets  # checkpoint key -> [(chunk, the view of a parameter buffer it fills)]

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        assert metadata is not None
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, chunks in self.targets.items():
            stored = self.metadata.state_dict_metadata[key]
            assert isinstance(stored, TensorStorageMetadata), key  # check_matches_template ran first
            planned = chunks[0][0]
            wanted = [ChunkStorageMetadata(torch.Size(c.global_offset), torch.Size(c.chunk_shape)) for c, _ in chunks]
            reads = create_read_items_for_chunk_list(key, stored, wanted)
            covered = [0] * len(chunks)
            for read in reads:
                covered[read.dest_index.index] += math.prod(read.lengths)
            for (chunk, _), num_covered in zip(chunks, covered):
                if num_covered != math.prod(chunk.chunk_shape) and tuple(stored.size) == planned.global_shape:
                    raise ValueError(f"the checkpoint lacks part of {key!r} at offset {list(chunk.global_offset)}")
            items.extend(reads)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError(f"no byte objects are requested, got {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        _, target = self.targets[read_item.dest_index.fqn][read_item.dest_index.index]
        return narrow_tensor_by_index(target, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the parameter buffer; the reader already copied into it


def check_matches_template(ckpt_dir: Path, template: CheckpointTemplate) -> None:
    """Raise a ValueError naming every template tensor the checkpoint lacks or holds with another global shape.

    Vocabulary tensors (Megatron's `allow_shape_mismatch`) may differ in padding: the checkpoint was saved at a TP
    size that padded the vocabulary differently.
    """
    stored = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    problems = []
    for key, chunk in {c.key: c for c in template.chunks}.items():
        md = stored.get(key)
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"the checkpoint has no tensor {key!r}")
        elif tuple(md.size) != chunk.global_shape and not chunk.allow_shape_mismatch:
            problems.append(
                f"checkpoint tensor {key!r} has global shape {list(md.size)}, the model built from the config has "
                f"{list(chunk.global_shape)}"
            )
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"{ckpt_dir} does not match the model's config:\n  {shown}")


def read_params(
    ckpt_dir: Path, template: CheckpointTemplate, param_groups: Iterable[Sequence[str]]
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the full (TP=1) values of each group of template parameters, one group at a time.

    Values keep the dtype the checkpoint stores them in. Only the byte ranges covering a group's chunks are read,
    whatever TP/PP layout wrote them. Rows a checkpoint does not have (more vocabulary padding in the model than
    in the checkpoint) read as zeros.
    """
    check_matches_template(ckpt_dir, template)
    dtypes = stored_dtypes(ckpt_dir)
    chunks_by_param: dict[str, list[PlannedChunk]] = {}
    for chunk in template.chunks:
        chunks_by_param.setdefault(chunk.source.param_name, []).append(chunk)
    for group in param_groups:
        buffers: dict[str, torch.Tensor] = {}
        targets: dict[str, list[tuple[PlannedChunk, torch.Tensor]]] = {}
        for name in group:
            chunks = chunks_by_param[name]
            dtype = dtypes.get(chunks[0].key, template.param_dtypes[name])
            buffers[name] = torch.zeros(template.param_shapes[name], dtype=dtype)
            for chunk in chunks:
                source = chunk.source
                view = buffers[name].as_strided(source.size, source.stride, source.storage_offset)
                targets.setdefault(chunk.key, []).append((chunk, view.view(chunk.chunk_shape)))
        with _single_process_io():
            dcp_load(
                state_dict={},
                storage_reader=FileSystemReader(str(ckpt_dir)),
                planner=_StreamingLoadPlanner(targets),
                no_dist=True,
            )
        yield buffers
