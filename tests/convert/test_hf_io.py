"""The Hugging Face side: the validating reader, the streaming sharded writer, and write-aside-then-rename.

Every error case names what is wrong and where: a directory that is not a Hugging Face checkpoint, a shard the index
lists but the disk lacks, a truncated shard, a tensor whose shape does not match config.json. A writer killed
mid-write (SIGKILL, in a real subprocess) leaves no directory under the output name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmmrl_megatron.convert.hf_io import (
    INDEX_FILE_NAME,
    HFCheckpointReader,
    TensorSpec,
    plan_shards,
    read_safetensors_header,
    write_hf_checkpoint,
)
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint

SHARD_BYTES = 200_000  # the tiny checkpoints (about 1.2 MB) then span several shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("tiny") / "hf")


def _rewrite_sharded(src: Path, out: Path) -> Path:
    with HFCheckpointReader(src) as reader:
        specs = [reader.spec(name) for name in reader.names]
        # Reverse order on purpose: the writer places tensors at planned offsets, in whatever order they come.
        tensors = ((name, reader.get(name)) for name in reversed(reader.names))
        return write_hf_checkpoint(out, specs, tensors, template_dir=src, max_shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def sharded(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _rewrite_sharded(tiny, tmp_path_factory.mktemp("sharded") / "hf")


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_sharded_writer_round_trips_and_transformers_loads_it(tiny: Path, sharded: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / INDEX_FILE_NAME).is_file()
    index = json.loads((sharded / INDEX_FILE_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # a shard exceeds the limit only when it holds a single larger tensor
        specs = read_safetensors_header(shard)
        assert sum(s.num_bytes for s in specs.values()) <= SHARD_BYTES or len(specs) == 1
    with HFCheckpointReader(tiny) as a, HFCheckpointReader(sharded) as b:
        assert sorted(a.names) == sorted(b.names)
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)
    model = AutoModelForImageTextToText.from_pretrained(sharded)
    reference = AutoModelForImageTextToText.from_pretrained(tiny)
    for (name, param), (_, ref) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(param, ref), name
    assert AutoProcessor.from_pretrained(sharded).tokenizer.chat_template  # tokenizer, processor, template copied


def test_plan_shards_keeps_order_and_puts_a_large_tensor_alone() -> None:
    specs = [TensorSpec(name, (n,), torch.float32) for name, n in [("a", 10), ("b", 10), ("big", 100), ("c", 5)]]
    shards = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in shard] for shard in shards] == [["a", "b"], ["big"], ["c"]]


def test_not_a_hugging_face_checkpoint(tmp_path: Path) -> None:
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"untyped/config\.json: not a Hugging Face model config \(no model_type\)"):
        HFCheckpointReader(untyped)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty is not a Hugging Face checkpoint: it has no config.json"):
        HFCheckpointReader(empty)


def test_missing_shard(sharded: Path, tmp_path: Path) -> None:
    broken = _copy_dir(sharded, tmp_path / "hf")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"missing shard .*{victim.name}"):
        HFCheckpointReader(broken)


def test_truncated_shard(sharded: Path, tmp_path: Path) -> None:
    broken = _copy_dir(sharded, tmp_path / "hf")
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    os.truncate(victim, victim.stat().st_size - 100)
    with pytest.raises(ValueError, match=f"truncated shard .*{victim.name}.*missing 100 bytes"):
        HFCheckpointReader(broken)


def test_shape_not_matching_config(tiny: Path, tmp_path: Path) -> None:
    broken = _copy_dir(tiny, tmp_path / "hf")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight in model\.safetensors has shape "
                                         r"\[128, 64\], config\.json implies \[96, 64\]"):
        HFCheckpointReader(broken)


def test_exception_mid_write_leaves_no_output(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with HFCheckpointReader(tiny) as reader:
        specs = [reader.spec(name) for name in reader.names]

        def tensors():
            for i, name in enumerate(reader.names):
                if i == 5:
                    raise RuntimeError("disk full")
                yield name, reader.get(name)

        with pytest.raises(RuntimeError, match="disk full"):
            write_hf_checkpoint(out, specs, tensors(), template_dir=tiny)
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import os, signal, sys
from lmmrl_megatron.convert.hf_io import HFCheckpointReader, write_hf_checkpoint
src, out = sys.argv[1], sys.argv[2]
reader = HFCheckpointReader(src)
def tensors():
    for i, name in enumerate(reader.names):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no exception handler, no cleanup runs
        yield name, reader.get(name)
write_hf_checkpoint(out, [reader.spec(n) for n in reader.names], tensors(), template_dir=src, max_shard_bytes=200_000)
"""


def test_killed_writer_leaves_nothing_that_looks_complete(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tiny), str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith("out.tmp-"), leftovers  # the staging dir, never renamed
