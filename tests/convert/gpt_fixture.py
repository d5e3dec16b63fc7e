"""A small Megatron-Core GPT and a Qwen2-style name mapping for it: the test bed of the checkpoint machinery.

The GPT has what makes Qwen-VL's decoder hard to reshard: grouped-query attention with qkv bias (Megatron packs
q, k, v per query group), a fused gate/up projection (each TP rank holds [gate_r; up_r]), and a vocabulary padded
for TP (the padding must never leak into exported weights); tied embeddings are an option. `gpt_shards_to_hf`
plays the part of the real mapping for this model: it turns the TP shards of one parameter into Hugging Face
(Qwen2) tensors, so the export and checkpoint code can be tested before, and independently of, the Qwen-VL model.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

VOCAB = 60  # the real vocabulary; Megatron holds PADDED_VOCAB rows
PADDED_VOCAB = 64
HIDDEN, HEADS, GROUPS, LAYERS, FFN = 32, 4, 2, 4, 64
HEAD_DIM = HIDDEN // HEADS
SEQ, MICRO_BATCH, NUM_MICROBATCHES = 8, 2, 2


def build_gpt(tied: bool = False, meta: bool = False):
    """This rank's stage of the GPT at the current Megatron parallel state (on the meta device if asked)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        perform_initialization=not meta,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
    )
    kwargs = dict(
        vocab_size=PADDED_VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
    )
    if meta:
        with torch.device("meta"):
            return GPTModel(config, get_gpt_layer_local_spec(), **kwargs)
    return GPTModel(config, get_gpt_layer_local_spec(), **kwargs)


def full_tensor_for(global_name: str, shape: Sequence[int], salt: str = "") -> torch.Tensor:
    """The whole (unsharded) value of a parameter, drawn from a generator seeded by its global name."""
    seed = int(hashlib.sha256((salt + global_name).encode()).hexdigest()[:8], 16)
    full = torch.randn(list(shape), generator=torch.Generator().manual_seed(seed)) * 0.05
    if global_name.endswith("layernorm.weight") or global_name.endswith("layer_norm_weight"):
        full = 1.0 + full
    if "word_embeddings" in global_name or "output_layer" in global_name:
        full[VOCAB:] = 0.0  # padding rows are zero, as a converter writes them
    return full


def init_by_global_name(model: torch.nn.Module, salt: str = "") -> None:
    """Give every parameter its TP slice of `full_tensor_for(global name)`; same logical model at any layout."""
    from megatron.core import parallel_state as ps

    from lmmrl_megatron.convert.param_names import global_param_names

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    names = global_param_names(model)
    for local_name, param in model.named_parameters():
        global_name = names[local_name]
        if global_name == "output_layer.weight" and getattr(param, "shared_embedding", False):
            global_name = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
        shape = list(param.shape)
        split_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        if split_dim is not None:
            shape[split_dim] *= tp_size
        full = full_tensor_for(global_name, shape, salt)
        if global_name.endswith("mlp.linear_fc1.weight"):
            # The global fc1 is [gate; up]; each TP rank holds [its rows of gate; its rows of up].
            gate, up = full.chunk(2)
            full = torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
        elif split_dim is not None:
            full = full.chunk(tp_size, dim=split_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(full)


def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=gen)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens]


def eval_logits(model: torch.nn.Module) -> torch.Tensor | None:
    """Forward the fixed batches through Megatron's pipeline schedule; the last stage returns the full logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], position_ids, attention_mask=None)

        def keep_logits(logits):
            collected.append(gather_from_tensor_model_parallel_region(logits).detach().clone())
            return logits.sum() * 0.0, {}

        return output, keep_logits

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches()),
            model=[model],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.stack(collected)[..., :VOCAB]


# ------------------------------------------------------------------------------------- the test mapping


def _split_qkv(packed: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's qkv rows are [q heads of group g; k_g; v_g] for each query group g, in group order."""
    heads_per_group = HEADS // GROUPS
    rows = packed.reshape(num_groups, (heads_per_group + 2) * HEAD_DIM, *packed.shape[1:])
    q, k, v = rows.split([heads_per_group * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=1)
    return (q.reshape(-1, *packed.shape[1:]), k.reshape(-1, *packed.shape[1:]), v.reshape(-1, *packed.shape[1:]))


def gpt_shards_to_hf(
    global_name: str, shards: Sequence[torch.Tensor], tied: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Turn the TP shards of one GPT parameter (in TP rank order) into Qwen2-named Hugging Face tensors."""
    parts = global_name.split(".")
    if global_name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", torch.cat(list(shards))[:VOCAB])]
    if global_name == "output_layer.weight":
        return [] if tied else [("lm_head.weight", torch.cat(list(shards))[:VOCAB])]
    if global_name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    layer, rest = parts[2], ".".join(parts[3:])
    hf = f"model.layers.{layer}."
    if rest == "input_layernorm.weight":
        return [(hf + "input_layernorm.weight", shards[0])]
    if rest == "pre_mlp_layernorm.weight":
        return [(hf + "post_attention_layernorm.weight", shards[0])]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        q, k, v = _split_qkv(torch.cat(list(shards)), GROUPS)
        kind = rest.rsplit(".", 1)[1]
        return [(hf + f"self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if rest == "self_attention.linear_proj.weight":
        return [(hf + "self_attn.o_proj.weight", torch.cat(list(shards), dim=1))]
    if rest == "mlp.linear_fc1.weight":
        halves = [s.chunk(2) for s in shards]
        return [
            (hf + "mlp.gate_proj.weight", torch.cat([h[0] for h in halves])),
            (hf + "mlp.up_proj.weight", torch.cat([h[1] for h in halves])),
        ]
    if rest == "mlp.linear_fc2.weight":
        return [(hf + "mlp.down_proj.weight", torch.cat(list(shards), dim=1))]
    raise KeyError(f"no Hugging Face name for GPT parameter {global_name}")


def reference_hf_state(tied: bool = False, salt: str = "") -> dict[str, torch.Tensor]:
    """What the export must produce: the unsharded parameters (from `full_tensor_for`) mapped to HF names."""
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    shapes = {
        "embedding.word_embeddings.weight": (PADDED_VOCAB, HIDDEN),
        "decoder.final_layernorm.weight": (HIDDEN,),
    }
    if not tied:
        shapes["output_layer.weight"] = (PADDED_VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, HIDDEN)
        shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
        shapes[p + "self_attention.linear_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "pre_mlp_layernorm.weight"] = (HIDDEN,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * FFN, HIDDEN)
        shapes[p + "mlp.linear_fc2.weight"] = (HIDDEN, FFN)
    state = {}
    for name, shape in shapes.items():
        state.update(gpt_shards_to_hf(name, [full_tensor_for(name, shape, salt)], tied))
    return state


def gpt_template(tied: bool = False):
    """The checkpoint template of the GPT: built at TP=1, PP=1 on the meta device (needs that parallel state)."""
    from lmmrl_megatron.convert.dcp_stream import template_from_sharded_state_dict

    return template_from_sharded_state_dict(build_gpt(tied=tied, meta=True).sharded_state_dict())


def load_and_compare(ckpt_dir: str, tied: bool = False) -> list[str]:
    """Worker: load `ckpt_dir` into a differently initialised GPT at this layout; name every parameter that then
    differs from the reference model of `init_by_global_name`."""
    from lmmrl_megatron.convert.mcore_ckpt import load_model_checkpoint

    model, reference = build_gpt(tied=tied), build_gpt(tied=tied)
    init_by_global_name(model, salt="a different model")
    init_by_global_name(reference)
    load_model_checkpoint([model], ckpt_dir)
    expected = dict(reference.named_parameters())
    return [name for name, param in model.named_parameters() if not torch.equal(param, expected[name])]
