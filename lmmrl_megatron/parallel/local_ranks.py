"""Run a function in N local processes with gloo and Megatron-Core's parallel state: the CPU tests and
`lmmrl-parity`'s CPU mode use it.

    results = run_distributed(check_forward, world_size=4, tp=2, pp=2, args=(ckpt_dir,))

`fn` must be importable by name (a module-level function): the workers unpickle it. Each worker gets the
CPU backend, `torch.distributed` on gloo, `parallel_state.initialize_model_parallel(tp, pp)` and
Megatron's model-parallel seeds; its return value comes back in rank order. An exception in any worker fails the
call with that worker's traceback; a hung worker is killed at the timeout.

Workers are forked from a fork server that imported torch, Megatron-Core and transformers once (`PRELOAD`):
a fresh interpreter per worker would spend ~10 s of CPU on those imports, which on a 2-core machine dominated
the test suite. The server never runs a model, so every worker still starts from clean process state; it gets
the caller's current environment variables, which a fork server would otherwise have frozen at its start.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from lmmrl_megatron.parallel.layout import ShardLayout
from lmmrl_megatron.parallel.megatron_state import init_megatron_parallel


# Imported once by the fork server; workers inherit them. A module that fails to import is skipped by multiprocessing.
PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "transformers",
    "safetensors.torch",
    "lmmrl_megatron.parallel.cpu_backend",
    "lmmrl_megatron.models.qwen_vl.model",
]
_context = None


def _worker_context():
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _worker(
    rank: int,
    world_size: int,
    layout: ShardLayout,
    store_path: str,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    environ: dict[str, str],
) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N workers share a couple of cores; more threads only thrash
    try:
        from lmmrl_megatron.parallel.cpu_backend import install_cpu_backend

        install_cpu_backend()
        # A file rendezvous, not a TCP port: parallel test runs on one machine cannot collide on it.
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
        )
        init_megatron_parallel(layout)
        value = fn(*args)
        # As bytes: a tensor sent as itself is a shared-memory handle that dies with this process, which may
        # exit before the parent reads the queue.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    args: tuple = (),
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks at the given TP x PP layout; return the results by rank."""
    layout = ShardLayout(tp=tp, pp=pp, vpp=vpp)
    layout.data_parallel_size(world_size)  # refuses a world the layout does not divide
    ctx = _worker_context()
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="lmmrl-dist-")
    store_path = os.path.join(store_dir, "store")
    environ = dict(os.environ)
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world_size, layout, store_path, fn, args, results, environ), daemon=True
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    by_rank: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            if ok:
                by_rank[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break  # the other ranks are likely blocked in a collective with the failed one
    except Exception as exc:  # queue.Empty on timeout
        failures.append(f"timed out after {timeout_s}s waiting for ranks {set(range(world_size)) - set(by_rank)}: {exc!r}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
    if failures:
        raise RuntimeError("distributed run failed:\n" + "\n".join(failures))
    return [by_rank[rank] for rank in range(world_size)]
