"""The run's process reaper and the LMMRL_FAULT fault injection."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lmmrl_megatron.trainer import faults
from lmmrl_megatron.trainer.reaper import TOKEN_ENV, kill_marked, marked_processes


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="Linux only")
def test_processes_carrying_the_token_are_found_and_killed() -> None:
    token = "test-" + os.urandom(4).hex()
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ, **{TOKEN_ENV: token}))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while marked.pid not in marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marked_processes(token) == [marked.pid]
        assert kill_marked(token) == 1
        assert marked.wait(timeout=10) == -9
        assert other.poll() is None  # an unmarked process is never touched
    finally:
        other.kill()
        marked.kill()
        other.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="Linux only")
def test_the_watcher_kills_the_marked_processes_once_the_driver_dies(tmp_path) -> None:
    """A driver that starts the reaper, a marked child and a child without the token (as Ray's agents are once
    they rewrite their environment area), then dies by SIGKILL: both children go too."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, signal, subprocess, sys, time\n"
        "from lmmrl_megatron.trainer.reaper import start_reaper\n"
        "start_reaper()\n"
        "sleep = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        "marked = subprocess.Popen(sleep)\n"
        "unmarked = subprocess.Popen(sleep, env={'PATH': os.environ.get('PATH', '')})\n"
        "print(marked.pid, unmarked.pid, flush=True)\n"
        "time.sleep(1.5)  # the watcher records the driver's descendants\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    driver = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    children = [int(pid) for pid in driver.stdout.split()]
    assert len(children) == 2, driver.stderr
    deadline = time.monotonic() + 15
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, children))


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_fault_specs() -> None:
    assert faults.parse_faults("kill_policy_worker@3:1, kill_driver@2") == [
        faults.Fault("kill_policy_worker@3:1", "kill_policy_worker", 3, 1),
        faults.Fault("kill_driver@2", "kill_driver", 2),
    ]
    with pytest.raises(ValueError, match="kill_policy_worker@STEP"):
        faults.parse_faults("kill_everything@1")


def test_faults_fire_once_at_their_point(monkeypatch) -> None:
    killed = []

    class Group:
        workers = [0, 1]

        def kill_rank(self, rank: int) -> None:
            killed.append(rank)

    monkeypatch.setenv(faults.FAULT_ENV, "kill_policy_worker@2")
    monkeypatch.setattr(faults, "_fired", set())
    faults.inject("train", 1, Group())
    faults.inject("save", 2, Group())
    faults.inject("train", 2, Group())
    faults.inject("train", 2, Group())  # a restarted run passes the step
    assert killed == [1]
