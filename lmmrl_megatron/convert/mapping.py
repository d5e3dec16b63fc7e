"""Declarative Hugging Face <-> Megatron-Core parameter mapping: pure tensor code, no process groups.

A model's mapping is a list of `ParamRule`s (see `models/qwen_vl/mapping.py` for Qwen-VL). A rule names one Megatron
parameter (a pattern with `{layer}` for per-layer parameters), the Hugging Face tensor(s) it is made of, where it
lives in the pipeline (`Placement`) and how it is cut (`Transform`):

    Copy(tp_dim)        one HF tensor; split along `tp_dim` under TP, or replicated (tp_dim None)
    FusedQKV(...)       q, k, v (weights or biases) fused per query group: [q heads of group g; k_g; v_g] for each
                        group, groups split over TP ranks; KV heads replicated when there are fewer than TP ranks
    HeadQKV(...)        one HF tensor packed [q; k; v] (each over all heads) -> per head [q_h; k_h; v_h]
    FusedGateUp(width)  gate, up of a SwiGLU MLP: TP rank r holds [gate_r; up_r] (each split along dim 0); with
                        `width`, both zero-padded to a multiple of TP first
    PaddedSplit(...)    one HF tensor zero-padded along `tp_dim` to a multiple of TP, then split along it
    PaddedVocab(...)    embedding / output rows padded with zeros to Megatron's padded vocabulary, split by rows
    other transforms    subclass `Transform`

The two directions, for one concrete parameter (`MappedParam`, a rule bound to a layer index):

    shard = hf_to_mcore_shard(param, {hf_name: tensor, ...}, tp_rank, tp_size)   # this rank's slice
    hf = mcore_shards_to_hf(param, [shard_0, ..., shard_{tp-1}])                  # {hf_name: tensor}, unpadded

Both work on any device, `meta` included (shape checks without memory). Pipeline placement: `chunk_params(...)`
lists the parameters of one chunk of a `ShardLayout` (`parallel/layout.py`, whose `decoder_layer_range` gives the
global layer indices a chunk holds); `local_mcore_name(...)` renames a global name to the chunk's module name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from lmmrl_megatron.parallel.layout import ShardLayout

# Where a parameter lives: on the first model chunk (embedding, vision tower), the last one (final norm, output
# layer), the chunk holding its decoder layer, or - for tied embeddings under PP - the last chunk's copy of the
# embedding (only when the last chunk is not also the first).
Placement = Literal["first", "last", "decoder_layer", "tied_output"]


# ---------------------------------------------------------------------------------------------- transforms


def _split(tensor: Tensor, tp_size: int, dim: int, what: str) -> list[Tensor]:
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(tensor.shape)} does not split over tp={tp_size}")
    return list(tensor.chunk(tp_size, dim=dim))


def _expect_shape(tensor: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{what}: shape {tuple(tensor.shape)} does not match the config's {shape}")


def _expect_size(tensor: Tensor, dim: int, size: int, what: str) -> None:
    if tensor.shape[dim] != size:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(tensor.shape)} is not the config's {size}")


def pad_to_multiple(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple`."""
    return -(-size // multiple) * multiple


def _zero_pad(tensor: Tensor, dim: int, size: int) -> Tensor:
    """`tensor` with zeros appended along `dim` up to `size` entries (`tensor` itself when already that long)."""
    missing = size - tensor.shape[dim]
    assert missing >= 0, f"cannot pad dim {dim} of {tuple(tensor.shape)} down to {size}"
    if missing == 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


class Transform:
    """How the HF tensors of one parameter become a TP shard, and back. Subclasses are frozen dataclasses."""

    kind: str = "transform"
    tp_dim: int | None = 0  # the dimension of the Megatron parameter split over TP ranks (None: replicated)

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        raise NotImplementedError

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        raise NotImplementedError


def cat_shards(shards: Sequence[Tensor], dim: int) -> Tensor:
    """The TP shards joined along `dim`; one shard is returned as it is (a view of the parameter, not a copy: the
    weight export reuses such views across syncs)."""
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


@dataclass(frozen=True)
class Copy(Transform):
    """One HF tensor, split along `tp_dim` (None: every rank holds all of it)."""

    tp_dim: int | None = None
    kind: str = "copy"

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        (tensor,) = hf
        if self.tp_dim is None:
            return tensor
        return _split(tensor, tp_size, self.tp_dim, what)[tp_rank]

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        if self.tp_dim is None:
            return [shards[0]]
        return [cat_shards(shards, self.tp_dim)]


@dataclass(frozen=True)
class FusedQKV(Transform):
    """q, k, v projections (weights [out, in] or biases [out]) fused per query group, Megatron's layout.

    The fused tensor is, for each query group g: the rows of its query heads, then k_g, then v_g. Groups are split
    over TP ranks in order. With fewer KV heads than TP ranks each KV head is repeated `tp / num_kv_heads` times
    (every copy followed by its share of the query heads), so each rank holds exactly one group; converting back
    keeps the first copy of each head.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp_dim: int | None = 0
    kind: str = "qkv"

    def replication(self, tp_size: int) -> int:
        if self.num_kv_heads >= tp_size:
            if self.num_kv_heads % tp_size:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} does not split over tp={tp_size}")
            return 1
        if tp_size % self.num_kv_heads:
            raise ValueError(f"tp={tp_size} is not a multiple of num_kv_heads={self.num_kv_heads}")
        return tp_size // self.num_kv_heads

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        q, k, v = hf
        rest = tuple(q.shape[1:])
        _expect_shape(q, (self.num_heads * self.head_dim, *rest), f"{what} (q)")
        _expect_shape(k, (self.num_kv_heads * self.head_dim, *rest), f"{what} (k)")
        _expect_shape(v, (self.num_kv_heads * self.head_dim, *rest), f"{what} (v)")
        if self.num_heads % tp_size:
            raise ValueError(f"{what}: {self.num_heads} heads do not split over tp={tp_size}")
        replication = self.replication(tp_size)
        num_groups = self.num_kv_heads * replication
        heads_per_group = self.num_heads // num_groups
        groups_per_rank = num_groups // tp_size
        groups = range(tp_rank * groups_per_rank, (tp_rank + 1) * groups_per_rank)
        q_groups = q.reshape(num_groups, heads_per_group * self.head_dim, *rest)
        k_heads = k.reshape(self.num_kv_heads, self.head_dim, *rest)
        v_heads = v.reshape(self.num_kv_heads, self.head_dim, *rest)
        parts = []
        for group in groups:
            kv_head = group // replication
            parts += [q_groups[group], k_heads[kv_head], v_heads[kv_head]]
        return torch.cat(parts, dim=0)

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        tp_size = len(shards)
        replication = self.replication(tp_size)
        num_groups = self.num_kv_heads * replication
        heads_per_group = self.num_heads // num_groups
        fused = cat_shards(shards, 0)
        rest = tuple(fused.shape[1:])
        expected_rows = num_groups * (heads_per_group + 2) * self.head_dim
        if fused.shape[0] != expected_rows:
            raise ValueError(f"{what}: {fused.shape[0]} fused rows over tp={tp_size}, expected {expected_rows}")
        grouped = fused.reshape(num_groups, (heads_per_group + 2) * self.head_dim, *rest)
        q_rows = heads_per_group * self.head_dim
        q = grouped[:, :q_rows].reshape(self.num_heads * self.head_dim, *rest)
        k = grouped[::replication, q_rows : q_rows + self.head_dim].reshape(self.num_kv_heads * self.head_dim, *rest)
        v = grouped[::replication, q_rows + self.head_dim :].reshape(self.num_kv_heads * self.head_dim, *rest)
        return [q, k, v]


@dataclass(frozen=True)
class HeadQKV(Transform):
    """q, k, v of multi-head attention packed in one HF tensor (weights [out, in] or biases [out]): [q; k; v], each
    over all heads. Megatron's tensor interleaves them per head, [q_0; k_0; v_0; q_1; k_1; v_1; ...], and TP ranks
    hold consecutive rows of it (whole heads with their k and v when TP divides the heads).
    """

    num_heads: int
    head_dim: int
    tp_dim: int | None = 0
    kind: str = "head_qkv"

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        (packed,) = hf
        _expect_size(packed, 0, 3 * self.num_heads * self.head_dim, what)
        rest = tuple(packed.shape[1:])
        per_head = packed.reshape(3, self.num_heads, self.head_dim, *rest).transpose(0, 1).reshape(packed.shape)
        return _split(per_head, tp_size, 0, what)[tp_rank]

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        per_head = cat_shards(shards, 0)
        _expect_size(per_head, 0, 3 * self.num_heads * self.head_dim, f"{what} (TP shards joined)")
        rest = tuple(per_head.shape[1:])
        return [per_head.reshape(self.num_heads, 3, self.head_dim, *rest).transpose(0, 1).reshape(per_head.shape)]


@dataclass(frozen=True)
class FusedGateUp(Transform):
    """gate and up projections of a SwiGLU MLP (weights or biases): TP rank r holds [gate_r; up_r].

    With `width` (the MLP's width in the HF tensors), gate and up are zero-padded to a multiple of TP before the
    split, so that a width TP does not divide still splits; converting back drops the padding. Zero units change
    nothing: act(0) * 0 = 0, with zero fc2 columns (`PaddedSplit`), and their gradients are zero too.
    """

    width: int | None = None
    tp_dim: int | None = 0
    kind: str = "gate_up"

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        gate, up = hf
        if gate.shape != up.shape:
            raise ValueError(f"{what}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
        if self.width is not None:
            _expect_size(gate, 0, self.width, what)
            padded = pad_to_multiple(self.width, tp_size)
            gate, up = _zero_pad(gate, 0, padded), _zero_pad(up, 0, padded)
        return torch.cat([_split(gate, tp_size, 0, what)[tp_rank], _split(up, tp_size, 0, what)[tp_rank]], dim=0)

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        gate, up = cat_shards([h[0] for h in halves], 0), cat_shards([h[1] for h in halves], 0)
        if self.width is None:
            return [gate, up]
        return [gate[: self.width], up[: self.width]]


@dataclass(frozen=True)
class PaddedSplit(Transform):
    """One HF tensor whose dim `tp_dim` has `size` entries, zero-padded to a multiple of TP, then split along it
    (e.g. the fc1 rows and fc2 columns of an MLP whose width TP does not divide); converting back drops the
    padding."""

    size: int
    tp_dim: int = 0
    kind: str = "padded_split"

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        (tensor,) = hf
        _expect_size(tensor, self.tp_dim, self.size, what)
        padded = _zero_pad(tensor, self.tp_dim, pad_to_multiple(self.size, tp_size))
        return _split(padded, tp_size, self.tp_dim, what)[tp_rank]

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        return [cat_shards(shards, self.tp_dim).narrow(self.tp_dim, 0, self.size)]


def padded_vocab_size(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of `make_vocab_size_divisible_by * tp_size`."""
    return pad_to_multiple(vocab_size, make_vocab_size_divisible_by * tp_size)


@dataclass(frozen=True)
class PaddedVocab(Transform):
    """Embedding / output-layer rows: zero rows appended up to the padded vocabulary, then split by rows."""

    vocab_size: int
    make_vocab_size_divisible_by: int = 128
    tp_dim: int | None = 0
    kind: str = "vocab"

    def to_shard(self, hf: Sequence[Tensor], tp_rank: int, tp_size: int, what: str) -> Tensor:
        (table,) = hf
        if table.shape[0] != self.vocab_size:
            raise ValueError(f"{what}: {table.shape[0]} rows, but the config's vocab_size is {self.vocab_size}")
        padded = padded_vocab_size(self.vocab_size, tp_size, self.make_vocab_size_divisible_by)
        rows = padded // tp_size
        start, stop = tp_rank * rows, min((tp_rank + 1) * rows, self.vocab_size)
        real = table[start:stop] if start < stop else table[:0]
        pad = table.new_zeros(rows - real.shape[0], *table.shape[1:])
        return torch.cat([real, pad], dim=0) if pad.shape[0] else real

    def from_shards(self, shards: Sequence[Tensor], what: str) -> list[Tensor]:
        return [cat_shards(shards, 0)[: self.vocab_size]]


# ---------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class MappedParam:
    """One concrete parameter: its global Megatron name, its HF tensors, its transform and placement."""

    mcore_name: str
    hf_names: tuple[str, ...]
    transform: Transform
    placement: Placement
    layer: int | None = None
    exported: bool = True  # False for the tied output-layer copy: its HF tensor is exported from the embedding

    @property
    def tp_dim(self) -> int | None:
        return self.transform.tp_dim


@dataclass(frozen=True)
class ParamRule:
    """A parameter pattern: `{layer}` in `mcore` and `hf` is filled with the global decoder layer index."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    placement: Placement
    exported: bool = True

    def bind(self, layer: int | None = None) -> MappedParam:
        per_layer = "{layer}" in self.mcore
        if per_layer != (layer is not None):
            raise ValueError(f"rule {self.mcore}: layer={layer} given for a {'per' if per_layer else 'non'}-layer rule")
        fill = (lambda name: name.format(layer=layer)) if per_layer else (lambda name: name)
        return MappedParam(
            mcore_name=fill(self.mcore),
            hf_names=tuple(fill(name) for name in self.hf),
            transform=self.transform,
            placement=self.placement,
            layer=layer,
            exported=self.exported,
        )


def hf_to_mcore_shard(param: MappedParam, hf_tensors: Mapping[str, Tensor], tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's shard of `param`, from its HF tensors (a mapping holding at least `param.hf_names`)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside tp={tp_size}")
    missing = [name for name in param.hf_names if name not in hf_tensors]
    if missing:
        raise ValueError(f"{param.mcore_name}: HF tensors {missing} are missing")
    shard = param.transform.to_shard([hf_tensors[name] for name in param.hf_names], tp_rank, tp_size, param.mcore_name)
    return shard.contiguous()


def mcore_shards_to_hf(param: MappedParam, shards: Sequence[Tensor]) -> dict[str, Tensor]:
    """The HF tensors of `param` (vocabulary padding removed) from all its TP shards, in TP-rank order."""
    if not shards:
        raise ValueError(f"{param.mcore_name}: no shards given")
    tensors = param.transform.from_shards(shards, param.mcore_name)
    return {name: tensor.contiguous() for name, tensor in zip(param.hf_names, tensors, strict=True)}


def expand_rules(rules: Sequence[ParamRule], num_layers: int) -> list[MappedParam]:
    """Every concrete parameter of the model: per-layer rules bound to each of the `num_layers` layers."""
    params = []
    for rule in rules:
        if "{layer}" in rule.mcore:
            params += [rule.bind(layer) for layer in range(num_layers)]
        else:
            params.append(rule.bind())
    return params


def chunk_params(
    params: Sequence[MappedParam], num_layers: int, layout: ShardLayout, pp_rank: int, vp_stage: int | None = None
) -> list[MappedParam]:
    """The parameters that live on model chunk (pp_rank, vp_stage)."""
    layers = layout.decoder_layer_range(num_layers, pp_rank, vp_stage)
    first = layout.is_first_chunk(pp_rank, vp_stage)
    last = layout.is_last_chunk(pp_rank, vp_stage)
    selected = []
    for param in params:
        if param.placement == "decoder_layer":
            keep = param.layer in layers
        elif param.placement == "first":
            keep = first
        elif param.placement == "last":
            keep = last
        else:  # tied_output: the last chunk's own copy of the embedding, absent when it is also the first chunk
            keep = last and not first
        if keep:
            selected.append(param)
    return selected


def local_mcore_name(param: MappedParam, layer_offset: int, layers_token: str = "decoder.layers.") -> str:
    """The name of `param` inside its chunk's module, whose first decoder layer is global layer `layer_offset`."""
    if param.placement != "decoder_layer":
        return param.mcore_name
    assert param.layer is not None
    global_part = f"{layers_token}{param.layer}."
    assert global_part in param.mcore_name, f"{param.mcore_name} lacks {global_part!r}"
    return param.mcore_name.replace(global_part, f"{layers_token}{param.layer - layer_offset}.", 1)
