"""K > 2 classes in the model wing: K logits, softmax cross-entropy, mixup's soft targets, probabilities."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xray_ray.config import TrialConfig
from xray_ray.errors import UserError
from xray_ray.model.cnn import PRESETS, build_model
from xray_ray.model.train import array_batches, make_loss, mix, predict_probs, train_one_epoch


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_preset_gives_one_logit_for_two_classes_and_k_for_more(preset, k):
    model = build_model(preset, num_classes=k, image_size=32).eval()
    out = model(torch.rand(3, 1, 32, 32))
    assert out.shape == ((3,) if k == 2 else (3, k))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_one_class_is_refused():
    with pytest.raises(UserError, match="at least two classes"):
        build_model("tiny", num_classes=1)


def test_the_k_class_loss_is_weighted_cross_entropy_and_takes_soft_targets():
    cfg = TrialConfig.from_dict({"image_size": 32, "blocks": 2, "class_weighting": "balanced"})
    fractions = (0.25, 0.5, 0.25)
    loss = make_loss(cfg, 0.75, fractions)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    weight = torch.tensor([1 / (3 * f) for f in fractions])
    assert float(loss(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels, weight=weight)))
    # a soft target that is one-hot gives the same loss as the label (mixup's targets are such rows blended)
    onehot = F.one_hot(labels, 3).float()
    plain = make_loss(cfg.replace(class_weighting="none"), 0.75, fractions)
    assert float(plain(logits, onehot)) == pytest.approx(float(plain(logits, labels)), rel=1e-6)
    smooth = make_loss(cfg.replace(class_weighting="none", label_smoothing=0.1), 0.75, fractions)
    assert float(smooth(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.1)))


def test_mixup_blends_one_hot_rows_for_k_classes_and_keeps_the_binary_blend():
    x, y = torch.rand(8, 1, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    _, soft = mix(x, y, 0.4, torch.Generator().manual_seed(0), num_classes=3)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert ((soft > 0).sum(dim=1) <= 2).all()  # each row blends at most two images' classes
    yb = torch.tensor([0, 1, 1, 0])
    x1, b1 = mix(x[:4], yb, 0.4, torch.Generator().manual_seed(0))
    x2, b2 = mix(x[:4], yb, 0.4, torch.Generator().manual_seed(0), num_classes=2)
    assert b1.shape == (4,) and torch.equal(b1, b2) and torch.equal(x1, x2)


def test_a_three_class_model_learns_and_predicts_probability_rows():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96)
    images = rng.integers(0, 60, (96, 16, 16)).astype(np.uint8)
    for i, c in enumerate(labels):  # each class brightens its own third of the image
        images[i, :, c * 5 : c * 5 + 5] += 150
    model = build_model("tiny", num_classes=3, image_size=16)
    cfg = TrialConfig.from_dict({"image_size": 16, "blocks": 2, "mixup": 0.2})
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss = make_loss(cfg, 0.5, (1 / 3,) * 3)
    for epoch in range(15):
        train_one_epoch(
            model,
            array_batches(images, labels, 16),
            opt,
            loss_fn=loss,
            mixup=0.2,
            generator=torch.Generator().manual_seed(epoch),
            num_classes=3,
        )
    y, p = predict_probs(model, array_batches(images, labels, 32))
    assert p.shape == (96, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert np.mean(p.argmax(axis=1) == y) > 0.9
