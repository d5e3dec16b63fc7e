"""Where a Qwen2.5-VL training step spends its time: ours (Megatron-Core) against transformers', on one GPU.

    python bench/model_step_diagnose.py                 # GPU: the 3B shape, bf16 (the shapes of bench/model_step.py)
    python bench/model_step_diagnose.py --tiny          # CPU: tiny shape, fp32 (checks the script)
    python bench/model_step_diagnose.py --parity-fp32   # bf16 error of ours and of transformers vs fp32 transformers

Both models live on the GPU with the same weights, so every measurement alternates between them under the same
conditions (clocks, memory state). For each of the text-only and the multimodal 1 x 4096 batch it reports:
- step times measured alternately (hf, ours, hf, ours) to separate real differences from drift;
- forward and backward each as host time (until the Python call returns) and GPU time (CUDA events): a host time
  close to the GPU time means the GPU waits on Python (launch-bound or synchronising);
- the synchronising calls of one step (torch.cuda.set_sync_debug_mode), by source line;
- GPU time per operator (profiler, grouped by input shapes), top entries;
- step time with Python's garbage collector frozen (rules jitter from collection pauses in or out).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import time
import warnings
from typing import Any

import torch

from gpu_timing import Clock, matmul_peak, time_steps  # bench/ is on sys.path when this file runs as a script
from model_step import (
    SHAPES,
    Batch,
    build_hf,
    hf_log_probs,
    init_megatron,
    load_weights_from_hf,
    loss_of,
    make_batch,
    make_step,
    ours_forward,
    step_flops,
    varlen_compat,
)


def log_probs_of(model, batch: Batch, impl: str) -> torch.Tensor:
    return ours_forward(model, batch).log_probs if impl == "ours" else hf_log_probs(model, batch)[0]


def alternate(models: dict[str, Any], batches: dict[str, Batch], shape_name: str, reps: int, warmup: int,
              iters: int, device: str, peak: float) -> list[dict]:
    clock, rows = Clock(device), []
    for rep in range(reps):
        for label, batch in batches.items():
            for impl, model in models.items():
                seconds = sorted(time_steps(make_step(model, batch, impl), clock, warmup, iters))
                model.zero_grad(set_to_none=True)
                mean = sum(seconds) / len(seconds)
                flops = step_flops(SHAPES[shape_name], batch).total
                rows.append(dict(rep=rep, batch=label, impl=impl, mean_ms=mean * 1e3, min_ms=seconds[0] * 1e3,
                                 max_ms=seconds[-1] * 1e3, tokens_per_s=batch.num_tokens / mean,
                                 mfu=flops / mean / peak))
                r = rows[-1]
                print(f"  rep {rep} {label:5s} {impl:5s} mean {r['mean_ms']:7.1f} ms  min {r['min_ms']:7.1f}  "
                      f"max {r['max_ms']:7.1f}  {r['tokens_per_s']:8.0f} tok/s  MFU {r['mfu']:6.1%}", flush=True)
    return rows


def host_device_split(model, batch: Batch, impl: str, device: str, iters: int = 4) -> dict[str, float]:
    """Median host and GPU milliseconds of forward (through the loss) and backward."""
    cuda = device == "cuda"
    samples: dict[str, list[float]] = collections.defaultdict(list)
    make_step(model, batch, impl)()  # warm
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        t0 = time.perf_counter()
        loss = loss_of(log_probs_of(model, batch, impl), batch)
        t1 = time.perf_counter()
        if cuda:
            marks[1].record()
        loss.backward()
        t2 = time.perf_counter()
        if cuda:
            marks[2].record()
            torch.cuda.synchronize()
            samples["fwd_gpu_ms"].append(marks[0].elapsed_time(marks[1]))
            samples["bwd_gpu_ms"].append(marks[1].elapsed_time(marks[2]))
        samples["fwd_host_ms"].append((t1 - t0) * 1e3)
        samples["bwd_host_ms"].append((t2 - t1) * 1e3)
        samples["step_wall_ms"].append((time.perf_counter() - t0) * 1e3)
    model.zero_grad(set_to_none=True)
    return {key: sorted(values)[len(values) // 2] for key, values in samples.items()}


def sync_sites(model, batch: Batch, impl: str, device: str, top: int = 12) -> dict:
    """Synchronising CUDA calls of one step, counted by the Python line that made them."""
    if device != "cuda":
        return dict(count=0, sites=[])
    step = make_step(model, batch, impl)
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.zero_grad(set_to_none=True)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{'/'.join(w.filename.split('/')[-3:])}:{w.lineno}" for w in syncs)
    return dict(count=len(syncs), sites=sites.most_common(top))


def op_profile(model, batch: Batch, impl: str, device: str, top: int = 22) -> dict:
    """GPU time per operator and input shapes in one profiled step (CPU time on a CPU run)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, batch, impl)
    step()
    clock = Clock(device)
    clock.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        clock.sync()
    model.zero_grad(set_to_none=True)
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CPU:
            continue
        ms = (getattr(evt, "self_device_time_total", 0.0) if device == "cuda" else evt.self_cpu_time_total) / 1e3
        if ms > 0:
            rows.append(dict(op=evt.key, shapes=str(evt.input_shapes)[:90], count=evt.count, ms=ms))
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return dict(total_ms=total, top=rows[:top])


def gc_frozen(model, batch: Batch, impl: str, device: str, warmup: int, iters: int) -> dict[str, float]:
    clock, step = Clock(device), make_step(model, batch, impl)
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        seconds = sorted(time_steps(step, clock, warmup, iters))
    finally:
        gc.enable()
        gc.unfreeze()
    model.zero_grad(set_to_none=True)
    return dict(mean_ms=sum(seconds) / len(seconds) * 1e3, min_ms=seconds[0] * 1e3, max_ms=seconds[-1] * 1e3)


def _diffs(ours_lp: torch.Tensor, ref_lp: torch.Tensor, ours_logits: torch.Tensor, ref_logits: torch.Tensor,
           batch: Batch) -> dict[str, float]:
    scored = batch.labels >= 0
    lp = (ours_lp.float() - ref_lp.float())[scored].abs()
    logits = (ours_logits.float() - ref_logits.float()).abs()
    return dict(max_abs_log_prob=float(lp.max()), mean_abs_log_prob=float(lp.mean()),
                max_abs_logit=float(logits.max()), mean_abs_logit=float(logits.mean()))


@torch.no_grad()
def parity_vs_fp32(args: argparse.Namespace) -> dict:
    """bf16 error of each implementation against transformers in fp32 on the same weights, and fp32 parity.

    The weights are drawn once in fp32; the bf16 models hold them rounded. If ours-bf16 is about as far from the
    fp32 reference as transformers-bf16 is, the bf16 differences between the two are rounding, not a mapping bug.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # transformers' Conv3d patch embedding would otherwise run in tf32
    shape, device = SHAPES[args.shape], args.device
    init_megatron(device, 0)
    shim = varlen_compat()
    batch = make_batch(shape, [(shape.seq, shape.image_grids)], device, seed=1)
    vocab = shape.text["vocab_size"]
    hf = build_hf(shape, torch.float32, device, seed=0).eval()
    ref_lp, ref_logits = hf_log_probs(hf, batch)
    ours = load_weights_from_hf(hf, "fp32", device, "none").eval()
    out = ours_forward(ours, batch, return_logits=True)
    report: dict[str, Any] = dict(shim=shim, ours_fp32_vs_hf_fp32=_diffs(out.log_probs, ref_lp, out.logits[..., :vocab],
                                                                          ref_logits, batch))
    del ours, out
    # Parameters only: `hf.to(bf16)` would also round the rotary `inv_freq` buffers, which transformers keeps in
    # fp32 when it builds a bf16 model, and whose rounding alone moves log-probs by up to a nat at 4096 tokens.
    for param in hf.parameters():
        param.data = param.data.to(torch.bfloat16)
    report["hf_buffers"] = sorted({f"{name.split('.')[-1]}:{buf.dtype}" for name, buf in hf.named_buffers()})
    hf_lp, hf_logits = hf_log_probs(hf, batch)
    report["hf_bf16_vs_hf_fp32"] = _diffs(hf_lp, ref_lp, hf_logits, ref_logits, batch)
    ours = load_weights_from_hf(hf, "bf16", device, "none").eval()
    out = ours_forward(ours, batch, return_logits=True)
    report["ours_bf16_vs_hf_fp32"] = _diffs(out.log_probs, ref_lp, out.logits[..., :vocab], ref_logits, batch)
    report["ours_bf16_vs_hf_bf16"] = _diffs(out.log_probs, hf_lp, out.logits[..., :vocab], hf_logits, batch)
    for key, value in report.items():
        print(f"{key}: {json.dumps(value)}", flush=True)
    return report


def run(args: argparse.Namespace) -> dict:
    shape, device = SHAPES[args.shape], args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device == "cuda" else 512)
    print(f"matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    init_megatron(device, 0)
    shim = varlen_compat()
    if shim:
        print(f"WARNING: {shim}")
    hf = build_hf(shape, dtype, device, seed=0)
    ours = load_weights_from_hf(hf, "bf16" if device == "cuda" else "fp32", device, "none")
    models = {"hf": hf.train(), "ours": ours.train()}
    batches = {"text": make_batch(shape, [(shape.seq, [])], device, seed=2),
               "mm": make_batch(shape, [(shape.seq, shape.image_grids)], device, seed=1)}
    report: dict[str, Any] = dict(peak=peak, shim=shim)
    print("\nalternating step times", flush=True)
    report["alternate"] = alternate(models, batches, args.shape, args.reps, args.warmup, args.iters, device, peak)
    for label, batch in batches.items():
        for impl, model in models.items():
            key = f"{label} {impl}"
            split = host_device_split(model, batch, impl, device)
            syncs = sync_sites(model, batch, impl, device)
            frozen = gc_frozen(model, batch, impl, device, args.warmup, args.iters)
            report.setdefault("split", {})[key] = split
            report.setdefault("syncs", {})[key] = syncs
            report.setdefault("gc_frozen", {})[key] = frozen
            print(f"\n[{key}] host/GPU ms: {json.dumps({k: round(v, 1) for k, v in split.items()})}")
            print(f"[{key}] gc frozen: {json.dumps({k: round(v, 1) for k, v in frozen.items()})}")
            print(f"[{key}] {syncs['count']} synchronising calls: {syncs['sites']}", flush=True)
            if label in args.profile_batches:
                prof = op_profile(model, batch, impl, device)
                report.setdefault("ops", {})[key] = prof
                print(f"[{key}] operators by GPU time (total {prof['total_ms']:.1f} ms):")
                for r in prof["top"]:
                    print(f"    {r['ms']:8.2f} ms x{r['count']:<5d} {r['op'][:42]:42s} {r['shapes']}")
                print(end="", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", default="3b")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--profile-batches", default="text,mm")
    parser.add_argument("--parity-fp32", action="store_true",
                        help="only: bf16 error of both implementations against transformers in fp32")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.iters, args.reps = "tiny", 2, 1
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.profile_batches = args.profile_batches.split(",")
    if args.device == "cpu":
        torch.set_num_threads(2)
    report = parity_vs_fp32(args) if args.parity_fp32 else run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
