"""lmmrl-eval: evaluate models on test sets as the trainer does during a run, and print a before/after table.

    lmmrl-eval --model before=outputs/tiny/model --model after=outputs/tiny/run --config configs/rloo_tiny.yaml
    lmmrl-eval --model /ckpt/Qwen2.5-VL-7B --data mathvista=/data/mathvista.jsonl eval.n_samples_per_prompt=4 \
        eval.temperature=1.0 trainer.num_gpus_per_node=8 rollout.backend=vllm

--model (repeatable, `[label=]PATH`): a Hugging Face folder, a trainer checkpoint (`.../checkpoints/step_N`) or a
run folder (its latest checkpoint). --data (repeatable, `[name=]SOURCE`): test sets in LMM-R1's format; without
it, the config's `eval.sets`. The run config (`--config` and `key.sub=value` overrides) gives the rollout backend
and engines, the data keys and image bounds, the `eval` section (sampling, scoring functions) and the reward knobs.
Writes OUT/samples.jsonl (every prompt, response and score, per model), OUT/metrics.json and OUT/summary.md, the
table it prints: one row per set and metric, one column per model, and the change from the first to the last.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.config.eval import EvalSetConfig


def _labelled(value: str, default_label: str) -> tuple[str, str]:
    label, sep, rest = value.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label) and not Path(value).exists():
        return label, rest
    return default_label, value


def _set_name(source: str) -> str:
    stem = Path(source.partition("@")[2] or source).stem or "eval"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmmrl-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH", help="a model to evaluate (repeat for more)")
    parser.add_argument("--data", action="append", default=[], metavar="[NAME=]SOURCE", help="a test set (repeat for more)")
    parser.add_argument("--config", help="a YAML file of the run schema (configs/*.yaml)")
    parser.add_argument("--out", default="outputs/eval", help="output folder (default: outputs/eval)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.max_new_tokens=512")
    args = parser.parse_args(argv)
    models = [_labelled(spec, Path(spec).name or spec) for spec in args.model]
    try:
        config = load_config(RunConfig, args.config, args.overrides)
        if args.data:
            sets = [EvalSetConfig(*_labelled(spec, _set_name(spec))) for spec in args.data]
            config = replace(config, eval=replace(config.eval, sets=sets))
    except ValueError as exc:
        parser.exit(2, f"lmmrl-eval: {exc}\n")
    if not config.eval.sets:
        parser.exit(2, "lmmrl-eval: no test sets: give --data, or a --config with eval.sets\n")

    import ray

    from lmmrl_megatron.cli.eval_models import evaluate_models
    from lmmrl_megatron.trainer.eval_summary import eval_table

    try:
        columns = evaluate_models(config, models, args.out)
    except ValueError as exc:
        parser.exit(2, f"lmmrl-eval: {exc}\n")
    finally:
        ray.shutdown()
    print(eval_table(columns))
    print(f"samples: {Path(args.out) / 'samples.jsonl'}  summary: {Path(args.out) / 'summary.md'}")


if __name__ == "__main__":
    main()
