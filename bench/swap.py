"""The colocated swap on its own: a policy's optimizer state to host memory and back, against a plain pinned copy.

    python bench/swap.py                                   # GPU: the 3B-shaped Qwen2.5-VL policy, bf16, Adam
    python bench/swap.py --device cpu --shape tiny         # CPU: the same code path at a tiny shape (a smoke test)
    python bench/swap.py --out swap.md                     # also write the table (.json: every figure as JSON)

The policy is built with random weights on the device (no checkpoint) and wrapped in the trainer's learner
(Megatron DDP, the distributed optimizer, as a one-GPU run); one train step on a short text sample creates
Adam's moments. Then `learner.offload()` / `learner.onload()` (learner/swap.py) are timed `--repeats` times each:
the first offload also allocates and pins the host chunks (its `alloc s`, reported apart). `GB/s` is the bytes
moved over the whole call (copies, freeing or re-allocating device storage, the gradient buffers' free and
re-zeroing). The reference is a plain copy of the same bytes between one device tensor and those pinned chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repo's package

from model_step import SHAPES, hf_config, init_megatron  # noqa: E402 - bench/ is on sys.path as the script's dir

TARGET_GBPS = 20.0  # issue 17: each way, on an H200


def build_learner(shape_name: str, device: str, dtype: str):
    from lmmrl_megatron.config.sections import OptimizerConfig
    from lmmrl_megatron.learner.megatron_learner import MegatronLearner
    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions, QwenVLConfig
    from lmmrl_megatron.models.qwen_vl.model import QwenVLModel
    from lmmrl_megatron.models.qwen_vl.policy import qwen_vl_forward
    from lmmrl_megatron.parallel.layout import ShardLayout

    qwen_config = QwenVLConfig.from_hf_dict(hf_config(SHAPES[shape_name]).to_dict())
    options = QwenVLBuildOptions(layout=ShardLayout(tp=1, pp=1), dtype=dtype, use_cpu_initialization=device == "cpu")
    model = QwenVLModel(qwen_config, options, pre_process=True, post_process=True)
    if device == "cuda":
        model = model.cuda(torch.cuda.current_device())
    learner = MegatronLearner([model], qwen_vl_forward, qwen_config.text.vocab_size, OptimizerConfig(lr=1e-6),
                            bf16=dtype == "bf16")
    return learner, sum(p.numel() for p in model.parameters())


def train_once(learner, shape_name: str, device: str) -> dict[str, float]:
    """One optimizer step on a 64 + 64 token text sample: enough for Adam's state to exist."""
    from lmmrl_megatron.learner.micro_batch import collate
    from lmmrl_megatron.learner.rollout_batch import PromptInputs, RolloutBatch

    gen = torch.Generator().manual_seed(0)
    below = SHAPES[shape_name].ids["bos"]  # ordinary text ids
    prompt = PromptInputs(torch.randint(0, below, (64,), generator=gen))
    response = torch.randint(0, below, (64,), generator=gen)
    batch = RolloutBatch.from_rows([prompt], [0], [response], advantages=[torch.ones(64)])
    micro_batch = collate(batch, [0]).to(device)

    def loss_fn(logprobs, entropy, mb):
        return -(logprobs * mb.loss_mask).sum() / mb.loss_mask.sum(), {}

    return learner.train_step([micro_batch], loss_fn)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_copy(chunks: list[torch.Tensor], num_bytes: int, device: str, repeats: int) -> dict[str, list[float]]:
    """GB/s of copying `num_bytes` between one device tensor and the host chunks, chunk by chunk, each way."""
    out: dict[str, list[float]] = {"offload": [], "onload": []}
    if num_bytes == 0:
        return out
    flat = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    pieces, offset = [], 0
    for chunk in chunks:
        n = min(chunk.numel(), num_bytes - offset)
        if n == 0:
            break
        pieces.append((chunk[:n], flat[offset : offset + n]))
        offset += n
    for _ in range(repeats):
        for direction in ("offload", "onload"):
            _sync(device)
            start = time.perf_counter()
            for host, dev in pieces:
                (host.copy_(dev, non_blocking=True) if direction == "offload" else dev.copy_(host, non_blocking=True))
            _sync(device)
            out[direction].append(offset / (time.perf_counter() - start) / 1e9)
    del flat
    return out


def measure(args: argparse.Namespace) -> dict:
    device, dtype = args.device, args.dtype
    init_megatron(device, args.seed)
    start = time.perf_counter()
    learner, num_params = build_learner(args.shape, device, dtype)
    built_s = time.perf_counter() - start
    metrics = train_once(learner, args.shape, device)
    print(f"built {num_params / 1e6:.1f} M parameters in {built_s:.1f} s; one train step: grad_norm "
          f"{metrics['grad_norm']:.3g}", flush=True)
    mem = (lambda: torch.cuda.memory_allocated() / 2**30) if device == "cuda" else (lambda: None)
    rows = []
    for run in range(1, args.repeats + 1):
        for direction in ("offload", "onload"):
            before = mem()
            _sync(device)
            stats = learner.offload() if direction == "offload" else learner.onload()
            rows.append({"direction": direction, "run": run, "gb": stats.bytes / 1e9, "copy_s": stats.copy_s,
                         "memory_s": stats.memory_s, "alloc_s": stats.alloc_s, "total_s": stats.seconds,
                         "gbps": stats.gbps, "mem_before_gib": before, "mem_after_gib": mem()})
            print(f"  {direction} {run}: {stats.bytes / 1e9:.3f} GB in {stats.seconds:.3f} s = {stats.gbps:.1f} GB/s",
                  flush=True)
    chunks = learner.host_swap.chunks  # after the last onload their contents are dead: the reference may overwrite them
    num_bytes = int(rows[0]["gb"] * 1e9)
    if device == "cuda":  # the same bytes if they fit beside the onloaded state, else what does
        num_bytes = max(0, min(num_bytes, torch.cuda.mem_get_info()[0] - (2 << 30)))
    reference = plain_copy(chunks, num_bytes, device, args.repeats)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": args.shape, "dtype": dtype, "params_b": num_params / 1e9, "torch": torch.__version__,
        "pinned": bool(chunks and chunks[0].is_pinned()), "host_chunks": len(chunks),
        "rows": rows, "reference_gb": num_bytes / 1e9, "reference_gbps": reference,
    }


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(report: dict) -> str:
    ref = report["reference_gbps"]
    lines = [
        f"device: {report['device']}; shape {report['shape']} ({report['params_b'] * 1e3:.1f} M parameters, "
        f"{report['dtype']}); torch {report['torch']}; host chunks: {report['host_chunks']}, pinned: "
        f"{report['pinned']}",
        "",
        "| direction | run | GB | copy s | memory s | alloc s | total s | GB/s | device GiB before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['direction']} | {r['run']} | {r['gb']:.3f} | {r['copy_s']:.3f} | {r['memory_s']:.3f} | "
                     f"{r['alloc_s']:.3f} | {r['total_s']:.3f} | {r['gbps']:.1f} | "
                     f"{_gib(r['mem_before_gib'])} -> {_gib(r['mem_after_gib'])} |")
    lines += ["", f"plain {'pinned ' if report['pinned'] else ''}copy of {report['reference_gb']:.3f} GB, GB/s per run: "
              f"device->host {', '.join(f'{x:.1f}' for x in ref['offload'])}; "
              f"host->device {', '.join(f'{x:.1f}' for x in ref['onload'])}"]
    for direction in ("offload", "onload"):
        steady = [r["gbps"] for r in report["rows"] if r["direction"] == direction and r["alloc_s"] == 0]
        if steady and ref[direction]:
            verdict = "meets" if min(steady) >= TARGET_GBPS else "misses"
            lines.append(f"{direction}: {min(steady):.1f}-{max(steady):.1f} GB/s = {max(steady) / max(ref[direction]):.0%} "
                         f"of the plain copy (runs without the host allocation); {verdict} the {TARGET_GBPS:.0f} GB/s "
                         f"target")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the table here (.json: the figures as JSON)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    report = measure(args)
    text = table(report)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) if out.suffix == ".json" else text + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
