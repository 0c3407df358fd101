from __future__ import annotations

import math

import pytest
import torch

from rnnkit.errors import ShapeError
from rnnkit.train.losses import cross_entropy, masked_cross_entropy, sigmoid_cross_entropy


def test_cross_entropy_with_one_hot_labels_equals_class_indices():
    logits, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(cross_entropy(logits, torch.eye(4)[y]), cross_entropy(logits, y))


def test_sigmoid_cross_entropy_by_hand():
    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    expected = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert sigmoid_cross_entropy(logits, y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ShapeError):
        sigmoid_cross_entropy(logits, y[:, :1])


def test_per_step_weights_and_padding():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    lengths = torch.tensor([3, 1])
    weights = torch.tensor([[1.0, 2.0, 0.5], [3.0, 9.0, 9.0]])  # the 9s sit on padding and must not count
    ce = torch.nn.functional.cross_entropy(logits.reshape(6, 5), targets.reshape(6), reduction="none").reshape(2, 3)
    valid = [(0, 0), (0, 1), (0, 2), (1, 0)]
    expected = sum(weights[i, t] * ce[i, t] for i, t in valid) / sum(weights[i, t] for i, t in valid)
    got = masked_cross_entropy(logits, targets, lengths, weights=weights)
    torch.testing.assert_close(got, expected)
    # unit weights are the plain masked mean
    torch.testing.assert_close(masked_cross_entropy(logits, targets, lengths, weights=torch.ones(2, 3)),
                               masked_cross_entropy(logits, targets, lengths))
    with pytest.raises(ShapeError):
        masked_cross_entropy(logits, targets, lengths, weights=torch.ones(2, 2))
