"""Convert a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint.

    python tools/convert_ckpt/hf_to_mcore.py --hf DIR --out DIR [--tp N --pp M] [--overwrite]

The output is a `torch_dist` checkpoint of global tensors: it loads at any TP/PP (`--tp/--pp` are checked against
the model and recorded, nothing is cut for them), and it keeps the HF config, tokenizer, processor and chat
template in OUT/hf_template/ for the conversion back. It runs in one process, no GPU needed.

Memory bound: one parameter at a time, never a layer or a shard. Peak is about three times the largest parameter
(the HF tensors it is made of, its Megatron value, one chunk copy on its way to disk) above the ~0.8 GB of the
libraries: about 8 GB for a 72B model (its 2.5 GB bf16 embedding); bench/convert.py measures it.

Errors: a directory that is not a Qwen-VL checkpoint, a missing or truncated shard, a tensor whose shape does not
match config.json, or a layout the model cannot be cut into stop the conversion before anything is written. The
output is written to OUT.tmp-<pid> and renamed to OUT only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_hf_to_mcore  # noqa: E402
from lmmrl_megatron.models.registry import family_of_hf_dir  # noqa: E402
from lmmrl_megatron.parallel.layout import ShardLayout  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is meant for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is meant for")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_hf_to_mcore(
            ConvertOptions(src=args.hf, out=args.out, layout=ShardLayout(tp=args.tp, pp=args.pp),
                           overwrite=args.overwrite, progress=not args.no_progress),
            family_of_hf_dir,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote Megatron checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
