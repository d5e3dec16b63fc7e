"""Step metrics to every sink: `<save_path>/metrics.jsonl`, tensorboard, wandb (offline unless configured), a
progress bar. One JSON object per step; a resumed run drops lines past the step it resumed from, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmmrl_megatron.config.sections import LoggingConfig

# The figures the progress bar shows, in this order, when present.
PROGRESS_KEYS = ("reward/mean", "response_length/mean", "kl", "policy/clip_frac", "grad_norm")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl, values as floats (non-finite values are stored as strings: 'nan', 'inf')."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append({k: float(v) for k, v in json.loads(line).items()})
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keep only lines whose step is <= `step` (a crash after the last checkpoint may have written more)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(
        self,
        save_path: str | Path,
        config: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.save_path = Path(save_path)
        self.save_path.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.save_path / "metrics.jsonl"
        # A run from step 0 starts the file afresh: its evaluation before training (a step-0 record) is redone.
        _truncate_after(self.jsonl_path, start_step if start_step > 0 else -1)
        self._jsonl = self.jsonl_path.open("a")
        self._tensorboard = None
        if config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.save_path / "tensorboard"), purge_step=start_step + 1)
        self._wandb = None
        if config.use_wandb and config.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=config.wandb_project,
                name=config.wandb_run_name,
                mode=config.wandb_mode,
                dir=str(self.save_path),
                config=run_config,
                resume="allow",
            )
        self._bar = None
        if config.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="rl", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in clean.items() if not math.isfinite(v)]
        record = {"step": step, **{k: (v if k not in bad else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if step % self.config.logging_steps == 0:
            if self._tensorboard is not None:
                for key, value in clean.items():
                    self._tensorboard.add_scalar(key, value, step)
                self._tensorboard.flush()
            if self._wandb is not None:
                self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {k.split("/")[0] if k.endswith("/mean") else k.split("/")[-1]: f"{clean[k]:.4g}" for k in PROGRESS_KEYS if k in clean}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(0, step - self._bar.n))  # a step-0 record (evaluation before training) is no step

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
