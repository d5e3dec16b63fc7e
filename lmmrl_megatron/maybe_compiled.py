"""Element-wise and reduction bodies that run through `torch.compile` on CUDA and eagerly everywhere else.

    kernel = MaybeCompiled(body)      # body: a plain torch function of tensors (and constants)
    out = kernel(x, ...)              # compiled (one Triton kernel or a few) when x is a CUDA tensor

On CUDA with Triton importable, the body goes through `torch.compile(dynamic=True)` (RL batch lengths vary: one
symbolic-shape graph) with the last dimension of every tensor of two or more dimensions marked static: that is
the feature width (hidden, SwiGLU's two halves, head_dim, vocabulary shard), fixed per model, and the bodies
split, concatenate and reduce along it. Each width then gets its own graph (the vision blocks' and the decoder's)
instead of one symbolic graph for both: on the H200 SwiGLU's backward in a 3B text step went from 19.2 to 7.2 ms
of GPU time per step with this (bench/model_step.py --profile, docs/benchmarks.md).

While a CUDA graph is being captured (models/decoder_graphs.py) nothing is compiled: a call that would need a new
graph runs the eager body, which the capture records like any other kernels.

On CPU, without Triton, or after the compiler fails once (logged), the same function runs eagerly, so the CPU
tests exercise the very code the GPU compiles; only the kernel fusion differs.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Callable

import torch
import torch._dynamo

logger = logging.getLogger(__name__)

HAVE_TRITON = importlib.util.find_spec("triton") is not None


class MaybeCompiled:
    """`fn` through `torch.compile` on CUDA tensors when Triton is present; eager otherwise or after a failure."""

    def __init__(self, fn: Callable[..., Any], device_type: str = "cuda") -> None:
        self.fn = fn
        self.device_type = device_type  # "cpu" only in tests: inductor's C++ backend checks the same graphs
        self.compiled: Callable[..., Any] | None = None
        self.enabled = device_type == "cpu" or (HAVE_TRITON and torch.cuda.is_available())

    def compiles_for(self, x: torch.Tensor) -> bool:
        """Whether a call whose first argument is `x` goes through the compiler."""
        return self.enabled and x.device.type == self.device_type

    def __call__(self, *args: Any) -> Any:
        if not self.compiles_for(args[0]):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() >= 2:
                torch._dynamo.mark_static(arg, arg.dim() - 1)
        if args[0].is_cuda and torch.cuda.is_current_stream_capturing():
            # Compiling inside a CUDA graph capture is illegal (the compiler synchronises and benchmarks): a call
            # whose guards miss runs the eager body instead, whose kernels the graph records just as well.
            with torch.compiler.set_stance("eager_on_recompile"):
                return self.compiled(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop training: run eagerly
            logger.warning("torch.compile of %s failed (%r); running it eagerly", self.fn.__name__, exc)
            self.enabled = False
            return self.fn(*args)
