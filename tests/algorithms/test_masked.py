import math

import torch

from lmmrl_megatron.algorithms.masked import masked_mean, masked_moments, masked_sum, whiten


def test_masked_sum_and_mean_ignore_garbage():
    values = torch.tensor([[1.0, float("nan")], [3.0, float("inf")], [float("nan"), float("nan")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert masked_sum(values, mask).item() == 4.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, dim=-1).tolist() == [1.0, 3.0, 0.0]  # an empty row is 0, not NaN


def test_moments_and_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, 6.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    moments = masked_moments(values, mask)
    # valid: 1, 2, 3, 6 -> mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert moments.mean.item() == 3.0
    assert abs(moments.std.item() - math.sqrt(3.5)) < 1e-6
    assert not moments.is_constant
    whitened = whiten(values, mask, moments, eps=0.0)
    expected = torch.tensor([[-2.0, -1.0, 0.0], [0.0, 3.0, 0.0]]) / math.sqrt(3.5)
    assert torch.allclose(whitened, expected, atol=1e-6)


def test_constant_values_whiten_to_exact_zeros():
    values = torch.full((3, 4), 0.1)
    mask = torch.ones(3, 4)
    moments = masked_moments(values, mask)
    assert moments.is_constant
    assert torch.equal(whiten(values, mask, moments, eps=1e-8), torch.zeros(3, 4))
