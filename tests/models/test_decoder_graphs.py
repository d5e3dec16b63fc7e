"""CUDA graphs of the decoder (models/decoder_graphs.py): eager wherever a call is not graphable, the same numbers
where it is.

On CPU: attaching changes no parameter name, CPU calls run eagerly with the very same results, and the rules that
refuse a block or a call; the forward a capture records (the block on aliases of its parameters) equals the block.
On a GPU (through the device tool): a graphed training step gives the eager step's log-probs and gradients on text
and multimodal batches, lengths in one bucket share a graph, a forward while another awaits its backward runs
eagerly, a shape is captured while an earlier step's output is still alive, and `max_graphs` caps the captures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmmrl_megatron.models.decoder_graphs import _pad_rows, block_refuses_graphs
from lmmrl_megatron.models.qwen_vl.parity import build_parity_batch, from_bytes
from lmmrl_megatron.parallel.local_ranks import run_distributed
from lmmrl_megatron.testing.make_tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("graphs") / "ckpt", seed=4)


def _text_batch(rows: int, seq: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded plain text (the learner's micro-batch layout: causal attention needs no mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (rows, seq), generator=gen) + 20
    mask = torch.ones_like(ids)
    mask[-1, seq - 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def _step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    log_probs = model(**batch).log_probs
    (-log_probs.sum()).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return log_probs.detach().float(), grads


def _build(hf_dir: str, dtype: str, cpu: bool, graphs: bool):
    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.parity import build_chunk

    options = QwenVLBuildOptions(dtype=dtype, use_cpu_initialization=cpu, cuda_graphs=graphs)
    model = build_chunk(hf_dir, options)
    model.train()
    return model


# ---------------------------------------------------------------------------------------------- CPU


def cpu_calls_run_eagerly(hf_dir: str) -> bytes:
    from lmmrl_megatron.models.qwen_vl.parity import to_bytes

    plain, graphed = _build(hf_dir, "fp32", True, False), _build(hf_dir, "fp32", True, True)
    assert plain.decoder_graphs is None
    names = [n for n, _ in graphed.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]
    assert list(graphed.state_dict()) == list(plain.state_dict())
    mm = build_parity_batch(hf_dir, padding_side="right")
    batches = {"text": _text_batch(2, 40, "cpu", 1),
               "multimodal": dict(input_ids=mm.input_ids, attention_mask=mm.attention_mask, labels=mm.labels,
                                  pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw)}
    out = {name: (_step(plain, batch), _step(graphed, batch)) for name, batch in batches.items()}
    graphs = graphed.decoder_graphs
    return to_bytes(dict(out=out, num_eager=graphs.num_eager, num_replays=graphs.num_replays,
                         num_graphs=graphs.num_graphs, refused=graphs.refused))


def test_cpu_calls_run_eagerly_with_identical_results(hf_dir: Path) -> None:
    result = from_bytes(run_distributed(cpu_calls_run_eagerly, world_size=1, args=(str(hf_dir),))[0])
    assert (result["num_graphs"], result["num_replays"], result["num_eager"]) == (0, 0, 2)
    assert result["refused"] == ""
    for name, ((lp, grads), (lp_g, grads_g)) in result["out"].items():
        assert (lp != 0).sum() > 20, name
        torch.testing.assert_close(lp_g, lp, rtol=0, atol=0)
        assert grads_g.keys() == grads.keys() and len(grads) > 10
        for param, grad in grads.items():
            torch.testing.assert_close(grads_g[param], grad, rtol=0, atol=0, msg=lambda m, p=param: f"{p}: {m}")


def functional_against_eager(hf_dir: str) -> bytes:
    """The block on fresh leaves aliasing its parameters (what a capture records) against the block itself."""
    from lmmrl_megatron.models.qwen_vl.parity import to_bytes

    model = _build(hf_dir, "fp32", True, True)
    decoder, graphs = model.language_model.decoder, model.decoder_graphs
    seen: dict = {}
    handle = decoder.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model(**_text_batch(2, 40, "cpu", 1))
    handle.remove()
    hidden, rotary = seen["hidden_states"].detach(), seen["rotary_pos_emb"].detach()
    params = [p for p in decoder.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    cotangent = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))

    h_eager = hidden.clone().requires_grad_(True)
    out = decoder(hidden_states=h_eager, attention_mask=None, rotary_pos_emb=rotary)
    eager = (out.detach(), torch.autograd.grad(out, [h_eager, *params], cotangent))

    leaves = [p.detach().requires_grad_(True) for p in params]
    h_leaf = hidden.clone().requires_grad_(True)
    out = graphs.functional_forward(h_leaf, rotary, *leaves)
    functional = (out.detach(), torch.autograd.grad(out, [h_leaf, *leaves], cotangent))
    return to_bytes(dict(eager=eager, functional=functional, num_params=len(params),
                         same_storage=all(p.data_ptr() == q.data_ptr() for p, q in zip(params, leaves)),
                         param_grads_untouched=all(p.grad is None for p in params),
                         eager_calls=graphs.num_eager))


def test_functional_forward_on_parameter_aliases_equals_the_block(hf_dir: Path) -> None:
    result = from_bytes(run_distributed(functional_against_eager, world_size=1, args=(str(hf_dir),))[0])
    (out, grads), (out_f, grads_f) = result["eager"], result["functional"]
    assert result["num_params"] > 10 and result["same_storage"] and result["param_grads_untouched"]
    torch.testing.assert_close(out_f, out, rtol=0, atol=0)
    assert len(grads_f) == len(grads) == result["num_params"] + 1
    for i, (got, want) in enumerate(zip(grads_f, grads)):
        assert want.abs().sum() > 0, i
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, i=i: f"gradient {i}: {m}")


def refusals(hf_dir: str) -> list[str]:
    from lmmrl_megatron.models.qwen_vl.config import QwenVLBuildOptions
    from lmmrl_megatron.models.qwen_vl.parity import build_chunk

    reasons = []
    for options in (QwenVLBuildOptions(dtype="fp32", use_cpu_initialization=True),
                    QwenVLBuildOptions(dtype="fp32", use_cpu_initialization=True, recompute="full")):
        reasons.append(block_refuses_graphs(build_chunk(hf_dir, options).language_model.decoder))
    return reasons


def test_blocks_that_cannot_be_graphed_say_why(hf_dir: Path) -> None:
    plain, full_recompute = run_distributed(refusals, world_size=1, args=(str(hf_dir),))[0]
    assert plain == ""
    assert full_recompute == "full recompute"


def test_pad_rows_appends_zero_rows_only_when_short() -> None:
    x = torch.arange(6.0).view(3, 2)
    assert _pad_rows(x, 3) is x
    padded = _pad_rows(x, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], x) and not padded[3:].any()


# ---------------------------------------------------------------------------------------------- GPU


def graphed_against_eager(hf_dir: str) -> bytes:
    from lmmrl_megatron.models.qwen_vl.parity import to_bytes

    model = _build(hf_dir, "bf16", False, True).cuda()
    graphs = model.decoder_graphs
    graphs.bucket_tokens = 64
    mm = build_parity_batch(hf_dir, padding_side="right")
    batches = {"text 2x40": _text_batch(2, 40, "cuda", 1),
               "text 3x50": _text_batch(3, 50, "cuda", 2),  # another shape: its own graph
               "text 2x56": _text_batch(2, 56, "cuda", 3),  # the first one's bucket (64): its graph again
               "multimodal": {k: v.cuda() for k, v in dict(
                   input_ids=mm.input_ids, attention_mask=mm.attention_mask, labels=mm.labels,
                   pixel_values=mm.pixel_values, image_grid_thw=mm.image_grid_thw).items()}}
    out = {}
    for name, batch in batches.items():
        graphs.enabled = False
        eager = _step(model, batch)
        graphs.enabled = True
        first = _step(model, batch)
        again = _step(model, batch)
        out[name] = (eager, first, again, graphs.num_graphs)
    # A second graphed forward before the first one's backward runs eagerly (its tensors would overlap).
    before = (graphs.num_replays, graphs.num_eager)
    batch = batches["text 2x40"]
    pending = model(**batch).log_probs
    second = model(**batch).log_probs
    (-(pending.sum() + second.sum())).backward()
    overlap = (graphs.num_replays - before[0], graphs.num_eager - before[1])
    # A new shape captured while an earlier step's output is alive (it keeps the parameters' AccumulateGrad
    # nodes, made on the default stream; Megatron's schedule holds the last micro-batch's output like this).
    graphs.enabled = False
    held = model(**batch).log_probs
    (-held.sum()).backward()
    graphs.enabled = True
    fresh = _step(model, _text_batch(2, 100, "cuda", 5))
    held_capture = (graphs.num_graphs, bool(fresh[0].isfinite().all()))
    # No capture beyond max_graphs: a new shape then runs eagerly.
    graphs.max_graphs = graphs.num_graphs
    before = (graphs.num_replays, graphs.num_eager)
    capped = _step(model, _text_batch(1, 200, "cuda", 4))
    capped_counts = (graphs.num_graphs, graphs.num_replays - before[0], graphs.num_eager - before[1])
    return to_bytes(dict(out=out, overlap=overlap, held_capture=held_capture, capped_counts=capped_counts,
                         capped_ok=bool(capped[0].isfinite().all())))


@pytest.fixture
def megatron_on_gpu(tmp_path: Path):
    """Megatron's parallel state at world size 1 in this process, NCCL (the gloo workers of `run_distributed`
    install the CPU backend, which would move everything off the GPU)."""
    from megatron.core import parallel_state, tensor_parallel

    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.gpu
def test_gpu_graphed_step_equals_eager(hf_dir: Path, megatron_on_gpu: None) -> None:
    result = from_bytes(graphed_against_eager(str(hf_dir)))
    num_graphs = {name: n for name, (*_, n) in result["out"].items()}
    assert num_graphs == {"text 2x40": 1, "text 3x50": 2, "text 2x56": 2, "multimodal": num_graphs["multimodal"]}
    for name, ((lp, grads), first, again, _) in result["out"].items():
        assert (lp != 0).sum() > 20, name
        for label, (lp_g, grads_g) in (("capture", first), ("replay", again)):
            # the same kernels on the same inputs: bf16 results agree up to reduction order in padded rows' absence
            torch.testing.assert_close(lp_g, lp, rtol=1e-2, atol=2e-2, msg=lambda m, n=name, w=label: f"{n} {w}: {m}")
            assert grads_g.keys() == grads.keys(), name
            for param, grad in grads.items():
                scale = grad.abs().max().clamp(min=1e-6)
                err = (grads_g[param] - grad).abs().max() / scale
                assert err < 3e-2, f"{name} {label} grad {param}: max error {err:.3g} of its largest entry"
        torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)  # a replay is deterministic
    assert result["overlap"] == (1, 1)
    assert result["held_capture"] == (num_graphs["multimodal"] + 1, True)
    assert result["capped_counts"] == (num_graphs["multimodal"] + 1, 0, 1) and result["capped_ok"]
