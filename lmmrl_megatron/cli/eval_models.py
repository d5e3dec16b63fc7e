"""Evaluation outside training (`lmmrl-eval`): the same Evaluator, fed by a rollout group of its own.

    columns = evaluate_models(config, [("before", "outputs/tiny/model"), ("after", "outputs/tiny/run")], out_dir)

Each model is a Hugging Face folder, a trainer checkpoint (`.../checkpoints/step_N`: its `hf/` export, or its
Megatron actor checkpoint converted to one) or a run folder (its latest checkpoint). For each, the rollout group
of `config.rollout` (any registered backend) is started on its own placement group, every set of `config.eval`
is generated and scored, and the group is stopped again.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lmmrl_megatron.config.schema import RunConfig

if TYPE_CHECKING:
    from lmmrl_megatron.eval.evaluator import EvalResult


def _hf_template_of(checkpoint: Path) -> str:
    """The model a trainer checkpoint was trained from (its run config names it): config, tokenizer, processor."""
    run_config = checkpoint / "config.json"
    if not run_config.is_file():
        raise ValueError(f"{checkpoint} has no config.json naming the model it was trained from")
    return json.loads(run_config.read_text())["model"]["pretrain"]


def resolve_model(path: str | Path, work_dir: Path) -> Path:
    """The Hugging Face folder to evaluate for `path` (see the module docstring); conversions go to `work_dir`."""
    from lmmrl_megatron.trainer.checkpoint import COMPLETE_MARKER, CheckpointManager

    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path / "checkpoints").latest()
        if latest is None:
            raise ValueError(f"{path} is a run folder without a complete checkpoint")
        return resolve_model(latest, work_dir)
    if (path / COMPLETE_MARKER).is_file():
        if (path / "hf" / "config.json").is_file():
            return path / "hf"
        if (path / "actor").is_dir():
            from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_mcore_to_hf
            from lmmrl_megatron.models.registry import family_of_hf_dir

            out = work_dir / "models" / f"{path.parent.parent.name}_{path.name}"
            if not (out / "config.json").is_file():
                print(f"converting the actor of {path} to a Hugging Face checkpoint in {out}")
                options = ConvertOptions(
                    src=str(path / "actor"), out=str(out), hf_template=_hf_template_of(path), overwrite=True
                )
                convert_mcore_to_hf(options, family_of_hf_dir)
            return out
        raise ValueError(f"{path} is a checkpoint with neither hf/ nor actor/")
    if (path / "config.json").is_file():
        return path
    raise ValueError(f"{path} is neither a Hugging Face model folder, a trainer checkpoint nor a run folder")


def evaluate_model(config: RunConfig) -> EvalResult:
    """Evaluate `config.model.pretrain` on `config.eval.sets` through a rollout group of its own; the EvalResult."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from transformers import AutoProcessor

    from lmmrl_megatron.config.validate import validate_run_config
    from lmmrl_megatron.eval.evaluator import Evaluator
    from lmmrl_megatron.trainer.groups import RolloutGroup, init_ray

    validate_run_config(config, training=False)
    processor = AutoProcessor.from_pretrained(config.model.pretrain)
    evaluator = Evaluator(config, processor)
    try:
        init_ray(config)
        gpu = 1 if config.trainer.num_gpus_per_node > 0 else 0
        num_bundles = config.rollout.num_engines * config.rollout.engine_tp
        bundle = {"CPU": 1, "GPU": gpu} if gpu else {"CPU": 1}
        pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy="PACK")
        ray.get(pg.ready())
        rollout = RolloutGroup(config, pg, 0)
        try:
            return evaluator.evaluate(rollout.generate, step=0)
        finally:
            rollout.shutdown()
            remove_placement_group(pg)
    finally:
        evaluator.close()


def evaluate_models(
    config: RunConfig, models: Sequence[tuple[str, str]], out_dir: str | Path
) -> list[tuple[str, dict[str, float]]]:
    """Evaluate each (label, path) in turn; write `samples.jsonl` (every prompt, response and score, with the
    model's label), `metrics.json` and `summary.md` to `out_dir`; return (label, metrics) per model."""
    from lmmrl_megatron.config.validate import validate_run_config
    from lmmrl_megatron.trainer.eval_summary import eval_table

    validate_run_config(config, training=False, check_model=False)  # before any model is converted
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    samples.write_text("")
    columns = []
    # The engines must not share the GPU with anything: no policy ranks here.
    config = replace(config, trainer=replace(config.trainer, colocate_all_models=False))
    for label, path in models:
        hf_dir = resolve_model(path, out)
        model_config = replace(config, model=replace(config.model, pretrain=str(hf_dir)))
        result = evaluate_model(model_config)
        result.write_samples(samples, extra={"model": label, "model_path": str(hf_dir)}, append=True)
        columns.append((label, result.metrics))
    (out / "metrics.json").write_text(json.dumps({label: metrics for label, metrics in columns}, indent=1))
    (out / "summary.md").write_text(eval_table(columns) + "\n")
    return columns
