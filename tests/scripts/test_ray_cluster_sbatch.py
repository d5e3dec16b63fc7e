"""scripts/slurm/ray_cluster.sbatch run outside SLURM with stub `scontrol`, `srun`, `hostname` and `ray` on PATH:
the node list, the head first, the wait for every worker's registration (workers here join seconds late, or
never), the per-job ports, and the EXIT trap that stops Ray on every node whatever the run's outcome.

The stubs keep state in files: `srun -w NODE cmd` runs cmd with STUB_NODE=NODE; `ray start` registers its node
(after STUB_JOIN_DELAY seconds, never for the nodes in STUB_DEAD) and with --block stays up until killed;
`ray status` lists the registered nodes as Ray prints them; every call is logged.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

SBATCH = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "ray_cluster.sbatch"

STUBS = {
    "scontrol": """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames $SLURM_JOB_NODELIST" ]] || { echo "unexpected scontrol $*" >&2; exit 1; }
for n in $STUB_NODES; do echo "$n"; done
""",
    "srun": """#!/usr/bin/env bash
node=""; while [[ "$1" == -* ]]; do
  case "$1" in -w) node=$2; shift 2;; *) shift;; esac
done
echo "srun $node: $*" >> "$STUB_DIR/log"
STUB_NODE=$node exec "$@"
""",
    "hostname": """#!/usr/bin/env bash
echo "10.0.0.1 fe80::1"
""",
    "ray": """#!/usr/bin/env bash
echo "ray $STUB_NODE: $*" >> "$STUB_DIR/log"
case "$1" in
  start)
    if [[ " $STUB_DEAD " != *" $STUB_NODE "* ]]; then
      delay=0; [[ "$*" == *--head* ]] || delay=${STUB_JOIN_DELAY:-0}
      (sleep "$delay"; echo "$STUB_NODE" >> "$STUB_DIR/registered") >/dev/null 2>&1 &
    fi
    if [[ "$*" == *--block* ]]; then  # up until `ray stop` on this node (or a kill)
      sleep 600 >/dev/null 2>&1 & sp=$!
      echo "$sp" > "$STUB_DIR/pid.$STUB_NODE"
      trap 'kill $sp 2>/dev/null; exit 0' TERM
      wait $sp
    fi ;;
  status)
    [[ -s "$STUB_DIR/registered" ]] || exit 1
    echo "======== Autoscaler status ========"; echo "Node status"; echo "Active:"
    while read -r n; do echo " 1 node_$(echo "$n" | md5sum | cut -c1-12)"; done < "$STUB_DIR/registered"
    echo "Pending:"; echo " (no pending nodes)"; echo "Recent failures:"; echo " (no failures)" ;;
  stop) echo "$STUB_NODE" >> "$STUB_DIR/stopped"
        [[ -f "$STUB_DIR/pid.$STUB_NODE" ]] && kill "$(cat "$STUB_DIR/pid.$STUB_NODE")" 2>/dev/null; true ;;
esac
""",
}

RUN = """#!/usr/bin/env bash
echo "$STUB_NODE $RAY_ADDRESS $(wc -l < "$STUB_DIR/registered") $*" >> "$STUB_DIR/ran"
exit "${STUB_RC:-0}"
"""


def _sbatch(tmp_path: Path, *args: str, job_id: int = 1234, nodes=("gpu-a", "gpu-b", "gpu-c"), **env: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    run = tmp_path / "run.sh"
    run.write_text(RUN)
    environ = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_DIR=str(tmp_path), STUB_NODES=" ".join(nodes),
        SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="gpu-[a-c]", SLURM_GPUS_PER_NODE="h100:8", **env,
    )
    cmd = ["bash", str(SBATCH), *(args or (str(run), "k=v"))]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=120)


def _log(tmp_path: Path) -> list[str]:
    return (tmp_path / "log").read_text().splitlines()


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_head_first_then_workers_waited_for_then_the_run_then_cleanup(tmp_path: Path) -> None:
    done = _sbatch(tmp_path, STUB_JOIN_DELAY="3")
    assert done.returncode == 0, done.stderr
    base = 20000 + (1234 % 400) * 100
    # The run went to the head node, with every node registered, the job's address and its arguments.
    assert (tmp_path / "ran").read_text().split() == ["gpu-a", f"10.0.0.1:{base}", "3", "k=v"]
    log = _log(tmp_path)
    starts = [line for line in log if line.startswith("ray ") and " start " in line]
    assert starts[0].startswith("ray gpu-a: start --head --node-ip-address=10.0.0.1") and f"--port={base}" in starts[0]
    assert sorted(line.split(":")[0] for line in starts[1:]) == ["ray gpu-b", "ray gpu-c"]
    assert all(f"--address=10.0.0.1:{base}" in line for line in starts[1:])
    assert all("--num-gpus=8" in line for line in starts)
    assert "3 of 3 nodes registered" in done.stdout
    assert sorted(_lines(tmp_path / "stopped")) == ["gpu-a", "gpu-b", "gpu-c"]


def test_each_job_gets_its_own_port_set(tmp_path: Path) -> None:
    def ports(job_id: int) -> set[int]:
        work = tmp_path / str(job_id)
        work.mkdir()
        assert _sbatch(work, job_id=job_id).returncode == 0
        return {int(p) for line in _log(work) if " start " in line for p in re.findall(r"port=(\d+)", line)}

    one, two = ports(7), ports(8)
    assert len(one) >= 10 and not one & two
    assert all(20000 <= p < 60000 for p in one | two)


def test_a_worker_that_never_registers_fails_the_job_and_still_cleans_up(tmp_path: Path) -> None:
    done = _sbatch(tmp_path, STUB_DEAD="gpu-c", RAY_WAIT_S="4")
    assert done.returncode != 0
    assert "2 of 3 nodes registered after 4s" in done.stderr
    assert not (tmp_path / "ran").exists()
    assert sorted(_lines(tmp_path / "stopped")) == ["gpu-a", "gpu-b", "gpu-c"]


def test_the_runs_exit_status_is_the_jobs_and_cleanup_runs(tmp_path: Path) -> None:
    done = _sbatch(tmp_path, STUB_RC="3")
    assert done.returncode == 3
    assert "stopped (exit 3)" in done.stdout
    assert sorted(_lines(tmp_path / "stopped")) == ["gpu-a", "gpu-b", "gpu-c"]


@pytest.mark.parametrize("args, env, message", [((), {}, "usage:"), (("run.sh",), {"SLURM_JOB_ID": ""}, "SLURM_JOB_ID")])
def test_bad_invocations_say_what_is_missing(tmp_path: Path, args, env, message) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | env
    done = subprocess.run(["bash", str(SBATCH), *args], env={k: v for k, v in environ.items() if v},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and message in done.stderr
