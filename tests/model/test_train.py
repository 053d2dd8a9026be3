"""The training loop knows only an iterable of batches: here, plain in-memory tensors."""

import numpy as np
import pytest
import torch

from xray_ray.config import TrialConfig
from xray_ray.data.phantoms import render
from xray_ray.metrics import roc_auc
from xray_ray.model.cnn import build_model
from xray_ray.model.train import (
    array_batches,
    make_ema,
    make_loss,
    make_optimizer,
    make_scheduler,
    predict_probs,
    to_input,
    train_one_epoch,
)


@pytest.fixture(scope="module")
def phantoms():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1200)
    images = np.stack([render(0, i, int(y), size=48) for i, y in enumerate(labels)])
    return images, labels.astype(np.int64)


def test_to_input_contract():
    x = to_input(torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))


def test_a_few_epochs_learn_the_phantoms(phantoms):
    torch.manual_seed(0)
    images, labels = phantoms
    torch.set_num_threads(1)
    cfg = TrialConfig(
        image_size=48,
        blocks=3,
        double_conv=False,
        width=16,
        head="flatten",
        fc=(32,),
        epochs=4,
        lr=1e-3,
        batch_size=32,
        ema=0.9,
    )
    model = build_model(image_size=48, blocks=3, double_conv=False, width=16, head="flatten", fc=(32,))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=32)
    ema = make_ema(model, cfg.ema)
    loss_fn = make_loss(cfg, float(labels[:1000].mean()))
    losses = []
    for _ in range(cfg.epochs):
        stats = train_one_epoch(
            model, array_batches(images[:1000], labels[:1000], 32), opt, loss_fn=loss_fn, scheduler=sched, ema=ema
        )
        assert stats["images"] == 1000 and stats["images_per_s"] > 0
        losses.append(stats["train_loss"])
    assert losses[-1] < losses[0]
    y, p = predict_probs(model, array_batches(images[1000:], labels[1000:], 50))
    assert y.tolist() == labels[1000:].tolist() and p.shape == (200,) and np.all((p >= 0) & (p <= 1))
    assert roc_auc(y, p) > 0.65  # chance is 0.5
    _, p_ema = predict_probs(ema.module, array_batches(images[1000:], labels[1000:], 50))
    assert not np.allclose(p, p_ema)  # the average is a different network
    assert sched.get_last_lr()[0] < cfg.lr * 0.05  # cosine reached (nearly) zero at the end


def test_nan_loss_is_an_error_that_says_what_to_do(phantoms):
    images, labels = phantoms
    model = build_model("tiny", image_size=48)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    cfg = TrialConfig(image_size=48)
    with pytest.raises(FloatingPointError, match="learning rate"):
        train_one_epoch(
            model, array_batches(images[:32], labels[:32], 16), make_optimizer(model, cfg), loss_fn=make_loss(cfg, 0.5)
        )


def test_balanced_weighting_and_label_smoothing_change_the_loss():
    logits, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 1])
    plain = make_loss(TrialConfig(), 0.75)(logits, y)
    balanced = make_loss(TrialConfig(class_weighting="balanced"), 0.75)(logits, y)
    smooth = make_loss(TrialConfig(label_smoothing=0.2), 0.75)(logits, y)
    assert balanced < plain  # positives weigh 1/3 when they are 75% of train
    assert smooth != plain


def test_mixup_blends_images_and_labels_alike_and_is_repeatable():
    from xray_ray.model.train import mix

    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(8)])
    y = torch.tensor([0, 1] * 4)
    x1, y1 = mix(x, y, 0.4, torch.Generator().manual_seed(5))
    x2, y2 = mix(x, y, 0.4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(y1, y2)
    # each mixed image is lam * x_i + (1 - lam) * x_perm(i); the label carries the same weights
    lam_perm = [(float(x1[i, 0, 0, 0]), float(y1[i])) for i in range(8)]
    assert any(0 < lbl < 1 for _, lbl in lam_perm) or all(lbl in (0.0, 1.0) for _, lbl in lam_perm)
    assert not torch.equal(x1, x) and torch.all((y1 >= 0) & (y1 <= 1))


def test_standardized_model_ignores_exposure_and_contrast():
    from xray_ray.model.cnn import build_model

    torch.manual_seed(0)
    m = build_model(image_size=32, blocks=2, double_conv=False, width=4, fc=(), head="gap", standardize=True).eval()
    x = torch.rand(4, 1, 32, 32) * 0.5 + 0.2
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x * 1.4 + 0.1), atol=2e-3, rtol=2e-3)
        plain = build_model(image_size=32, blocks=2, double_conv=False, width=4, fc=(), head="gap").eval()
        assert not torch.allclose(plain(x), plain(x * 1.4 + 0.1), atol=1e-3)


def test_one_cycle_follows_torch_one_cycle_lr():
    """schedule onecycle is OneCycleLR with its defaults, step for step, over the trial's own epochs."""
    cfg = TrialConfig(epochs=10, lr=2e-3, schedule="onecycle")
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ours = make_scheduler(ours_opt, cfg, steps_per_epoch=7)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=cfg.lr, total_steps=70)
    seen_ours, seen_ref = [], []
    for _ in range(70):
        seen_ours.append(ours.get_last_lr()[0])
        seen_ref.append(ref.get_last_lr()[0])
        for opt, sched in ((ours_opt, ours), (ref_opt, ref)):
            opt.step()
            sched.step()
    assert np.allclose(seen_ours, seen_ref, rtol=1e-6, atol=1e-12)
    assert seen_ours[0] == pytest.approx(cfg.lr / 25) and max(seen_ours) == pytest.approx(cfg.lr)
    assert int(np.argmax(seen_ours)) == 20 and seen_ours[-1] < cfg.lr / 1e5


def test_one_cycle_refuses_a_second_warm_up():
    from xray_ray.errors import UserError

    with pytest.raises(UserError, match="onecycle has its own warm-up"):
        TrialConfig.from_dict({"epochs": 10, "schedule": "onecycle", "warmup_epochs": 1})
