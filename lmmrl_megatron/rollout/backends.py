"""The registry of rollout backends: which `rollout.backend` names exist, and what each needs of the config.

    register_rollout_backend(RolloutBackend("vllm", check=check_vllm_config))
    problems = rollout_backend_problems(config)   # [] when the backend is registered and the config suits it

The config validator (`config/validate.py`) asks here before any worker starts, so a backend that does not exist
or cannot run this configuration is an error at start-up, not after the policy ranks have loaded their weights.
A `check` must be cheap: it looks at the config (and may try an import), it never builds an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# check(run_config) -> the problems with running this config on the backend, each naming its key; [] if none.
BackendCheck = Callable[[Any], list[str]]


@dataclass(frozen=True)
class RolloutBackend:
    name: str
    check: BackendCheck | None = None


_BACKENDS: dict[str, RolloutBackend] = {}


def register_rollout_backend(backend: RolloutBackend) -> None:
    """Make `backend.name` a valid `rollout.backend` (re-registering a name replaces it)."""
    _BACKENDS[backend.name] = backend


def registered_rollout_backends() -> list[str]:
    return sorted(_BACKENDS)


def rollout_backend_problems(config: Any) -> list[str]:
    """What stops `config.rollout.backend` from running this config: not registered, or its own check's findings."""
    name = config.rollout.backend
    backend = _BACKENDS.get(name)
    if backend is None:
        return [
            f"rollout.backend={name!r} is not available: no such rollout backend is registered "
            f"(available: {', '.join(registered_rollout_backends())})"
        ]
    return backend.check(config) if backend.check is not None else []


def _check_hf(config: Any) -> list[str]:
    problems = []
    if config.rollout.engine_tp != 1:
        problems.append(
            f"rollout.engine_tp={config.rollout.engine_tp}: the 'hf' engine runs on one device; "
            "tensor-parallel engines need another backend"
        )
    return problems


register_rollout_backend(RolloutBackend("hf", check=_check_hf))
