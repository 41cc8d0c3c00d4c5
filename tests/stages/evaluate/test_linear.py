"""Linear probe on cached features: exactness of the low-resolution shortcut, loss, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.evaluate.linear import (
    LinearProbeError,
    batch_loss,
    head_from_state,
    linear_confusion,
    make_linear_head,
    predict_linear,
    train_linear_probe,
    upsampled_logits,
)
from stages.evaluate.metrics import miou
from stages.evaluate.params import LinearParams
from stages.params import ParamError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_conv_commutes_with_bilinear_upsampling():
    gen = torch.Generator().manual_seed(0)
    head = make_linear_head(5, 3, seed=1).double()
    with torch.no_grad():
        head.bias.normal_(generator=gen)  # the bias must pass through too
    feats = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    up_first = head(F.interpolate(feats, size=(7, 10), mode="bilinear", align_corners=False))
    torch.testing.assert_close(upsampled_logits(head, feats, (7, 10)), up_first, rtol=1e-12, atol=1e-12)


def test_head_init():
    head = make_linear_head(256, 21, seed=3)
    assert head.weight.shape == (21, 256, 1, 1) and torch.all(head.bias == 0)
    w = head.weight.detach()
    assert 0.0095 < float(w.std()) < 0.0105 and abs(float(w.mean())) < 5e-4
    torch.testing.assert_close(make_linear_head(256, 21, seed=3).weight, head.weight)


def test_batch_loss_equals_padded_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    head = make_linear_head(4, 3, seed=0)
    sizes = [((2, 3), (8, 8)), ((2, 3), (6, 10)), ((3, 3), (8, 8))]  # mixed feature and label sizes
    batch = []
    for (h, w), (big_h, big_w) in sizes:
        label = torch.randint(0, 3, (big_h, big_w), generator=gen).to(torch.uint8)
        label[0] = 255
        batch.append((torch.randn(4, h, w, generator=gen).half().numpy(), label.numpy()))
    total, n_valid = batch_loss(head, batch)
    logits = torch.zeros(3, 3, 8, 10)
    labels = torch.full((3, 8, 10), 255, dtype=torch.long)
    for i, (f, lbl) in enumerate(batch):
        big_h, big_w = lbl.shape
        logits[i, :, :big_h, :big_w] = upsampled_logits(head, torch.from_numpy(f).float()[None], (big_h, big_w))[0]
        labels[i, :big_h, :big_w] = torch.from_numpy(lbl).long()
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert n_valid == int((labels != 255).sum())
    torch.testing.assert_close(total / n_valid, expected)


def separable(rng, codes, n, h=6, w=6, scale=4):
    """Low-res features = class code (n_cls, C) + noise over 2x2-cell blocks; labels nearest-upsampled x scale."""
    n_cls, c = codes.shape
    out = []
    for _ in range(n):
        blocks = rng.integers(0, n_cls, (h // 2, w // 2))
        cls_map = np.kron(blocks, np.ones((2, 2), int))
        feats = (codes[cls_map] + 0.1 * rng.normal(size=(h, w, c))).transpose(2, 0, 1)
        label = np.kron(cls_map, np.ones((scale, scale), int)).astype(np.uint8)
        label[rng.random(label.shape) < 0.05] = 255
        out.append((feats.astype(np.float16), label))
    return out


def test_linear_probe_separable_near_perfect(rng):
    codes = rng.normal(size=(4, 12)) * 2
    train, val = separable(rng, codes, 24), separable(rng, codes, 8)
    logs = []
    result = train_linear_probe(
        lambda epoch: [train[i] for i in np.random.default_rng((0, epoch)).permutation(len(train))],
        n_cls=4, in_dim=12, epochs=8, batch_size=4, lr_drop_epoch=5, seed=0,
        val_iter_fn=lambda: iter(val), on_epoch_end=logs.append,
    )
    assert [log.lr for log in logs] == pytest.approx([0.1] * 5 + [0.01] * 3)
    assert logs[-1].train_loss < logs[0].train_loss
    assert result.last_val_miou > 97.0
    assert result.best_val_miou >= result.last_val_miou and result.best_epoch is not None
    best = head_from_state(result.best_state)
    assert 100 * miou(linear_confusion(best, val, 4)) == pytest.approx(result.best_val_miou)
    feats, label = val[0]
    assert predict_linear(result.head, feats, label.shape).shape == label.shape
    metrics = result.metrics()
    assert metrics["miou"] == result.last_val_miou and metrics["seeds"] == [0]
    assert np.mean(metrics["per_class_iou"]) == pytest.approx(result.last_val_miou)
    assert metrics["miou_best_on_val"] == result.best_val_miou


def test_the_batch_size_is_checked_by_the_parameters():
    with pytest.raises(ParamError, match=r"^batch_size: must be >= 1, got 0$"):
        LinearParams(batch_size=0)


def test_linear_probe_errors(rng):
    with pytest.raises(LinearProbeError, match="no labelled pixel"):
        train_linear_probe(lambda e: [(np.zeros((3, 2, 2), np.float32), np.full((4, 4), 255, np.uint8))],
                           n_cls=2, in_dim=3, epochs=1)
    with pytest.raises(LinearProbeError, match="features have 4 channels, the head expects 3"):
        train_linear_probe(lambda e: [(np.zeros((4, 2, 2), np.float32), np.zeros((4, 4), np.uint8))],
                           n_cls=2, in_dim=3, epochs=1)
    with pytest.raises(LinearProbeError, match=r"expected features \(C, h, w\)"):
        train_linear_probe(lambda e: [(np.zeros((2, 2), np.float32), np.zeros((4, 4), np.uint8))],
                           n_cls=2, in_dim=3, epochs=1)


@pytest.mark.gpu
def test_linear_probe_on_gpu_matches_cpu(rng):
    codes = rng.normal(size=(4, 12)) * 2
    train, val = separable(rng, codes, 16), separable(rng, codes, 4)
    runs = [train_linear_probe(lambda e: train, n_cls=4, in_dim=12, epochs=4, batch_size=4, seed=0, device=device,
                               val_iter_fn=lambda: iter(val)) for device in ("cpu", "cuda")]
    assert runs[1].head.weight.device.type == "cuda"
    assert runs[1].last_val_miou > 95.0
    assert runs[1].last_val_miou == pytest.approx(runs[0].last_val_miou, abs=1.0)
