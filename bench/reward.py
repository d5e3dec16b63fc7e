"""The reward server under load on loopback: requests/s, latency percentiles and failures at 1, 64 and 256
concurrent clients, without and with pathological answers mixed in.

    python bench/reward.py [--clients 1,64,256] [--seconds 10] [--batch-size 4] [--num-workers 2]
                           [--pathological 0,0.05] [--in-process-seconds 10]

It starts `python -m lmmrl_megatron.reward.server` on a free loopback port (a process of its own, as in training)
and drives it from one asyncio loop here: each client holds one keep-alive connection and sends one request after
another, each a batch of `--batch-size` LMM-R1 queries (decoded chatml prompt + response, with labels). A phase
sends for `--seconds`, then waits for the requests in flight (each may take up to 600 s) and counts them too.
Answers mix integers, fractions, intervals, percentages, multiple-choice letters and words, half of them right; a
pathological answer is a power tower, a huge factorial, power or binomial, a 3000-digit number or 60 nested
braces. Every reward is checked against the expected one: a failure is a request that got no 200 reply, a wrong
reward one whose reply differs. `CPU ms/sample` is the CPU time the server and its verifier processes used in
the phase over the samples scored: unlike requests/s it does not depend on what else the machine runs. `load` is
the machine's 1-minute load average at the end of the phase. A first phase times the verifier pool in process,
without HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from lmmrl_megatron.reward.config import RewardConfig  # noqa: E402
from lmmrl_megatron.reward.scorer import RewardScorer  # noqa: E402

# (label, a right answer, a wrong answer)
ANSWER_KINDS = [
    ("{n}", "{n}", "{m}"),
    ("\\frac{{{n}}}{{{d}}}", "{n}/{d}", "\\frac{{{m}}}{{{d}}}"),
    ("({n}, {m}]", "\\left({n},{m}\\right]", "[{n},{m}]"),
    ("{n}\\%", "{n}%", "{m}%"),
    ("B", "(B)", "C"),
    ("red", "Red", "blue"),
]
PATHOLOGICAL = [
    "{n}^{{{n}^{{{n}^{{{n}}}}}}}",
    "\\left(10^{{{n}}}\\right)!",
    "10^{{10^{{{n}}}}}",
    "\\binom{{10^{{{n}}}}}{{5}}",
    "1" * 3000,
    "{{" * 60 + "{n}" + "}}" * 60,
]


@dataclass(frozen=True)
class Sample:
    response: str
    label: str
    expected_reward: float


def make_samples(count: int, pathological_share: float, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        values = {"n": index % 97 + 3, "m": index % 97 + 4, "d": index % 13 + 2}
        if rng.random() < pathological_share:
            answer = PATHOLOGICAL[index % len(PATHOLOGICAL)].format(**values)
            label, expected = "3", 0.5  # well formed (0.5), never right
        else:
            label, right, wrong = ANSWER_KINDS[index % len(ANSWER_KINDS)]
            is_right = rng.random() < 0.5
            answer = (right if is_right else wrong).format(**values)
            label, expected = label.format(**values), 0.5 + (1.0 if is_right else 0.0)
        response = f"<think>Looking at the image, I count carefully.</think><answer>{answer}</answer>"
        samples.append(Sample(response, label, expected))
    return samples


def query(response: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n"
            f"<|im_start|>assistant\n{response}<|im_end|><|endoftext|>")


def request_bodies(samples: list[Sample], batch_size: int) -> list[tuple[bytes, list[float]]]:
    bodies = []
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        batch = samples[start : start + batch_size]
        payload = {"query": [query(s.response) for s in batch], "prompts": ["[]"] * len(batch),
                   "labels": [s.label for s in batch]}
        bodies.append((json.dumps(payload).encode(), [s.expected_reward for s in batch]))
    return bodies


@dataclass
class PhaseStats:
    latencies: list[float] = field(default_factory=list)
    num_samples: int = 0
    num_failures: int = 0
    num_wrong: int = 0
    failure_examples: list[str] = field(default_factory=list)


async def client(host: str, port: int, bodies: list, offset: int, deadline: float, stats: PhaseStats) -> None:
    reader = writer = None
    number = offset
    while time.monotonic() < deadline:
        body, expected = bodies[number % len(bodies)]
        number += 1
        sent = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            status, reply = await asyncio.wait_for(exchange(reader, writer, host, body), timeout=600)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as error:
            stats.num_failures += 1
            if len(stats.failure_examples) < 3:
                stats.failure_examples.append(f"{type(error).__name__}: {error}")
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        stats.latencies.append(time.perf_counter() - sent)
        if status != 200:
            stats.num_failures += 1
            if len(stats.failure_examples) < 3:
                stats.failure_examples.append(f"HTTP {status}: {reply}"[:200])
            continue
        rewards = json.loads(reply)["rewards"]
        stats.num_samples += len(rewards)
        stats.num_wrong += sum(abs(got - want) > 1e-9 for got, want in zip(rewards, expected))
    if writer is not None:
        writer.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                   body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a kept-alive connection; (status, body)."""
    writer.write(b"POST /get_reward HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def run_phase(host: str, port: int, bodies: list, num_clients: int, seconds: float) -> tuple[PhaseStats, float]:
    stats = PhaseStats()
    started = time.monotonic()
    deadline = started + seconds
    step = max(1, len(bodies) // num_clients)
    await asyncio.gather(*(client(host, port, bodies, i * step, deadline, stats) for i in range(num_clients)))
    return stats, time.monotonic() - started


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of a process and its children (the verifier workers), user and system."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_in_process(num_workers: int, seconds: float, batch_size: int) -> None:
    samples = make_samples(4000, 0.0, seed=1)
    with RewardScorer(RewardConfig(num_workers=num_workers)) as scorer:
        scorer.wait_until_ready()
        started = time.perf_counter()
        done = wrong = 0
        while done + batch_size <= len(samples) and time.perf_counter() - started < seconds:
            batch = samples[done : done + batch_size]
            result = scorer.score([s.response for s in batch], [s.label for s in batch])
            wrong += sum(abs(r - s.expected_reward) > 1e-9 for r, s in zip(result.rewards, batch))
            done += batch_size
        elapsed = time.perf_counter() - started
    print(f"in process, {num_workers} workers, one caller, batches of {batch_size}: {done / elapsed:.0f} samples/s "
          f"({2 * done / elapsed:.0f} verifications/s), {wrong} wrong rewards", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,64,256", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each phase sends requests")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per request")
    parser.add_argument("--num-workers", type=int, default=2, help="the server's verifier processes")
    parser.add_argument("--pathological", default="0,0.05", help="comma-separated shares of pathological answers")
    parser.add_argument("--in-process-seconds", type=float, default=10.0, help="0 skips the in-process phase")
    args = parser.parse_args()
    print(f"reward bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{args.num_workers} verifier workers, {args.batch_size} samples per request", flush=True)
    if args.in_process_seconds > 0:
        bench_in_process(args.num_workers, args.in_process_seconds, args.batch_size)
    command = [sys.executable, "-m", "lmmrl_megatron.reward.server", "--port", "0",
               "--num-workers", str(args.num_workers)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment)
    try:
        line = server.stdout.readline()
        if not line.startswith("reward server listening on "):
            raise SystemExit(f"the reward server did not start: {line!r}")
        url = line.split()[-1]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        server_process = psutil.Process(server.pid)
        print(f"{'pathological':>12} {'clients':>7} {'requests':>8} {'req/s':>7} {'samples/s':>9} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'p99 ms':>8} {'failed':>6} {'wrong':>5} {'CPU ms/sample':>13} {'load':>5}", flush=True)
        for share in (float(text) for text in args.pathological.split(",")):
            bodies = request_bodies(make_samples(4096, share, seed=0), args.batch_size)
            for num_clients in (int(text) for text in args.clients.split(",")):
                cpu_before = cpu_seconds(server_process)
                stats, elapsed = asyncio.run(run_phase(host, int(port), bodies, num_clients, args.seconds))
                cpu_per_sample = (cpu_seconds(server_process) - cpu_before) / max(1, stats.num_samples)
                requests = len(stats.latencies)
                print(f"{share:>12.0%} {num_clients:>7} {requests:>8} {requests / elapsed:>7.1f} "
                      f"{stats.num_samples / elapsed:>9.0f} {percentile(stats.latencies, 0.5) * 1000:>8.0f} "
                      f"{percentile(stats.latencies, 0.95) * 1000:>8.0f} {percentile(stats.latencies, 0.99) * 1000:>8.0f} "
                      f"{stats.num_failures:>6} {stats.num_wrong:>5} {cpu_per_sample * 1000:>13.1f} "
                      f"{os.getloadavg()[0]:>5.1f}", flush=True)
                for example in stats.failure_examples:
                    print(f"    failure: {example}", flush=True)
        with urllib.request.urlopen(url + "/health", timeout=30) as reply:
            health = json.loads(reply.read())
        totals = health["totals"]
        print(f"server totals: {health['num_requests']} requests, {totals['num_samples']} samples, "
              f"{totals['num_timeouts']} timeouts, {totals['num_rejected']} rejected by the pre-check, "
              f"{totals['num_errors']} errors, {health['num_worker_restarts']} worker restarts", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
