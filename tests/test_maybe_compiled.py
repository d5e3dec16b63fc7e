"""MaybeCompiled: the compiled body equals the eager one, and one graph serves every length.

The bodies compile through inductor's C++ backend on CPU here (`device_type="cpu"`); on CUDA the same graphs go
to Triton. What is checked is what the training step relies on: leading dimensions are symbolic (RL micro-batch
lengths vary: no recompile per length) while the feature width stays static.
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F

from lmmrl_megatron.maybe_compiled import MaybeCompiled


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def _row_stats(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = x.float()
    return torch.logsumexp(z, dim=-1), z.gather(-1, index).squeeze(-1)


def test_one_graph_serves_every_length_and_matches_eager() -> None:
    torch._dynamo.reset()
    kernel = MaybeCompiled(_swiglu, device_type="cpu")
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for tokens in (7, 33, 64, 129):
        x = torch.randn(tokens, 2, 48)
        assert kernel.compiles_for(x)
        torch.testing.assert_close(kernel(x), _swiglu(x))
    # the first length compiles, the others reuse the same symbolic graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    assert kernel.enabled


def test_the_feature_width_is_specialised_per_model() -> None:
    torch._dynamo.reset()
    kernel = MaybeCompiled(_row_stats, device_type="cpu")
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows, width in ((5, 96), (17, 96), (9, 160), (40, 160)):
        x = torch.randn(rows, width)
        index = torch.randint(0, width, (rows, 1))
        got = kernel(x, index)
        want = _row_stats(x, index)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    # one graph per width (static), not one per row count
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 2


def test_tensors_on_other_devices_run_eagerly() -> None:
    kernel = MaybeCompiled(_swiglu, device_type="cuda")
    x = torch.randn(3, 8)
    assert not kernel.compiles_for(x)
    torch.testing.assert_close(kernel(x), _swiglu(x))
    assert kernel.compiled is None
