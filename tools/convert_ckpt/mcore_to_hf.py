"""Convert a Megatron-Core distributed checkpoint of Qwen2-VL / Qwen2.5-VL (saved at any TP/PP) into Hugging Face.

    python tools/convert_ckpt/mcore_to_hf.py --mcore DIR --out DIR [--hf-template DIR] [--layers-per-step K]

The output holds sharded safetensors with model.safetensors.index.json plus config, tokenizer, processor, chat
template and generation config copied from the template (default: MCORE/hf_template/, which hf_to_mcore and the
trainer's checkpoints carry), so `from_pretrained` loads it. Vocabulary padding is removed, qkv and gate/up are split,
a tied embedding is written once. It runs in one process, no GPU needed.

Memory bound: `--layers-per-step` layers (default 1) of the checkpoint at a time, plus one parameter's HF tensors;
shards are planned up front and each tensor is written at its place as it comes, so no shard is ever buffered.
The non-layer parameters (embedding, output layer, vision patch embedding and merger) are read one at a time, so the
peak is about three times the larger of one layer and the embedding (read buffer, value, unpadded HF copy) above the
~0.8 GB of the libraries; bench/convert.py measures it.

The output is written to OUT.tmp-<pid> and renamed to OUT only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from lmmrl_megatron.convert.hf_io import DEFAULT_MAX_SHARD_BYTES  # noqa: E402
from lmmrl_megatron.convert.pipeline import ConvertOptions, convert_mcore_to_hf  # noqa: E402
from lmmrl_megatron.models.registry import family_of_hf_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mcore", required=True, help="Megatron-Core distributed checkpoint directory")
    parser.add_argument("--out", required=True, help="output Hugging Face checkpoint directory")
    parser.add_argument("--hf-template", default=None, help="HF directory with config/tokenizer/processor files")
    parser.add_argument("--layers-per-step", type=int, default=1, help="layers held in memory at a time")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3,
                        help="largest safetensors shard (a bigger single tensor gets its own shard)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert_mcore_to_hf(
            ConvertOptions(
                src=args.mcore,
                out=args.out,
                hf_template=args.hf_template,
                layers_per_step=args.layers_per_step,
                max_shard_bytes=max(1, int(args.max_shard_gb * 1024**3)),
                overwrite=args.overwrite,
                progress=not args.no_progress,
            ),
            family_of_hf_dir,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
