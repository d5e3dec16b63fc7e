"""lmmrl-train: RL training of Qwen2-VL / Qwen2.5-VL (PPO, REINFORCE++, REINFORCE++-baseline, RLOO, GRPO, Dr. GRPO).

    lmmrl-train --config configs/rloo_tiny.yaml [key.sub=value ...]

The advantage estimator is `algorithm.advantage_estimator`; every key of the run schema can be overridden.
With `trainer.max_restarts=K`, a worker that dies restarts the workers from the last checkpoint, up to K times.
A problem a person fixes (bad data, a full or read-only checkpoint folder, a dead worker) ends the run with one
line, `lmmrl-train: ...`, and exit status 1; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse

from lmmrl_megatron.config import RunConfig, load_config
from lmmrl_megatron.config.validate import validate_run_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmmrl-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file of the run schema (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=5")
    args = parser.parse_args(argv)
    try:
        config = load_config(RunConfig, args.config, args.overrides)
        validate_run_config(config)  # the trainer checks again; here a bad config is a message, not a traceback
    except ValueError as exc:
        parser.exit(2, f"lmmrl-train: {exc}\n")

    from lmmrl_megatron.data.bad_input import BadInputError
    from lmmrl_megatron.trainer.errors import RunError, one_line
    from lmmrl_megatron.trainer.supervisor import train

    try:
        train(config)
    except (RunError, BadInputError) as exc:  # a bad record found mid-run arrives as BadInputError
        parser.exit(1, f"lmmrl-train: {one_line(exc, 2000)}\n")


if __name__ == "__main__":
    main()
