"""lmmrl-parity: check our Megatron Qwen-VL against transformers on a fixed multimodal batch.

    lmmrl-parity --hf DIR --tp 2 --pp 2 [--dtype fp32|bf16] [--device cpu|cuda] [--packed]

Loads the checkpoint with transformers (the reference), builds ours at TP x PP in TP*PP local processes (gloo on
CPU, NCCL with one GPU per process on CUDA), loads the same weights through the shared HF <-> Megatron mapping,
runs the same batch (images of several non-square sizes, two in one sample, a text-only sample, left padding)
and prints the largest absolute and relative differences of the logits and of the per-token log-probabilities of
the labels over real tokens. Exit code 1 when a difference exceeds the dtype's tolerance
(fp32: logits 1e-3, log-probs 1e-4; bf16: logits 0.5, log-probs 0.25), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch

from lmmrl_megatron.models.qwen_vl.parity import (
    TOLERANCES,
    ParityReport,
    build_parity_batch,
    compare,
    from_bytes,
    hf_reference,
    megatron_forward,
)


def _cuda_worker(
    rank: int, world_size: int, tp: int, pp: int, store: str, fn: Callable, args: tuple, queue
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        from megatron.core import parallel_state, tensor_parallel

        torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world_size)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        queue.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports the worker's traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_on_gpus(fn: Callable, tp: int, pp: int, args: tuple, timeout_s: float = 1800.0) -> list[Any]:
    """`fn(*args)` on TP*PP processes, one GPU each, with Megatron's parallel state; results by rank."""
    import torch.multiprocessing as mp

    world_size = tp * pp
    if torch.cuda.device_count() < world_size:
        raise ValueError(f"--tp {tp} --pp {pp} needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # A file rendezvous: no port to pick, no collision with another job on the machine.
    store = os.path.join(tempfile.mkdtemp(prefix="lmmrl-parity-"), "store")
    procs = [
        ctx.Process(target=_cuda_worker, args=(rank, world_size, tp, pp, store, fn, args, queue), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)
    return [results[rank] for rank in range(world_size)]


def _print_report(report: ParityReport, dtype: str, ok: bool) -> None:
    logits_tol, log_prob_tol = TOLERANCES[dtype]
    print(f"tokens compared: {report.num_tokens}")
    print(f"logits:    max abs {report.max_abs_logits:.3e}  max rel {report.max_rel_logits:.3e}  (tol abs {logits_tol:g})")
    print(
        f"log-probs: max abs {report.max_abs_log_probs:.3e}  max rel {report.max_rel_log_probs:.3e}  "
        f"mean abs {report.mean_abs_log_probs:.3e}  (tol abs {log_prob_tol:g})"
    )
    print("PASS" if ok else "FAIL: differences above the tolerance")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmmrl-parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="a Qwen2-VL / Qwen2.5-VL Hugging Face checkpoint directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--packed", action="store_true", help="run ours on the packed (padding-free) path")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.exit(2, "lmmrl-parity: --tp and --pp must be >= 1\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "lmmrl-parity: --device cuda but no CUDA device is visible\n")
    try:
        batch = build_parity_batch(args.hf)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"lmmrl-parity: {exc}\n")

    worker_args = (str(args.hf), batch, args.dtype, args.packed, args.device)
    if args.device == "cpu":
        from lmmrl_megatron.parallel.local_ranks import run_distributed

        results = run_distributed(megatron_forward, world_size=args.tp * args.pp, tp=args.tp, pp=args.pp,
                                  args=worker_args, timeout_s=1800.0)
    else:
        results = run_on_gpus(megatron_forward, args.tp, args.pp, worker_args)
    ours = from_bytes(next(r for r in results if r is not None))
    reference = hf_reference(args.hf, batch, args.dtype, "cuda:0" if args.device == "cuda" else "cpu")
    report = compare(ours, reference, batch)
    ok = report.within(args.dtype)
    _print_report(report, args.dtype, ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
