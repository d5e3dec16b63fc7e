"""The converters' refusals and their atomic output, and the command-line tools end to end.

Everything here runs in one process (the converters need no ranks) except the crash test, which kills a real
converter subprocess mid-write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_hf_to_mcore, convert_mcore_to_hf
from lmmrl_megatron.models.registry import family_of_hf_dir
from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint
from tests.convert.qwen_workers import assert_same_state, hf_state

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_vl", tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def converted(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    return convert_hf_to_mcore(ConvertOptions(src=str(tiny), out=str(out), progress=False), family_of_hf_dir)


def test_layouts_the_model_cannot_take_are_refused_before_writing(tiny: Path, tmp_path: Path) -> None:
    def convert(out: str, layout: ShardLayout) -> None:
        convert_hf_to_mcore(ConvertOptions(src=str(tiny), out=str(tmp_path / out), layout=layout, progress=False),
                            family_of_hf_dir)

    with pytest.raises(ValueError, match="do not split evenly|cannot be split"):
        convert("a", ShardLayout(pp=3))
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of tp=8"):
        convert("b", ShardLayout(tp=8))
    assert not list(tmp_path.iterdir())


def test_a_model_no_family_knows_is_refused_by_name(tiny: Path, tmp_path: Path) -> None:
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"llama/config\.json: model_type is 'llama', not a model this trainer knows "
                                         r"\(one of \['qwen2_5_vl', 'qwen2_vl'\]\)"):
        convert_hf_to_mcore(ConvertOptions(src=str(llama), out=str(tmp_path / "out"), progress=False), family_of_hf_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_existing_output_needs_overwrite(tiny: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        convert_mcore_to_hf(ConvertOptions(src=str(converted), out=str(out), progress=False), family_of_hf_dir)
    convert_mcore_to_hf(ConvertOptions(src=str(converted), out=str(out), overwrite=True, progress=False), family_of_hf_dir)
    assert not (out / "stale.txt").exists()
    assert_same_state(hf_state(out), hf_state(tiny), "overwritten output")


def test_mcore_side_errors_name_the_problem(tiny: Path, converted: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a Megatron-Core distributed checkpoint"):
        convert_mcore_to_hf(ConvertOptions(src=str(tiny), out=str(tmp_path / "a"), progress=False), family_of_hf_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in converted.iterdir():
        if path.is_file():
            (bare / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="holds no hf_template/config.json; pass --hf-template"):
        convert_mcore_to_hf(ConvertOptions(src=str(bare), out=str(tmp_path / "b"), progress=False), family_of_hf_dir)
    # A template whose config disagrees with the checkpoint's tensors: the shape error names the tensor.
    wrong = tmp_path / "wrong-template"
    wrong.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"linear_fc1.weight' has global shape \[4, 256, 64\], the model built from "
                                         r"the config has \[4, 192, 64\]"):
        options = ConvertOptions(src=str(bare), out=str(tmp_path / "c"), hf_template=str(wrong), progress=False)
        convert_mcore_to_hf(options, family_of_hf_dir)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.tmp-*"))


_KILLED_CONVERTER = """
import os, signal, sys
from lmmrl_megatron.convert import hf_io
from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_hf_to_mcore
from lmmrl_megatron.models.registry import family_of_hf_dir
calls = [0]
original = hf_io.HFCheckpointReader.get
def get(self, name):
    calls[0] += 1
    if calls[0] == 20:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash half way: no handler, no cleanup
    return original(self, name)
hf_io.HFCheckpointReader.get = get
convert_hf_to_mcore(ConvertOptions(src=sys.argv[1], out=sys.argv[2], progress=False), family_of_hf_dir)
"""


def test_converter_killed_mid_write_leaves_no_checkpoint(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_CONVERTER, str(tiny), str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    (staging,) = tmp_path.iterdir()
    assert staging.name.startswith("ckpt.tmp-") and not (staging / "metadata.json").exists()


def test_command_line_tools_round_trip(tiny: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tools = REPO / "tools" / "convert_ckpt"
    help_text = subprocess.run([sys.executable, tools / "mcore_to_hf.py", "--help"], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert "Memory bound" in help_text and "--layers-per-step" in help_text
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    subprocess.run([sys.executable, tools / "hf_to_mcore.py", "--hf", tiny, "--out", mcore, "--tp", "2", "--pp", "2",
                    "--no-progress"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, tools / "mcore_to_hf.py", "--mcore", mcore, "--out", hf, "--max-shard-gb", "0.0002",
                    "--no-progress"], env=env, check=True, capture_output=True)
    assert len(list(hf.glob("model-*.safetensors"))) > 1
    assert_same_state(hf_state(hf), hf_state(tiny), "command-line round trip")
    failed = subprocess.run([sys.executable, tools / "hf_to_mcore.py", "--hf", tmp_path, "--out", tmp_path / "x"],
                            env=env, capture_output=True, text=True)
    assert failed.returncode == 2 and "has no config.json" in failed.stderr
