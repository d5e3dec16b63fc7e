"""lmmrl-plan: is the layout legal, does every role fit in GPU memory at every phase, and roughly how long a step
takes; from the model's config.json only (no weights, no GPU).

    lmmrl-plan --config configs/rloo_qwen2_5_vl_72b.yaml --gpu H100-80GB model.pretrain=configs/models/qwen2_5_vl_72b
    lmmrl-plan --config ... --meta     # also build every stage on the meta device and check the parameter counts

Exit status: 0 when it fits, 1 when it does not (the verdict names the first thing that does not and the knobs),
2 for a bad config or layout.
"""

from __future__ import annotations

import argparse

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.plan.gpus import GPUS, get_gpu


def _check_meta(plan) -> str:
    from lmmrl_megatron.plan.meta import meta_stage_counts

    counts = meta_stage_counts(plan.qwen, plan.config.parallel.layout)
    built = [c["total"] for c in counts]
    planned = [s.total for s in plan.stages]
    if built != planned:
        raise SystemExit(f"lmmrl-plan: the meta-device model has {built} parameters per stage, the plan {planned}")
    return f"meta-device build: parameters per rank of each stage match the plan ({built})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmmrl-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file of the run schema (configs/*.yaml)")
    parser.add_argument("--gpu", default="H100-80GB", choices=sorted(GPUS))
    parser.add_argument("--meta", action="store_true", help="check the counts against a meta-device build (seconds)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. parallel.tp=4")
    args = parser.parse_args(argv)
    from lmmrl_megatron.plan.report import make_plan, render

    try:
        config = load_config(RunConfig, args.config, args.overrides)
        plan = make_plan(config, get_gpu(args.gpu))
    except ValueError as exc:
        parser.exit(2, f"lmmrl-plan: {exc}\n")
    print(render(plan))
    if plan.problems:
        raise SystemExit(2)
    if args.meta:
        print(_check_meta(plan))
    raise SystemExit(0 if plan.fits else 1)


if __name__ == "__main__":
    main()
