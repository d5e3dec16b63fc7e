"""lmmrl-plot: PNG plots of a run (reward, eval accuracy, response length, KL, entropy, clip fraction, grad norm,
learning rate, phase times), written beside its metrics.jsonl as metrics.png and plots/<panel>.png.

    lmmrl-plot outputs/tiny/run

A run writes them itself when it ends; this redraws them, e.g. while a run is still going.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmmrl-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (checkpoint.save_path): the one holding metrics.jsonl")
    args = parser.parse_args(argv)

    from lmmrl_megatron.trainer.plots import plot_run

    try:
        written = plot_run(args.run_dir)
    except ValueError as exc:
        parser.exit(2, f"lmmrl-plot: {exc}\n")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
