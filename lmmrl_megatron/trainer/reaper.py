"""No process of a run outlives its driver, however the driver ends (a clean exit, an error, `kill -9`).

When the driver starts the local Ray cluster itself it first starts a small watcher process (this module run as
a script, in a session of its own) and marks its environment with a run token (`LMMRL_RUN_TOKEN`) that every
process it then starts inherits. While the driver lives, the watcher records the driver's descendants every
`_POLL_S` seconds: Ray's GCS, raylet, dashboard and runtime-env agents, the workers, whatever those fork or
spawn. Once the driver is gone it kills every recorded process still running (the same pid and start time) and
every process that carries the token (one started in the last moments), then exits. The record is needed
because an orphan loses its ancestry and Ray's agents rewrite their environment area (their process titles);
the token catches what the record missed. A clean `ray.shutdown()` has usually stopped them all already; after a
`kill -9` of the driver, Ray's agents would otherwise live on. Processes of a cluster the run joined
(`RAY_ADDRESS`) are neither its descendants nor marked, and are never touched.

Linux only (it reads /proc); elsewhere `start_reaper` does nothing. Standard library only: the watcher starts in
a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_ENV = "LMMRL_RUN_TOKEN"
_POLL_S = 0.25

_started: str | None = None  # this process's token, once its watcher runs


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which tells a reused
    pid apart; None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def marked_processes(token: str) -> list[int]:
    """Pids of the live processes whose environment carries `TOKEN_ENV=token` (this process excluded)."""
    needle = f"{TOKEN_ENV}={token}".encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes() + b"\0"
        except OSError:  # gone, or a zombie
            continue
        if needle in environ:
            found.append(int(entry.name))
    return found


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, stack = [], list(children.get(pid, []))
    while stack:
        current = stack.pop()
        found.append(current)
        stack += children.get(current, [])
    return found


def kill_marked(token: str, recorded: dict[int, str] | None = None, rounds: int = 20) -> int:
    """SIGKILL every process carrying the token, and every `recorded` pid whose start time still matches, until
    none is left (a dying raylet may still start one); returns how many were killed."""
    killed = 0
    for _ in range(rounds):
        pids = set(marked_processes(token))
        pids |= {pid for pid, started in (recorded or {}).items() if _start_time(pid) == started}
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return killed


def start_reaper() -> str | None:
    """Mark this process's environment with a run token and start its watcher (once per process); returns the
    token, or None where /proc is not available. Call it before starting the processes to be reaped."""
    global _started
    if _started is not None:
        return _started
    if not Path("/proc/self/environ").exists():
        return None
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    subprocess.Popen(
        [sys.executable, "-S", __file__, str(os.getpid()), _start_time(os.getpid()) or "", token],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group (Ctrl-C) must not take the watcher first
        close_fds=True,
    )
    os.environ[TOKEN_ENV] = token
    _started = token
    return token


def _watch(pid: int, start_time: str, token: str) -> None:
    recorded: dict[int, str] = {}
    while (now := _start_time(pid)) is not None and (not start_time or now == start_time):
        for child in descendants(pid):
            if child != os.getpid() and child not in recorded and (started := _start_time(child)) is not None:
                recorded[child] = started
        time.sleep(_POLL_S)
    kill_marked(token, recorded)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
