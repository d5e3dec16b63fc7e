"""Ray placement and the worker groups the controller drives: the Megatron policy ranks and the rollout engines.

Each group wraps a list of Ray actors and exposes typed methods that fan a request out to every member and merge
the answers, so the controller reads like a single-process program. On GPUs one placement group bundle holds one
GPU; with `colocate_all_models` the policy rank and the rollout engine of a bundle share its GPU (each asks for a
fraction of it), otherwise they get bundles of their own. On CPU (`num_gpus_per_node: 0`) the bundles hold
logical CPUs only, and everything runs in local processes.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lmmrl_megatron.config.schema import RunConfig
from lmmrl_megatron.learner.rollout_batch import RolloutBatch, RowValues
from lmmrl_megatron.rollout.engine import GenerationOutput, MultimodalPrompt, SamplingParams
from lmmrl_megatron.trainer.errors import ClusterError

# NVLink multicast can take a shared host's GPUs down; it stays off in every process we start.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "TOKENIZERS_PARALLELISM": "false"}


def num_gpus_needed(config: RunConfig) -> int:
    """GPUs the placement group asks for: the policy ranks, plus the engines' own unless colocated."""
    trainer, rollout = config.trainer, config.rollout
    if trainer.num_gpus_per_node == 0:
        return 0
    engines = 0 if trainer.colocate_all_models else rollout.num_engines * rollout.engine_tp
    return trainer.actor_world_size + engines


def init_ray(config: RunConfig) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local one sized for this run; True when this call
    started Ray (the caller then shuts it down). A local cluster's processes die with this process (see
    trainer/reaper.py), whichever way it ends. Then check that the cluster has the GPUs the run places, before
    anything is built on it."""
    started = False
    if not ray.is_initialized():
        _start_or_join_ray(config)
        started = True
    needed = num_gpus_needed(config)
    available = int(ray.cluster_resources().get("GPU", 0))
    if available < needed:
        if started:
            ray.shutdown()
        raise ClusterError(
            f"the Ray cluster has {available} GPUs; this run places {needed} (trainer.actor_world_size="
            f"{config.trainer.actor_world_size}"
            + ("" if config.trainer.colocate_all_models else " + rollout.num_engines x rollout.engine_tp")
            + f"): start the run on a cluster of trainer.num_nodes={config.trainer.num_nodes} x "
            f"trainer.num_gpus_per_node={config.trainer.num_gpus_per_node} GPUs (scripts/slurm/ray_cluster.sbatch)"
        )
    return started


def _start_or_join_ray(config: RunConfig) -> None:
    env = {"env_vars": WORKER_ENV}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(runtime_env=env)
        except ConnectionError as exc:
            raise ClusterError(
                f"no Ray cluster at RAY_ADDRESS={address!r} ({exc}); start one first, e.g. with "
                "scripts/slurm/ray_cluster.sbatch, or unset RAY_ADDRESS to start a local cluster"
            ) from None
        return
    from lmmrl_megatron.trainer.reaper import start_reaper

    start_reaper()
    trainer = config.trainer
    # Logical CPUs: one per actor we place, whatever the machine has; the OS shares the real cores.
    num_cpus = trainer.actor_world_size * 2 + config.rollout.num_engines * 2 + 2
    ray.init(num_cpus=num_cpus, num_gpus=trainer.num_gpus_per_node * trainer.num_nodes, include_dashboard=False,
             runtime_env=env, log_to_driver=True)


def make_placement_group(config: RunConfig) -> tuple[PlacementGroup, int, int]:
    """One bundle per policy rank (plus one per rollout engine when not colocated); returns (pg, policy
    bundle offset, rollout bundle offset)."""
    trainer = config.trainer
    gpu = 1 if trainer.num_gpus_per_node > 0 else 0
    num_policy = trainer.actor_world_size
    num_rollout = 0 if trainer.colocate_all_models else config.rollout.num_engines * config.rollout.engine_tp
    assert not gpu or num_policy + num_rollout == num_gpus_needed(config)
    bundles = [{"CPU": 1, "GPU": gpu} if gpu else {"CPU": 1} for _ in range(num_policy + num_rollout)]
    pg = placement_group(bundles, strategy="PACK")
    ray.get(pg.ready())
    return pg, 0, 0 if trainer.colocate_all_models else num_policy


def swap_metrics(parts: list[dict[str, float]], direction: str) -> dict[str, float]:
    """One direction of the colocated swap: the GB all ranks moved, the slowest rank's seconds and the lowest
    per-rank GB/s (each rank copies over its own GPU's link; the slowest bounds the phase)."""
    rates = [p["bytes"] / p["seconds"] / 1e9 if p["seconds"] > 0 else 0.0 for p in parts]
    return {
        f"swap/{direction}_gb": sum(p["bytes"] for p in parts) / 1e9,
        f"swap/{direction}_s": max(p["seconds"] for p in parts),
        f"swap/{direction}_gbps": min(rates),
    }


class PolicyGroup:
    """The Megatron ranks: actor, and colocated with it the reference (KL) and the critic (GAE) when needed.

    A rank that dies (a crash, the OOM killer, a kill) makes every request raise WorkerDiedError naming it, not
    the errors its peers then hit in their collectives; `shutdown` still stops the others."""

    def __init__(
        self, config: RunConfig, pg: PlacementGroup, bundle_offset: int, with_reference: bool, with_critic: bool
    ) -> None:
        from lmmrl_megatron.trainer.policy_worker import PolicyWorker

        colocated = config.trainer.colocate_all_models
        gpu_share = (0.5 if colocated else 1.0) if config.trainer.num_gpus_per_node > 0 else 0
        world_size = config.trainer.actor_world_size
        worker_cls = ray.remote(PolicyWorker)
        self.broken = False  # a rank died: the survivors may be stuck in a collective
        self.workers = [
            worker_cls.options(
                num_cpus=0.5,
                num_gpus=gpu_share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_offset + rank),
            ).remote(config, rank, world_size, with_reference, with_critic)
            for rank in range(world_size)
        ]
        try:
            address, port = self._gather([self.workers[0].master_address.remote()], "setup")[0]
            self.layout = self._gather([w.setup.remote(address, port) for w in self.workers], "setup")[0]
        except BaseException:
            self.shutdown()
            raise

    # -- requests to every rank, and what a dead rank turns them into ----------------------------------------------
    def _gather(self, futures: list[Any], what: str) -> list[Any]:
        """`ray.get(futures)` (futures[i] from rank i, or from the ranks in order), except that a rank's death
        raises WorkerDiedError as soon as it is known, without waiting for peers that may wait on it forever."""
        from ray.exceptions import RayActorError, RayError

        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except RayActorError as exc:
                self._raise_died(futures.index(ready[0]), what, exc)
            except RayError as exc:
                # A peer's failure (e.g. gloo's "connection closed by peer"): report the death behind it, if any.
                dead = self.dead_ranks()
                if dead:
                    self._raise_died(dead[0], what, exc)
                raise
        return ray.get(futures)

    def _raise_died(self, rank: int, what: str, exc: BaseException) -> None:
        from lmmrl_megatron.trainer.errors import WorkerDiedError, one_line

        self.broken = True
        reason = getattr(exc, "error_msg", None) or str(exc)
        raise WorkerDiedError(f"policy worker rank {rank} died during {what}: {one_line(reason, 300)}") from exc

    def dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """Ranks whose actor Ray knows to be dead (a busy rank's answer is not waited for past `timeout_s`)."""
        from ray.exceptions import RayActorError

        probes = [w.__ray_ready__.remote() for w in self.workers]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=timeout_s)
        dead = []
        for rank, probe in enumerate(probes):
            if probe in ready:
                try:
                    ray.get(probe)
                except RayActorError:
                    dead.append(rank)
        return dead

    def kill_rank(self, rank: int) -> None:
        """SIGKILL one rank's process, as a crash would (fault injection: trainer/faults.py)."""
        import signal

        os.kill(ray.get(self.workers[rank].pid.remote()), signal.SIGKILL)

    def forward(self, batch: Any, role: str) -> RowValues:
        """`batch` is a Ray object ref of the step's RolloutBatch; [N, R] per response token of every row, in row
        order: log-probs and entropy of the actor or reference, values (entropy None) of the critic."""
        parts = self._gather([w.forward.remote(batch, role) for w in self.workers], f"forward ({role})")
        return RowValues.merge([p for p in parts if p is not None])

    def train_actor(self, batch: Any, normaliser: float, kl_coef: float, lr: float) -> dict[str, float]:
        parts = self._gather([w.train_actor.remote(batch, normaliser, kl_coef, lr) for w in self.workers], "train_actor")
        return next(p for p in parts if p)

    def train_critic(self, batch: Any, normaliser: float, lr: float) -> dict[str, float]:
        parts = self._gather([w.train_critic.remote(batch, normaliser, lr) for w in self.workers], "train_critic")
        return next(p for p in parts if p)

    def offload(self) -> dict[str, float]:
        """Free the ranks' gradient buffers and optimizer state; `swap/offload_gb`, `swap/offload_gbps`."""
        return swap_metrics(self._gather([w.offload.remote() for w in self.workers], "offload"), "offload")

    def onload(self) -> dict[str, float]:
        return swap_metrics(self._gather([w.onload.remote() for w in self.workers], "onload"), "onload")

    def push_weights(self, engines: list[Any]) -> dict[str, float]:
        parts = self._gather([w.push_weights.remote(engines) for w in self.workers], "push_weights")
        return {k: sum(p.get(k, 0.0) for p in parts) for k in parts[0]}

    def save_checkpoint(self, directory: str) -> None:
        self._gather([w.save_checkpoint.remote(directory) for w in self.workers], "save_checkpoint")

    def save_hf(self, directory: str) -> None:
        self._gather([w.save_hf.remote(directory) for w in self.workers], "save_hf")

    def load_checkpoint(self, directory: str) -> None:
        self._gather([w.load_checkpoint.remote(directory) for w in self.workers], "load_checkpoint")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every rank; never raises. Live ranks first leave their process group (unless a rank died: the
        survivors may be blocked in a collective with it), then every actor is killed, dead or alive."""
        workers, self.workers = self.workers, []
        if not self.broken:
            try:
                done = [w.shutdown.remote() for w in workers]
                ray.wait(done, num_returns=len(done), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead rank's request fails; it is killed below all the same
                pass
        for w in workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001
                pass


class RolloutGroup:
    """The rollout engines of `rollout.backend`; prompts are split across them in contiguous chunks.

    Engine i holds the placement group's bundles [offset + i * engine_tp, offset + (i + 1) * engine_tp). With
    engine_tp = 1 the engine actor itself takes the bundle's GPU (a share of it when colocated); with more,
    vLLM starts one Ray worker per bundle and the engine actor only drives them.
    """

    def __init__(self, config: RunConfig, pg: PlacementGroup, bundle_offset: int) -> None:
        from lmmrl_megatron.rollout.registry import engine_spec

        use_gpu = config.trainer.num_gpus_per_node > 0
        gpu_share = (0.5 if config.trainer.colocate_all_models else 1.0) if use_gpu else 0
        tp = config.rollout.engine_tp
        self.engines = []
        for i in range(config.rollout.num_engines):
            bundles = [bundle_offset + i * tp + k for k in range(tp)]
            spec = engine_spec(config, i, bundles)
            options: dict[str, Any] = dict(
                num_cpus=0.5,
                num_gpus=gpu_share if tp == 1 else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=bundles[0], placement_group_capture_child_tasks=True
                ),
            )
            if tp > 1:  # vLLM's TP workers take this share of each bundle's GPU
                options["runtime_env"] = {"env_vars": {**WORKER_ENV, "VLLM_RAY_PER_WORKER_GPUS": str(gpu_share)}}
            self.engines.append(ray.remote(spec.engine_cls).options(**options).remote(**spec.kwargs))
        # Engines start concurrently; wait here so a start-up failure surfaces before the first step.
        self.device_uuids = ray.get([engine.device_uuids.remote() for engine in self.engines])

    def generate(self, prompts: list[MultimodalPrompt], params: SamplingParams) -> list[list[GenerationOutput]]:
        num = len(self.engines)
        bounds = [len(prompts) * i // num for i in range(num + 1)]
        futures = [
            engine.generate.remote(prompts[bounds[i] : bounds[i + 1]], params)
            for i, engine in enumerate(self.engines)
            if bounds[i + 1] > bounds[i]
        ]
        return [group for part in ray.get(futures) for group in part]

    def sleep(self) -> None:
        ray.get([e.sleep.remote() for e in self.engines])

    def wake_up(self) -> None:
        ray.get([e.wake_up.remote() for e in self.engines])

    def wake_up_weights(self) -> None:
        ray.get([e.wake_up_weights.remote() for e in self.engines])

    def wake_up_kv_cache(self) -> None:
        ray.get([e.wake_up_kv_cache.remote() for e in self.engines])

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine)


def put_batch(batch: RolloutBatch) -> Any:
    """One object-store copy of a batch, shared by every rank."""
    return ray.put(batch)
