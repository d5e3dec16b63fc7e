"""Hugging Face side of the converters: a validating, lazy reader and a streaming writer of sharded safetensors.

Reader: `HFCheckpointReader(dir)` checks before any tensor is read that the directory is a Hugging Face checkpoint
(a config naming its `model_type`), that every shard the index names exists and is not truncated (the safetensors
header's byte ranges must fit the file), and (by default) that every tensor has the shape the config implies, with nothing missing or
extra. Tensors are then read one at a time with plain file reads at the offsets the header gives (not memory-mapped:
a mapping would keep every page it touched resident for as long as the file stays open), so memory stays bounded by
what the caller holds.

Writer: `HFShardedWriter` plans the shards from the full list of tensor names, shapes and dtypes up front, writes
each shard's header first and then every tensor at its planned offset as it arrives, in any order: nothing is
buffered beyond the tensor being written. `write_hf_checkpoint` wraps it with the template files (config,
tokenizer, processor, chat template, generation config) and the write-aside-then-rename of `atomic_dir`.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import torch

from lmmrl_megatron.convert.atomic_dir import atomic_output_dir

# transformers 5's `save_pretrained` nests a vision-language model's parts (`model.language_model.*`,
# `model.visual.*`); the hub's checkpoints, which vLLM and the mapping use, do not.
_HF_PREFIX_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses

# Weights and their indexes are never copied from a template directory; everything else (config, tokenizer,
# processor, chat template, generation config, README) is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEX_SUFFIX = ".index.json"

_DTYPE_FROM_SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_TO_SAFETENSORS = {dtype: name for name, dtype in _DTYPE_FROM_SAFETENSORS.items()}


def canonical_hf_name(name: str) -> str:
    """The hub name of an HF tensor name in either layout (transformers 5 `save_pretrained` or the hub's)."""
    for new, old in _HF_PREFIX_ALIASES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, known before its values are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        num_elements = 1
        for size in self.shape:
            num_elements *= size
        return num_elements * self.dtype.itemsize


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors checkpoint lives: its file and the byte offset of its data there."""

    spec: TensorSpec
    file: Path
    offset: int


# ----------------------------------------------------------------------------------------------- reading


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Parse a safetensors header and check the file holds every byte it describes (a truncated shard fails)."""
    return {name: stored.spec for name, stored in _stored_in_file(path).items()}


def _stored_in_file(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file with its data offset, after checking the file is not truncated."""
    file_size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"truncated shard {path}: {file_size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > file_size:
            raise ValueError(
                f"truncated shard {path}: header says {header_len} header bytes but the file has {file_size} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"corrupt shard {path}: the safetensors header is not valid JSON ({exc})") from exc
    header.pop("__metadata__", None)
    stored: dict[str, StoredTensor] = {}
    data_end = 0
    for name, entry in header.items():
        dtype_name = entry.get("dtype")
        if dtype_name not in _DTYPE_FROM_SAFETENSORS:
            raise ValueError(f"shard {path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        spec = TensorSpec(name, tuple(entry["shape"]), _DTYPE_FROM_SAFETENSORS[dtype_name])
        begin, end = entry["data_offsets"]
        if end - begin != spec.num_bytes:
            raise ValueError(f"corrupt shard {path}: tensor {name!r} spans {end - begin} bytes, shape needs "
                             f"{spec.num_bytes}")
        stored[name] = StoredTensor(spec, path, 8 + header_len + begin)
        data_end = max(data_end, end)
    expected_size = 8 + header_len + data_end
    if file_size < expected_size:
        raise ValueError(
            f"truncated shard {path}: {file_size} bytes on disk, the header describes {expected_size} "
            f"(missing {expected_size - file_size} bytes)"
        )
    return stored


def load_hf_config(hf_dir: Path) -> dict[str, Any]:
    """Read `config.json` and check it is a Hugging Face model config (it names its `model_type`); which models
    the trainer knows is the family registry's question (`models/registry.py`), not the reader's."""
    config_path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir} is not a directory")
    if not config_path.is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{config_path}: not a Hugging Face model config (no model_type)")
    return config


def _stored_tensors(hf_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint with its shard, after checking the index against the shards."""
    index_path = hf_dir / INDEX_FILE_NAME
    single_path = hf_dir / SINGLE_FILE_NAME
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index_path} is not a safetensors index (no weight_map): {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif single_path.is_file():
        weight_map = {}
        files = [SINGLE_FILE_NAME]
    else:
        raise ValueError(f"{hf_dir} has no {INDEX_FILE_NAME} nor {SINGLE_FILE_NAME}: no safetensors weights")
    stored: dict[str, StoredTensor] = {}
    for file_name in files:
        path = hf_dir / file_name
        if not path.is_file():
            raise ValueError(f"missing shard {path}: listed in {index_path.name} but not on disk")
        for name, in_file in _stored_in_file(path).items():
            if weight_map and weight_map.get(name) != file_name:
                raise ValueError(
                    f"shard {path} holds {name!r}, which {index_path.name} puts in {weight_map.get(name)!r}"
                )
            stored[name] = in_file
    missing = sorted(set(weight_map) - set(stored))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{index_path} lists tensors no shard holds: {missing[:5]}{more}")
    return stored


def expected_hf_specs(hf_dir: Path) -> dict[str, TensorSpec]:
    """Names and shapes the checkpoint must hold according to its config, from transformers' own model class.

    The model is built on the meta device (no memory), and its parameter names are turned back into the names
    `save_pretrained` writes. Tied output embeddings are not stored, as transformers does not store them.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    state = revert_weight_conversion(model, model.state_dict())
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False)
    )
    specs = {name: TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()}
    if tied:
        specs.pop("lm_head.weight", None)
    return specs


class HFCheckpointReader:
    """Validated, lazy access to the tensors of a Hugging Face safetensors checkpoint.

        with HFCheckpointReader(path) as reader:
            for name in reader.names: tensor = reader.get(name)
    """

    def __init__(self, hf_dir: str | Path, check_config_shapes: bool = True) -> None:
        self.dir = Path(hf_dir)
        self.config = load_hf_config(self.dir)
        self.model_type: str = self.config["model_type"]
        self._stored = _stored_tensors(self.dir)
        self._files: dict[Path, BinaryIO] = {}
        if check_config_shapes:
            self.check_shapes(expected_hf_specs(self.dir))

    @property
    def names(self) -> list[str]:
        return list(self._stored)

    def spec(self, name: str) -> TensorSpec:
        return self._stored_tensor(name).spec

    def file_of(self, name: str) -> Path:
        return self._stored_tensor(name).file

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (a copy of its bytes; nothing else is loaded)."""
        stored = self._stored_tensor(name)
        f = self._files.get(stored.file)
        if f is None:
            f = self._files[stored.file] = stored.file.open("rb")
        data = bytearray(stored.spec.num_bytes)
        f.seek(stored.offset)
        if f.readinto(data) != len(data):
            raise ValueError(f"truncated shard {stored.file}: tensor {name!r} ends past the end of the file")
        if not data:
            return torch.empty(stored.spec.shape, dtype=stored.spec.dtype)
        return torch.frombuffer(data, dtype=stored.spec.dtype).reshape(stored.spec.shape)

    def check_shapes(self, expected: Mapping[str, TensorSpec]) -> None:
        """Raise a ValueError naming every tensor that is missing, unexpected or of the wrong shape.

        `expected` uses the hub's names; stored names in transformers 5's own layout are compared as their hub name.
        """
        stored = {canonical_hf_name(name): tensor for name, tensor in self._stored.items()}
        problems = []
        for name in sorted(set(expected) - set(stored)):
            problems.append(f"missing tensor {name} (shape {list(expected[name].shape)} per config.json)")
        for name in sorted(set(stored) - set(expected)):
            problems.append(f"unexpected tensor {stored[name].spec.name} in {stored[name].file.name}")
        for name in sorted(set(stored) & set(expected)):
            have, want = stored[name].spec.shape, expected[name].shape
            if have != want:
                problems.append(
                    f"tensor {stored[name].spec.name} in {stored[name].file.name} has shape {list(have)}, "
                    f"config.json implies {list(want)}"
                )
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            shown = "\n  ".join(problems[:10]) + more
            raise ValueError(f"{self.dir} does not match its config.json:\n  {shown}")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored_tensor(self, name: str) -> StoredTensor:
        try:
            return self._stored[name]
        except KeyError:
            raise KeyError(f"{self.dir} has no tensor {name!r}") from None


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _PlannedTensor:
    spec: TensorSpec
    file_name: str
    offset: int  # absolute byte offset of the tensor's data in its file


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if current and current_bytes + spec.num_bytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.num_bytes
    if current or not shards:
        shards.append(current)
    return shards


def _shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


class HFShardedWriter:
    """Writes planned safetensors shards into `out_dir`: headers first, then each tensor at its offset."""

    def __init__(self, out_dir: Path, specs: Sequence[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the writer's plan")
        self.out_dir = out_dir
        shards = plan_shards(specs, max_shard_bytes)
        self.file_names = _shard_file_names(len(shards))
        self._planned: dict[str, _PlannedTensor] = {}
        for file_name, shard in zip(self.file_names, shards):
            self._planned.update(self._write_header(out_dir / file_name, shard))
        self._written: set[str] = set()
        self._files = {name: (out_dir / name).open("r+b") for name in self.file_names}

    @staticmethod
    def _write_header(path: Path, shard: list[TensorSpec]) -> dict[str, _PlannedTensor]:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        begin = 0
        for spec in shard:
            header[spec.name] = {
                "dtype": _DTYPE_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [begin, begin + spec.num_bytes],
            }
            begin += spec.num_bytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data region to 8 bytes
        data_start = 8 + len(encoded)
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            f.truncate(data_start + begin)  # the final size now; data regions are filled as tensors arrive
        planned = {}
        for spec in shard:
            planned[spec.name] = _PlannedTensor(spec, path.name, data_start + header[spec.name]["data_offsets"][0])
        return planned

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor; its shape and dtype must be those planned."""
        planned = self._planned.get(name)
        if planned is None:
            raise KeyError(f"tensor {name!r} is not in the writer's plan")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        if tuple(tensor.shape) != planned.spec.shape or tensor.dtype != planned.spec.dtype:
            raise ValueError(
                f"tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, planned {list(planned.spec.shape)} "
                f"{planned.spec.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._files[planned.file_name]
        f.seek(planned.offset)
        f.write(memoryview(data))
        self._written.add(name)

    def finish(self) -> list[str]:
        """Check that every planned tensor was written, close the shards, write the index; return file names."""
        missing = sorted(set(self._planned) - self._written)
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[:5]}")
        for f in self._files.values():
            f.flush()
            f.close()
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": sum(p.spec.num_bytes for p in self._planned.values())},
                "weight_map": {name: p.file_name for name, p in sorted(self._planned.items())},
            }
            (self.out_dir / INDEX_FILE_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


def copy_template_files(template_dir: Path, out_dir: Path) -> list[str]:
    """Copy everything that is not weights (config, tokenizer, processor, chat template, ...) into `out_dir`."""
    copied = []
    for path in sorted(template_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(_WEIGHT_INDEX_SUFFIX):
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    if "config.json" not in copied:
        raise ValueError(f"template directory {template_dir} has no config.json")
    return copied


def write_hf_checkpoint(
    out_dir: str | Path,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    template_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Stream `tensors` (in any order) into a complete HF checkpoint at `out_dir`, written aside then renamed."""
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        copy_template_files(Path(template_dir), staging)
        writer = HFShardedWriter(staging, specs, max_shard_bytes)
        try:
            for name, tensor in tensors:
                writer.write(name, tensor)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return out
