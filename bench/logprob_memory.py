"""The log-prob path's memory per token and vocabulary column: the planner's `LOGITS_FWD_BYTES` / `LOGITS_BWD_BYTES`.

    python bench/logprob_memory.py                     # GPU: torch.cuda.max_memory_allocated at 4096 x 151936
    python bench/logprob_memory.py --tokens 64         # CPU (no GPU): peak RSS, a fresh process per pass

bf16 logits [tokens, vocab] (this rank's slice, as the output layer gives them) go through
`parallel/vocab_parallel.vocab_parallel_log_probs` as the learner calls it (a temperature, excluded
tokens, the entropy). Forward: the peak while log-probs and entropy are computed; backward: the peak while the
gradient of a loss of both reaches the logits. Each is counted from before the logits exist, so it includes them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package when run as a script

from lmmrl_megatron.parallel.vocab_parallel import vocab_parallel_log_probs  # noqa: E402

VOCAB = 151936  # Qwen2.5-VL's padded vocabulary at TP=1


def _pass(tokens: int, vocab: int, device: torch.device, backward: bool) -> None:
    logits = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab - 64, (tokens,), device=device)
    log_probs, entropy = vocab_parallel_log_probs(
        logits, labels, vocab - 64, temperature=0.7, excluded_token_ids=(5, 6, 7), with_entropy=True
    )
    if backward:
        (log_probs.sum() + 0.01 * entropy.sum()).backward()


def measure_cuda(tokens: int, vocab: int) -> dict[str, float]:
    device = torch.device("cuda")
    _pass(tokens, vocab, device, backward=True)  # warm-up: kernels and the allocator's first blocks
    result = {}
    for name, backward in (("forward", False), ("backward", True)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _pass(tokens, vocab, device, backward)
        torch.cuda.synchronize()
        result[name] = (torch.cuda.max_memory_allocated() - base) / (tokens * vocab)
    return result


def measure_cpu(tokens: int, vocab: int) -> dict[str, float]:
    """Peak RSS over a process that only imported torch, in a fresh process per pass."""
    result = {}
    for name in ("forward", "backward"):
        done = subprocess.run([sys.executable, __file__, "--rss-pass", name, "--tokens", str(tokens),
                               "--vocab", str(vocab)], capture_output=True, text=True, check=True)
        result[name] = float(done.stdout.strip().splitlines()[-1]) / (tokens * vocab)
    return result


def _rss_pass(name: str, tokens: int, vocab: int) -> None:
    _pass(16, 1024, torch.device("cpu"), backward=True)  # warm-up at a small size
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _pass(tokens, vocab, torch.device("cpu"), backward=name == "backward")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--rss-pass", choices=("forward", "backward"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_pass:
        _rss_pass(args.rss_pass, args.tokens, args.vocab)
        return
    measure = measure_cuda if torch.cuda.is_available() else measure_cpu
    bytes_per_column = measure(args.tokens, args.vocab)
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "bytes_per_token_and_column": bytes_per_column}))


if __name__ == "__main__":
    main()
