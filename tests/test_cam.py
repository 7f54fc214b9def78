from __future__ import annotations

import numpy as np
import pytest
import torch

from nbhelpers import models
from nbhelpers.cam import compute_cams, examples_per_class


def test_examples_cover_every_class_first():
    assert examples_per_class([0, 0, 0, 1, 2, 2], 4) == [0, 3, 4, 1]
    assert examples_per_class([1, 1], 5) == [0, 1]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create("densenet121_cbam", num_classes=3)


def test_each_image_gets_its_own_target(net):
    x = torch.randn(2, 3, 64, 64)
    same = compute_cams(net, torch.cat([x[:1], x[:1]]), targets=[0, 2])
    assert same.shape == (2, 64, 64) and 0.0 <= same.min() and same.max() <= 1.0
    # the same image explained for two different classes gives two different maps
    assert not np.allclose(same[0], same[1])
    alone = compute_cams(net, x[:1], targets=[2])
    np.testing.assert_allclose(alone[0], same[1], atol=1e-5)


def test_bad_requests_are_named(net):
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="one target class per image"):
        compute_cams(net, x, targets=[0])
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cams(net, x, method="magic")
