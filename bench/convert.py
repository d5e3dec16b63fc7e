"""Benchmark of the checkpoint converters on a random mid-sized Qwen2.5-VL checkpoint: time, GB/s, peak RSS.

    python bench/convert.py [--layers 16] [--vision-depth 8] [--workdir /tmp/lmmrl-bench-convert] [--keep]

The checkpoint has Qwen2.5-VL-3B's widths (hidden 2048, MLP 11008, 16 heads / 2 KV heads, vocabulary 151936, tied
embeddings; vision 1280 wide) with fewer layers (default 16 decoder and 8 vision layers: about 1.75B parameters,
3.5 GB in bf16), so that the three copies on disk and the runs fit a small machine. Each conversion runs in a
fresh subprocess, which reports its own peak resident memory: the streaming bound is then visible as peak RSS far
below the checkpoint size. GB/s is checkpoint bytes over wall time. The round trip is checked bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Runs in a child process: one conversion, then its own wall time and peak RSS as JSON on the last line.
_CHILD = """
import json, sys, time
from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_hf_to_mcore, convert_mcore_to_hf
from lmmrl_megatron.models.registry import family_of_hf_dir
direction, src, out = sys.argv[1:4]
start = time.perf_counter()
if direction == "hf_to_mcore":
    convert_hf_to_mcore(ConvertOptions(src=src, out=out, progress=False), family_of_hf_dir)
elif direction == "mcore_to_hf":
    convert_mcore_to_hf(ConvertOptions(src=src, out=out, progress=False), family_of_hf_dir)
seconds = time.perf_counter() - start
# VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the parent's peak.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_kb": peak_kb}))
"""


def bench_config(num_layers: int, vision_depth: int) -> dict:
    """Qwen2.5-VL-3B's config (hub's flat layout) with `num_layers` decoder and `vision_depth` vision layers."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {
            "depth": vision_depth,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
    }


def write_random_checkpoint(out: Path, config: dict) -> int:
    """A random bf16 checkpoint with the config's exact tensor names and shapes; returns its size in bytes."""
    import torch

    from lmmrl_megatron.convert.hf_io import expected_hf_specs, write_hf_checkpoint

    template = out.parent / "template"
    template.mkdir(parents=True, exist_ok=True)
    (template / "config.json").write_text(json.dumps(config, indent=2))
    specs = [spec.__class__(spec.name, spec.shape, torch.bfloat16) for spec in expected_hf_specs(template).values()]
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for spec in specs:
            yield spec.name, (torch.randn(spec.shape, generator=generator) * 0.02).to(torch.bfloat16)

    write_hf_checkpoint(out, specs, tensors(), template_dir=template, max_shard_bytes=2 * 1024**3)
    return sum(spec.num_bytes for spec in specs)


def run_child(direction: str, src: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, direction, str(src), str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{direction} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_round_trip(original: Path, back: Path) -> int:
    import torch

    from lmmrl_megatron.convert.hf_io import HFCheckpointReader

    with HFCheckpointReader(original, check_config_shapes=False) as a, HFCheckpointReader(back) as b:
        if sorted(a.names) != sorted(b.names):
            raise AssertionError("the round trip changed the set of tensors")
        for name in a.names:
            if not torch.equal(a.get(name), b.get(name)):
                raise AssertionError(f"the round trip changed {name}")
        return len(a.names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/lmmrl-bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf, mcore, back = work / "hf", work / "mcore", work / "hf-back"
    start = time.perf_counter()
    num_bytes = write_random_checkpoint(hf, bench_config(args.layers, args.vision_depth))
    gb = num_bytes / 1e9
    print(f"random checkpoint: {num_bytes / 2 / 1e9:.2f}B parameters, {gb:.2f} GB bf16 "
          f"(written in {time.perf_counter() - start:.0f} s)")
    baseline = run_child("imports_only", hf, work / "unused")
    rows = [("imports only (baseline)", baseline)]
    rows.append(("HF -> Megatron", run_child("hf_to_mcore", hf, mcore)))
    rows.append(("Megatron -> HF", run_child("mcore_to_hf", mcore, back)))
    num_tensors = check_round_trip(hf, back)
    print(f"round trip bit-exact over {num_tensors} tensors\n")
    print(f"| {'direction':<24} | {'seconds':>8} | {'GB/s':>6} | {'peak RSS GB':>11} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|{'-' * 13}|")
    for label, figures in rows:
        seconds = figures["seconds"]
        rate = "" if label.startswith("imports") else f"{gb / seconds:.2f}"
        print(f"| {label:<24} | {seconds:>8.1f} | {rate:>6} | {figures['peak_rss_kb'] / 1024**2:>11.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
