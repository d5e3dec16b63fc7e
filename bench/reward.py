"""Reward verification throughput: in process (the verifier pool) and through the HTTP server under load.

    python bench/reward.py [--num-samples 2000] [--num-workers 2] [--num-clients 8] [--batch-size 32]
                           [--max-seconds 60]

Everything runs on loopback; each phase stops after `--num-samples` samples or `--max-seconds`, whichever first.
Samples mix integers, fractions, intervals, percentages, multiple-choice letters and words, half of them right.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmmrl_megatron.reward.client import RemoteRewardClient, RetryPolicy  # noqa: E402
from lmmrl_megatron.reward.config import RewardConfig  # noqa: E402
from lmmrl_megatron.reward.scorer import RewardScorer  # noqa: E402
from lmmrl_megatron.reward.server import RewardHTTPServer, RewardService  # noqa: E402

# (label, a right answer, a wrong answer)
ANSWER_KINDS = [
    ("{n}", "{n}", "{m}"),
    ("\\frac{{{n}}}{{{d}}}", "{n}/{d}", "\\frac{{{m}}}{{{d}}}"),
    ("({n}, {m}]", "\\left({n},{m}\\right]", "[{n},{m}]"),
    ("{n}\\%", "{n}%", "{m}%"),
    ("B", "(B)", "C"),
    ("red", "Red", "blue"),
]


@dataclass(frozen=True)
class Sample:
    response: str
    label: str
    expected_reward: float


def make_samples(count: int) -> list[Sample]:
    samples = []
    for index in range(count):
        label, right, wrong = ANSWER_KINDS[index % len(ANSWER_KINDS)]
        values = {"n": index % 97 + 1, "m": index % 97 + 2, "d": index % 13 + 2}
        is_right = (index // len(ANSWER_KINDS)) % 2 == 0
        answer = (right if is_right else wrong).format(**values)
        response = f"<think>Looking at the image, I count carefully.</think><answer>{answer}</answer>"
        samples.append(Sample(response, label.format(**values), 0.5 + (1.0 if is_right else 0.0)))
    return samples


def batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[start : start + size] for start in range(0, len(samples), size)]


def bench_in_process(scorer: RewardScorer, samples: list[Sample], batch_size: int, max_seconds: float) -> None:
    start = time.perf_counter()
    num_done = num_wrong = 0
    for batch in batches(samples, batch_size):
        result = scorer.score([s.response for s in batch], [s.label for s in batch])
        num_wrong += sum(abs(r - s.expected_reward) > 1e-9 for r, s in zip(result.rewards, batch))
        num_done += len(batch)
        if time.perf_counter() - start > max_seconds:
            break
    elapsed = time.perf_counter() - start
    calls = num_done * len(scorer.config.functions)
    print(f"in process : {num_done} samples in {elapsed:.2f} s = {num_done / elapsed:.0f} samples/s, "
          f"{calls / elapsed:.0f} verifications/s; {num_wrong} unexpected rewards")


def bench_server(scorer: RewardScorer, samples: list[Sample], args: argparse.Namespace) -> None:
    server = RewardHTTPServer(("127.0.0.1", 0), RewardService(scorer, "chatml", None))
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    client = RemoteRewardClient(f"http://127.0.0.1:{server.port}", RetryPolicy(timeout_s=60.0, max_retries=0))
    pending = batches(samples, args.batch_size)
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"samples": 0, "wrong": 0}
    deadline = time.perf_counter() + args.max_seconds

    def client_loop() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if not pending:
                    return
                batch = pending.pop()
            queries = [f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{s.response}<|im_end|>" for s in batch]
            sent = time.perf_counter()
            result = client.score(queries, ["q"] * len(batch), [s.label for s in batch])
            took = time.perf_counter() - sent
            wrong = sum(abs(r - s.expected_reward) > 1e-9 for r, s in zip(result.rewards, batch))
            with lock:
                latencies.append(took)
                counts["samples"] += len(batch)
                counts["wrong"] += wrong

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    server.shutdown()
    server.server_close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p95 = latencies[int(len(latencies) * 0.95)] if latencies else float("nan")
    num_done = counts["samples"]
    print(f"server     : {num_done} samples in {len(latencies)} requests from {args.num_clients} clients in "
          f"{elapsed:.2f} s = {num_done / elapsed:.0f} samples/s, "
          f"{num_done * len(scorer.config.functions) / elapsed:.0f} verifications/s; "
          f"request latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; {counts['wrong']} unexpected rewards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    samples = make_samples(args.num_samples)
    config = RewardConfig(num_workers=args.num_workers)
    print(f"reward bench: {args.num_samples} samples, {args.num_workers} verifier workers, functions "
          f"{[(f.name, f.weight) for f in config.functions]}")
    with RewardScorer(config) as scorer:
        scorer.score([samples[0].response], [samples[0].label])  # start the workers outside the timing
        bench_in_process(scorer, samples, args.batch_size, args.max_seconds)
        bench_server(scorer, samples, args)


if __name__ == "__main__":
    main()
