"""The two offline converters: Hugging Face <-> Megatron-Core distributed checkpoint, both streaming, any family.

    from lmmrl_megatron.models.registry import family_of_hf_dir
    from lmmrl_megatron.parallel.layout import ShardLayout
    convert_hf_to_mcore(ConvertOptions(src=hf_dir, out=mcore_dir, layout=ShardLayout(tp=8, pp=4)), family_of_hf_dir)
    convert_mcore_to_hf(ConvertOptions(src=mcore_dir, out=hf_dir, hf_template=None), family_of_hf_dir)

The model comes from its family (`convert/family.py`), which the resolver finds from the HF config (the source, or
the checkpoint's HF template); nothing here names a model.

HF -> Megatron runs in this one process: the Megatron layout comes from the model built at TP=1, PP=1 on the meta
device, and the checkpoint is written one parameter at a time (`dcp_stream.write_checkpoint`); the parameter being
written, the HF tensors it is made of and one chunk copy are all that is in memory. The result has global tensors
and loads at any TP/PP (`--tp/--pp` are checked against the model and recorded, not baked in).

Megatron -> HF reads `layers_per_step` decoder (or vision) layers at a time from a checkpoint saved at any layout,
maps them to HF tensors and writes them straight into pre-planned safetensors shards: memory holds those layers'
parameters and one parameter's HF tensors, never a whole shard.

Both write aside (`OUT.tmp-<pid>`) and rename when complete. The Megatron checkpoint keeps the HF config, tokenizer,
processor and chat template in `hf_template/`, so converting back needs no other input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lmmrl_megatron.convert.atomic_dir import atomic_output_dir
from lmmrl_megatron.convert.dcp_stream import (
    CONTENT_METADATA_KEY,
    PlannedChunk,
    check_matches_template,
    read_params,
    stored_dtypes,
    write_checkpoint,
)
from lmmrl_megatron.convert.family import FamilyResolver
from lmmrl_megatron.convert.hf_io import DEFAULT_MAX_SHARD_BYTES, HFCheckpointReader, HFShardedWriter, copy_template_files
from lmmrl_megatron.convert.mcore_ckpt import CONTENT_FORMAT, HF_TEMPLATE_SUBDIR
from lmmrl_megatron.convert.single_process import single_process_megatron
from lmmrl_megatron.parallel.layout import ShardLayout


@dataclass
class ConvertOptions:
    """What one conversion reads, writes and how."""

    src: str
    out: str
    # HF -> Megatron: the layout the checkpoint is meant for (checked, its tp/pp recorded; it loads at any)
    layout: ShardLayout = field(default_factory=ShardLayout)
    hf_template: str | None = None  # Megatron -> HF: config/tokenizer source (default: the checkpoint's own)
    layers_per_step: int = 1  # Megatron -> HF: layers read at a time
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("layers_per_step", "max_shard_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _hf_dtype(reader: HFCheckpointReader) -> torch.dtype:
    """The one floating dtype of the checkpoint's tensors (the converted checkpoint keeps it)."""
    dtypes = {reader.spec(name).dtype for name in reader.names if reader.spec(name).dtype.is_floating_point}
    if len(dtypes) != 1:
        raise ValueError(f"{reader.dir}: expected one floating dtype for all tensors, found {sorted(map(str, dtypes))}")
    return dtypes.pop()


def convert_hf_to_mcore(options: ConvertOptions, family_of: FamilyResolver) -> Path:
    """Convert a Hugging Face checkpoint into a Megatron-Core distributed checkpoint."""
    family = family_of(Path(options.src))  # first: a model no family knows is refused by name
    reader = HFCheckpointReader(options.src)
    config = family.read_config(options.src)
    family.check_layout(config, options.layout)
    stored_name = {family.canonical_hf_name(name): name for name in reader.names}

    def read_hf(name: str) -> torch.Tensor:
        if name not in stored_name:
            raise ValueError(f"{reader.dir}: no tensor {name!r} (nor its transformers-5 alias)")
        return reader.get(stored_name[name])

    content = {
        "format": CONTENT_FORMAT,
        "model_type": reader.model_type,
        "converted_from": str(Path(options.src).absolute()),
        "intended_tp": options.layout.tp,
        "intended_pp": options.layout.pp,
    }
    with single_process_megatron():
        model = family.checkpoint_model(config, _hf_dtype(reader))
        with atomic_output_dir(options.out, overwrite=options.overwrite) as staging, _progress(
            len(model.template.chunks), "HF -> Megatron", options.progress
        ) as bar:

            def on_chunk(chunk: PlannedChunk) -> None:
                bar.update(1)

            write_checkpoint(
                staging,
                model.template,
                lambda name: model.hf_to_mcore(name, read_hf),
                common_state={CONTENT_METADATA_KEY: content},
                on_chunk_written=on_chunk,
            )
            (staging / HF_TEMPLATE_SUBDIR).mkdir()
            copy_template_files(Path(options.src), staging / HF_TEMPLATE_SUBDIR)
    reader.close()
    return Path(options.out)


_LAYER = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)\.")


def layer_groups(names: Sequence[str], layers_per_step: int) -> list[list[str]]:
    """Group parameter names by layer: `layers_per_step` consecutive layers of one stack per group; every
    non-layer parameter alone. Order: first appearance in `names`."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        key = (match["stack"], int(match["index"]) // layers_per_step) if match else (name, -1)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _template_dir(options: ConvertOptions) -> Path:
    if options.hf_template is not None:
        return Path(options.hf_template)
    own = Path(options.src) / HF_TEMPLATE_SUBDIR
    if not (own / "config.json").is_file():
        raise ValueError(
            f"{options.src} holds no {HF_TEMPLATE_SUBDIR}/config.json; pass --hf-template with the model's "
            "Hugging Face config, tokenizer and processor"
        )
    return own


def convert_mcore_to_hf(options: ConvertOptions, family_of: FamilyResolver) -> Path:
    """Convert a Megatron-Core distributed checkpoint (saved at any TP/PP) into a Hugging Face checkpoint."""
    from megatron.core.dist_checkpointing import check_is_distributed_checkpoint

    src = Path(options.src)
    if not check_is_distributed_checkpoint(str(src)):
        raise ValueError(f"{src} is not a Megatron-Core distributed checkpoint (no valid metadata.json)")
    template_dir = _template_dir(options)
    family = family_of(template_dir)  # a clear error for a template of no known family
    config = family.read_config(template_dir)
    with single_process_megatron():
        # The word embeddings are stored in the model's dtype (some small parameters may be kept in fp32).
        model_dtype = stored_dtypes(src).get(family.embedding_key)
        if model_dtype is None:
            raise ValueError(f"{src} has no {family.embedding_key!r}: not a checkpoint of a {family.name} model")
        model = family.checkpoint_model(config, model_dtype)
        check_matches_template(src, model.template)  # before anything is written
        groups = layer_groups(list(model.template.param_shapes), options.layers_per_step)
        specs = model.hf_specs([name for group in groups for name in group])
        with atomic_output_dir(options.out, overwrite=options.overwrite) as staging, _progress(
            len(specs), "Megatron -> HF", options.progress
        ) as bar:
            copy_template_files(template_dir, staging)
            writer = HFShardedWriter(staging, specs, options.max_shard_bytes)
            try:
                for values in read_params(src, model.template, groups):
                    for name, value in values.items():
                        for hf_name, tensor in model.mcore_to_hf(name, value):
                            writer.write(hf_name, tensor)
                            bar.update(1)
                    del values
                writer.finish()
            except BaseException:
                writer.abort()
                raise
    return Path(options.out)
