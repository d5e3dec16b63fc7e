"""The two heaviest non-matmul pieces of a decoder training step, each implementation side by side on one GPU.

    python bench/kernels.py --out kernels.md               # GPU: Qwen2.5-VL 3B / 7B attention shapes, 3B vocab
    python bench/kernels.py --device cpu --tokens 256      # CPU smoke test of the same code (timings mean nothing)

1. Causal self-attention, forward + backward, of one 4096-token sample with the decoder's head layout (3B: 16
   query / 2 KV heads of 128; 7B: 28 / 4), through each SDPA backend PyTorch has: flash, cuDNN, memory-efficient,
   each with KV shared by `enable_gqa` and with KV repeated to the query heads (what a kernel without GQA needs).
   A backend that refuses the inputs is listed as such. Error: max |difference| of the output and of dq/dk/dv
   against the fp32 math kernel on the same inputs.
2. Label log-probs of [tokens, vocab] bf16 logits, forward + backward: our `vocab_parallel_log_probs` (the
   trainer's loss path) against `F.cross_entropy` over fp32 logits (what transformers' loss does).
3. The fused decoder's element-wise bodies (models/qwen_vl/fused.py) as `MaybeCompiled` runs them (feature width
   static), through `torch.compile(dynamic=True)` with every dimension symbolic, and eagerly.

Each row: mean ms of `--iters` timed runs after `--warmup`, and TFLOP/s for attention (causal: 2 * 2 * s^2 * H * d
/ 2 forward, 2.5x that backward).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_timing import Clock, time_steps  # noqa: E402

SHAPES = {"3b": (16, 2, 128), "7b": (28, 4, 128)}
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def mean_ms(fn: Callable[[], object], clock: Clock, warmup: int, iters: int) -> float:
    return 1e3 * sum(time_steps(fn, clock, warmup, iters)) / iters


def attention_inputs(tokens: int, heads: int, kv_heads: int, dim: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, heads, tokens, dim, generator=gen).to(device, dtype)
    return q, k, v, grad


def _sdpa(q, k, v, backend: SDPBackend | None, gqa: bool) -> torch.Tensor:
    """Causal SDPA through one backend (None: fp32 math), KV shared by `enable_gqa` or repeated to the heads."""
    rep = q.size(1) // k.size(1)
    kk, vv = (k, v) if gqa else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    kwargs = {"enable_gqa": True} if gqa and rep > 1 else {}
    with sdpa_kernel([backend if backend is not None else SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **kwargs)


def run_attention(q, k, v, grad, backend: SDPBackend | None, gqa: bool) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = _sdpa(q, k, v, backend, gqa)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def attention_rows(args: argparse.Namespace, clock: Clock) -> list[str]:
    rows = []
    for name in args.shapes.split(","):
        heads, kv_heads, dim = SHAPES[name]
        q, k, v, grad = attention_inputs(args.tokens, heads, kv_heads, dim, args.device, args.dtype)
        ref = run_attention(*(t.float() for t in (q, k, v, grad)), None, gqa=False)
        flops_fwd = 2 * 2 * args.tokens**2 * heads * dim / 2
        for label, backend in BACKENDS.items():
            for gqa in (True, False):
                try:
                    got = run_attention(q, k, v, grad, backend, gqa)
                except RuntimeError as exc:
                    rows.append(f"| {name} | {label} | {'gqa' if gqa else 'repeat'} | refused: "
                                f"{str(exc).splitlines()[0][:60]} | | | |")
                    continue
                err = max(float((a.float() - b).abs().max()) for a, b in zip(got, ref))
                fwd = mean_ms(lambda: _forward_only(q, k, v, backend, gqa), clock, args.warmup, args.iters)
                both = mean_ms(lambda: run_attention(q, k, v, grad, backend, gqa), clock, args.warmup, args.iters)
                rows.append(f"| {name} | {label} | {'gqa' if gqa else 'repeat'} | {fwd:.3f} | {both:.3f} | "
                            f"{3.5 * flops_fwd / both / 1e9:.0f} | {err:.2e} |")
    return rows


def _forward_only(q, k, v, backend, gqa):
    with torch.no_grad():
        return _sdpa(q, k, v, backend, gqa)


def log_prob_rows(args: argparse.Namespace, clock: Clock) -> list[str]:
    from lmmrl_megatron.parallel.vocab_parallel import vocab_parallel_log_probs

    gen = torch.Generator(device="cpu").manual_seed(1)
    logits = (3 * torch.randn(args.tokens, args.vocab, generator=gen)).to(args.device, args.dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(args.device)

    def ours():
        x = logits.detach().requires_grad_()
        lp, _ = vocab_parallel_log_probs(x, labels, args.vocab)
        lp.sum().neg().backward()
        return lp, x.grad

    def cross_entropy():
        x = logits.detach().requires_grad_()
        lp = -F.cross_entropy(x.float(), labels, reduction="none")
        lp.sum().neg().backward()
        return lp, x.grad

    (lp_a, g_a), (lp_b, g_b) = ours(), cross_entropy()
    diff = f"log-prob {float((lp_a - lp_b).abs().max()):.2e}, grad {float((g_a.float() - g_b.float()).abs().max()):.2e}"
    del lp_a, lp_b, g_a, g_b  # the peaks below hold one pass each
    rows = []
    for label, fn in (("ours (vocab_parallel_log_probs)", ours), ("F.cross_entropy over fp32", cross_entropy)):
        torch.cuda.reset_peak_memory_stats() if args.device == "cuda" else None
        ms = mean_ms(fn, clock, args.warmup, args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        rows.append(f"| {label} | {ms:.2f} | {peak:.2f} | {diff} |")
    return rows


def _bytes(*tensors) -> int:
    flat = [t for item in tensors for t in (item if isinstance(item, (tuple, list)) else (item,))]
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def elementwise_rows(args: argparse.Namespace, clock: Clock) -> list[str]:
    """The fused decoder's element-wise bodies on the 3B text shapes: ms and achieved GB/s (inputs + outputs),
    through MaybeCompiled (feature width static), through torch.compile with every dimension symbolic, and eager."""
    from lmmrl_megatron.maybe_compiled import MaybeCompiled
    from lmmrl_megatron.models.qwen_vl import fused

    t, dt, dev = args.tokens, args.dtype, args.device
    gen = torch.Generator(device="cpu").manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    x_mlp, g_mlp = rand(t, 1, 2 * 11008), rand(t, 1, 11008)
    q, k, cos, sin = rand(t, 1, 16, 128), rand(t, 1, 2, 128), rand(t, 1, 1, 128), rand(t, 1, 1, 128)
    h, w = rand(t, 1, 2048), rand(2048)
    cases = {
        "swiglu forward": (fused._swiglu_forward, (x_mlp,)),
        "swiglu backward": (fused._swiglu_backward, (g_mlp, x_mlp)),
        "rope forward (q, k)": (fused._rope_forward, (q, k, cos, sin)),
        "rope backward (q, k)": (fused._rope_backward, (q, k, cos, sin)),
        "rmsnorm forward": (fused._rms_norm_forward, (h, w, 1e-6)),
        "rmsnorm backward": (fused._rms_norm_backward, (h, h, w, 1e-6)),
    }
    rows = []
    for label, (fn, inputs) in cases.items():
        moved = _bytes(inputs, fn(*inputs))
        figures = []
        static = MaybeCompiled(fn, device_type=dev)
        # Its own code object (dynamo caches per code object) and fresh tensors (mark_static marks the tensor).
        twin = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_symbolic"), fn.__globals__)
        symbolic = torch.compile(twin, dynamic=True)
        fresh = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        for run in (lambda: static(*inputs), lambda: symbolic(*fresh), lambda: fn(*inputs)):
            ms = mean_ms(run, clock, args.warmup, args.iters)
            figures.append(f"{ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s")
        rows.append(f"| {label} | {moved / 2**20:.0f} | " + " | ".join(figures) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="3b,7b")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu":
        args.vocab = min(args.vocab, 4096)
    clock = Clock(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"device: {name}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; "
             f"{args.tokens} tokens; {args.dtype}", "",
             "| shape | backend | KV | forward ms | fwd+bwd ms | fwd+bwd TFLOP/s | max err vs fp32 math |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += attention_rows(args, clock)
    lines += ["", f"| log-probs of {args.tokens} x {args.vocab} logits | fwd+bwd ms | peak GiB | ours vs cross_entropy |",
              "| --- | --- | --- | --- |"]
    lines += log_prob_rows(args, clock)
    lines += ["", f"| element-wise body, {args.tokens} tokens (3B) | MiB moved | static width (ours) | "
              "all dimensions symbolic | eager |", "| --- | --- | --- | --- | --- |"]
    lines += elementwise_rows(args, clock)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
