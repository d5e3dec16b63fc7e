"""Resuming is exact, deaths end cleanly or restart, and storage and data problems read as one line.

All runs are the tiny RLOO run of test_end_to_end with the reference model on (kl_coef > 0, so KL is not
trivially 0), compared with one uninterrupted 5-step run figure by figure, bit for bit: every logged metric but
the wall-clock timings, grad_norm and the optimizer's step count included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lmmrl_megatron.cli.train import main as train_main
from tests.trainer.e2e import REPO, base_overrides, make_config, read_metrics, run, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

# The reference on (KL); the entropy bonus and a large lr move the actor away from it even when every reward of
# this toy task is equal (zero advantages).
KL = ("algorithm.kl_coef=0.01", "algorithm.entropy_coef=0.01", "trainer.actor.lr=1e-2")
NUM_STEPS = 5


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> list[dict]:
    records = run(make_config(assets, tmp_path_factory.mktemp("whole"), *KL, f"trainer.max_steps={NUM_STEPS}"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert all(r["kl"] != 0 for r in records[1:]), records  # the reference is on and the actor has moved from it
    # The optimizer counts one step per mini-batch (one per RL step here), however it got there.
    assert [r["optimizer_step"] for r in records] == [float(s) for s in range(1, NUM_STEPS + 1)]
    return without_timings(records)


def assert_same_run(records: list[dict], reference: list[dict]) -> None:
    records = without_timings(records)
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        assert got.keys() == want.keys(), (got["step"], got.keys() ^ want.keys())
        differ = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not differ, f"step {got['step']}: {differ}"


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(assets, tmp_path: Path, uninterrupted) -> None:
    split = tmp_path / "split"
    run(make_config(assets, split, *KL, "trainer.max_steps=2"))
    resumed = run(make_config(assets, split, *KL, f"trainer.max_steps={NUM_STEPS}", "checkpoint.resume=auto"))
    assert_same_run(resumed, uninterrupted)  # steps 1-2 from the first run, 3-5 after the resume


def test_a_killed_policy_worker_restarts_to_the_same_metrics(assets, tmp_path: Path, uninterrupted, monkeypatch, capsys) -> None:
    from lmmrl_megatron.trainer.supervisor import train

    monkeypatch.setenv("LMMRL_FAULT", "kill_policy_worker@3")  # SIGKILL the last policy rank in step 3
    config = make_config(
        assets, tmp_path / "killed", *KL, f"trainer.max_steps={NUM_STEPS}", "checkpoint.save_steps=2",
        "trainer.max_restarts=1",
    )
    train(config)
    err = capsys.readouterr().err
    assert "lmmrl-train: restart 1/1: policy worker rank 1 died" in err, err
    assert "step_00000002" in err  # resumed from the last complete checkpoint
    assert (tmp_path / "killed" / "restarts.jsonl").read_text().count("\n") == 1
    assert_same_run(read_metrics(tmp_path / "killed"), uninterrupted)


def test_a_death_without_restarts_ends_with_the_death(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LMMRL_FAULT", "kill_policy_worker@1:0")
    args = base_overrides(assets, tmp_path / "dies") + ["trainer.max_steps=1"]
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(REPO / "configs" / "rloo_tiny.yaml"), *args])
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lmmrl-train: policy worker rank 0 died during"), last
    import ray

    # Cleanup survived the dead actor: the run's actors are gone and its placement group is removed, so the
    # cluster has all its resources back; the cluster itself was the test's, and the trainer leaves it up.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


# ---------------------------------------------------------------------------------------------- one-line errors
def train_cli(assets, run_dir: Path, *overrides: str, capsys) -> str:
    """Run lmmrl-train in this process; it must exit 1 with one line: return that line."""
    args = base_overrides(assets, run_dir) + list(overrides)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(REPO / "configs" / "rloo_tiny.yaml"), *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmmrl-train: "), err
    return last


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_bad_record_is_one_line(assets, tmp_path: Path, capsys) -> None:
    data = assets["data"].parent / "bad.jsonl"
    good = assets["data"].read_text().splitlines()
    data.write_text("\n".join(good[:3] + ['{"message": oops'] + good[3:]) + "\n")
    line = train_cli(assets, tmp_path / "run", f"data.prompt_data=[{data}]", "data.bad_input=error", capsys=capsys)
    assert line.startswith(f"lmmrl-train: data: {data}:4: malformed_json"), line


def test_a_read_only_checkpoint_folder_is_found_at_start(assets, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        line = train_cli(assets, folder / "run", capsys=capsys)
    assert "is not writable: Read-only file system" in line, line


def test_too_little_space_is_found_at_start(assets, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "small", "1m") as folder:
        line = train_cli(assets, folder / "run", capsys=capsys)
    assert "not enough free space for a checkpoint" in line and "MiB" in line, line


def test_a_disk_that_fills_mid_save_says_so(assets, tmp_path: Path, capsys) -> None:
    # Room for one checkpoint (~5.5 MiB) but not two: the start's check passes, step 2's save fills the disk.
    with tmpfs(tmp_path / "full", "9m") as folder:
        line = train_cli(assets, folder / "run", "checkpoint.save_steps=1", "checkpoint.keep_last=2", capsys=capsys)
        checkpoints = folder / "run" / "checkpoints"
        names = sorted(p.name for p in checkpoints.iterdir())
    assert "cannot save the checkpoint of step 2" in line and "No space left on device" in line, line
    assert names == ["latest", "step_00000001"], names  # the failed save's debris is gone, step 1 is intact


# ---------------------------------------------------------------------------------------------- a killed driver
def _alive(procs: dict[int, psutil.Process]) -> list[str]:
    left = []
    for proc in procs.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_driver_killed_mid_save_leaves_no_process_and_resumes(assets, tmp_path: Path, uninterrupted) -> None:
    """lmmrl-train as a user runs it, with its own Ray cluster, killed (SIGKILL) while saving step 2."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmmrl_megatron.cli.train", "--config", str(REPO / "configs" / "rloo_tiny.yaml"),
           *base_overrides(assets, run_dir), *KL, "checkpoint.save_steps=1"]
    env = dict(os.environ, LMMRL_FAULT="kill_driver@2")
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: a full pipe would stall the driver
    driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}
    while driver.poll() is None:  # every process the run starts, while it runs
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(driver.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        time.sleep(0.1)
    log.close()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert len(seen) >= 5, seen  # Ray's own processes, the workers
    deadline = time.monotonic() + 30
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(seen), _alive(seen)

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_00000001" / "COMPLETE").is_file()
    assert (checkpoints / ".tmp-step_00000002").is_dir()  # the interrupted save

    resumed = subprocess.run([*cmd, "checkpoint.resume=auto"], env=dict(env, LMMRL_FAULT=""), capture_output=True,
                             text=True, timeout=800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert_same_run(read_metrics(run_dir), uninterrupted[:2])  # step 2 redone from step 1's checkpoint
