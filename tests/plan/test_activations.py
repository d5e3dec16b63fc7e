"""The planner's activation term against what autograd really saves: the bytes of every tensor our decoder saves
for backward (saved-tensor hooks, parameters excluded) in a bf16 forward of a small Qwen2.5-VL on CPU, TP=1.

The model is built in a subprocess (this file run as a script): Megatron's CPU shims (`parallel/cpu_backend.py`)
patch torch.cuda for the whole process, which the test process must not keep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, hidden_act="silu", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, hidden_act="silu",
              fullatt_block_indexes=[1], window_size=56)
TOKENS = 256


def measure(recompute: str) -> dict[str, int]:
    """Saved bytes of one forward (and the planner's figures) at `recompute`."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from lmmrl_megatron.config import RunConfig, load_config
    from lmmrl_megatron.models.qwen_vl.config import QwenVLConfig
    from lmmrl_megatron.parallel.cpu_backend import install_cpu_backend
    from lmmrl_megatron.parallel.layout import ShardLayout
    from lmmrl_megatron.plan.memory import train_activations
    from lmmrl_megatron.plan.params import stage_params
    from lmmrl_megatron.models.qwen_vl.policy import build_chunks
    from lmmrl_megatron.trainer.policy_worker import free_port

    install_cpu_backend()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    qwen = QwenVLConfig.from_hf_dict(dict(TEXT, model_type="qwen2_5_vl", vision_config=VISION, tie_word_embeddings=True))
    config = load_config(RunConfig, None, ["model.dtype=bf16", f"model.recompute={recompute}",
                                           f"trainer.max_tokens_per_micro_batch={TOKENS}"])
    chunk = build_chunks(qwen, config.model, config.parallel, use_gpu=False, load=False)[0]
    chunk.train()
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 400, (2, TOKENS // 2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(ids, torch.ones_like(ids), return_logits=True)
    planned, rebuilt = train_activations(qwen, config, stage_params(qwen, ShardLayout())[0])
    return {"saved": sum(saved.values()), "planned": planned, "rebuilt": rebuilt}


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_saved_activations_match_the_planner(recompute: str) -> None:
    done = subprocess.run([sys.executable, __file__, recompute], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # What the planner leaves out is per sequence, not per layer (input ids, rotary tables): a few % here.
    assert got["saved"] == pytest.approx(got["planned"], rel=0.1 if recompute == "full" else 0.03), got
    assert (got["rebuilt"] > 0) == (recompute == "full")


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
