from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbhelpers.training.losses import ClassBalancedFocalLoss, class_balanced_weights, make_loss

GEN = torch.Generator().manual_seed(0)
LOGITS = torch.randn(16, 3, generator=GEN)
TARGET = torch.randint(0, 3, (16,), generator=GEN)


def test_cross_entropy_and_label_smoothing_match_torch():
    assert make_loss("ce")(LOGITS, TARGET).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item())
    smooth = make_loss("label_smoothing", smoothing=0.2)(LOGITS, TARGET).item()
    # By hand: (1 - eps) * NLL + eps * mean over classes of -log p.
    log_p = F.log_softmax(LOGITS, 1)
    expected = (0.8 * -log_p[torch.arange(16), TARGET] + 0.2 * -log_p.mean(1)).mean().item()
    assert smooth == pytest.approx(expected, rel=1e-6)


def test_class_balanced_weights_follow_the_effective_number():
    counts, beta = [10, 100, 1000], 0.99
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    np.testing.assert_allclose(class_balanced_weights(counts, beta).numpy(), raw / raw.sum() * 3, rtol=1e-6)
    w = class_balanced_weights(counts, beta)
    assert w[0] > w[1] > w[2]  # the rarest class weighs most
    np.testing.assert_allclose(class_balanced_weights(counts, 0.0).numpy(), [1, 1, 1])  # beta 0: no re-weighting


def test_focal_reduces_to_cross_entropy_and_down_weights_easy_images():
    plain = ClassBalancedFocalLoss([5, 5, 5], beta=0.0, gamma=0.0)(LOGITS, TARGET)
    assert plain.item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item(), rel=1e-6)
    # gamma > 0 multiplies each image's cross-entropy by (1 - p_y) ** gamma, by hand:
    loss = ClassBalancedFocalLoss([5, 5, 5], beta=0.0, gamma=2.0)(LOGITS, TARGET)
    p_y = F.softmax(LOGITS, 1)[torch.arange(16), TARGET]
    assert loss.item() == pytest.approx(((1 - p_y) ** 2 * -p_y.log()).mean().item(), rel=1e-5)
    easy = torch.tensor([[8.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 8.0, 0.0]])
    focal = ClassBalancedFocalLoss([1, 1, 1], beta=0.0, gamma=2.0)
    ratio_easy = focal(easy, torch.tensor([0])) / F.cross_entropy(easy, torch.tensor([0]))
    ratio_hard = focal(hard, torch.tensor([0])) / F.cross_entropy(hard, torch.tensor([0]))
    assert ratio_easy < 1e-6 and ratio_hard > 0.99


def test_class_weights_scale_each_image_and_gradients_flow():
    counts = [2, 20, 200]
    loss_fn = make_loss("cb_focal", class_counts=counts, beta=0.9, gamma=1.0)
    w = class_balanced_weights(counts, 0.9)
    logits = LOGITS.clone().requires_grad_(True)
    loss = loss_fn(logits, TARGET)
    p_y = F.softmax(LOGITS, 1)[torch.arange(16), TARGET]
    assert loss.item() == pytest.approx((w[TARGET] * (1 - p_y) * -p_y.log()).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'focal'.*cb_focal"):
        make_loss("focal")
    with pytest.raises(ValueError, match="needs class_counts"):
        make_loss("cb_focal")
    with pytest.raises(ValueError, match="takes no option"):
        make_loss("ce", smoothing=0.1)
    with pytest.raises(ValueError, match="every class needs training images"):
        make_loss("cb_focal", class_counts=[3, 0, 3])
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([1, 2, 3], beta=1.0)
