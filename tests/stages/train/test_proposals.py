"""Several proposals per image in training: one prototype per proposal (the loss against a
per-anchor reference), proposals dropped when they leave the crop, the queue rule on proposals,
and with one proposal per image exactly the one-mask loss, gradients and training."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from artifacts.checkpoints import LOG_FILE, MODEL_FILE, read_jsonl
from artifacts.masks import MaskRecord, MaskStore, Proposal, write_mask_shard
from stages.common.prototypes import mask_prototypes, slot_prototypes
from stages.data import Sample
from stages.train import TrainParams, train
from stages.train.data import NO_PROPOSAL, TrainDataError, TwoViewDataset, ViewAugment, keep_proposals, label_map
from stages.train.step import proposal_columns, proposal_counts
from stages.train.trainer import proposal_slots
from stages.train.loss import (
    PrototypeQueue,
    contrastive_loss,
    proposal_contrastive_loss,
    proposal_contrastive_loss_naive,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the loss


def _labelled(dtype=torch.float64, b=3, d=8, h=7, w=9, k=5):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    labels = torch.randint(0, 4, (b, h, w), generator=g).to(torch.uint8)  # 3 slots per image
    labels[0, 0] = NO_PROPOSAL  # foreground of no proposal: not an anchor
    column_of = torch.tensor([[0, 1, 2], [3, -1, 4], [5, 6, -1]])  # image 1 lost slot 1, image 2 slot 2
    protos = F.normalize(torch.randn(7, d, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q, labels, column_of, protos, queue


def _grads(fn, q, labels, column_of, protos, queue, **kwargs):
    q, protos, queue = (t.detach().clone().requires_grad_() for t in (q, protos, queue))
    loss = fn(q, labels, column_of, protos, queue, 0.5, **kwargs)
    return (loss, *torch.autograd.grad(loss, [q, protos, queue]))


@pytest.mark.parametrize("chunk_size", [1, 13, 100_000])
def test_proposal_loss_equals_the_per_anchor_reference(chunk_size):
    q, labels, column_of, protos, queue = _labelled()
    valid = torch.ones(7, dtype=torch.bool)
    valid[4] = False
    expected = _grads(proposal_contrastive_loss_naive, q, labels, column_of, protos, queue, valid=valid)
    actual = _grads(proposal_contrastive_loss, q, labels, column_of, protos, queue, valid=valid,
                    chunk_size=chunk_size)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    anchors_of_nothing = (labels == NO_PROPOSAL) | (labels == 0)
    anchors_of_nothing[1] |= labels[1] == 2  # slot 1 of image 1 has no column
    anchors_of_nothing[1] |= labels[1] == 3  # column 4 is invalid
    anchors_of_nothing[2] |= labels[2] == 3  # slot 2 of image 2 has no column
    grad_q = actual[1].abs().sum(1)  # B x H x W
    assert (grad_q[anchors_of_nothing] == 0).all() and (grad_q[~anchors_of_nothing] > 0).all()


def test_a_proposal_is_pushed_from_its_own_images_other_proposals():
    """Two proposals of one image: each anchor's negatives include the other proposal."""
    q = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    q[0, 0, 0, 0] = q[0, 1, 0, 1] = 1.0  # pixel 0 along e0, pixel 1 along e1
    labels = torch.tensor([[[1, 2]]], dtype=torch.uint8)
    protos = torch.eye(2, dtype=torch.float64)
    loss = proposal_contrastive_loss(q, labels, torch.tensor([[0, 1]]), protos, protos[:0], 1.0)
    # each anchor: logits (1, 0) with its own column first -> -log(e / (e + 1)); equal weights
    torch.testing.assert_close(loss, torch.tensor(-np.log(np.e / (np.e + 1)), dtype=torch.float64))


def test_one_proposal_per_image_is_the_one_mask_loss_to_the_bit():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 16, 12, 12, generator=g)
    masks = torch.rand(4, 12, 12, generator=g) > 0.5
    protos = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    valid = torch.tensor([True, True, False, True])
    one = [t.clone().requires_grad_() for t in (q, q)]
    a = contrastive_loss(one[0], masks, protos, queue, 0.2, valid, chunk_size=50)
    b = proposal_contrastive_loss(one[1], masks.to(torch.uint8), torch.arange(4)[:, None], protos, queue, 0.2,
                                  valid, chunk_size=50)
    assert torch.equal(a, b)
    assert torch.equal(*(torch.autograd.grad(x, t)[0] for x, t in ((a, one[0]), (b, one[1]))))


# --------------------------------------------------------------------------- prototypes and columns


def test_slot_prototypes_are_mask_prototypes_per_label():
    g = torch.Generator().manual_seed(2)
    key = F.normalize(torch.randn(3, 5, 6, 6, generator=g), dim=1)
    masks = torch.rand(3, 6, 6, generator=g) > 0.5
    masks[1] = False  # empty: invalid
    slots, valid = slot_prototypes(key, masks.to(torch.uint8), 1)
    expected, expected_valid = mask_prototypes(key, masks)
    assert torch.equal(slots[:, 0], expected) and torch.equal(valid[:, 0], expected_valid)
    labels = torch.randint(0, 3, (3, 6, 6), generator=g).to(torch.uint8)
    labels[2][labels[2] == 2] = 1  # image 2 has no slot 2
    slots, valid = slot_prototypes(key, labels, 2)
    for b in range(3):
        for slot in range(2):
            want, ok = mask_prototypes(key[b:b + 1], labels[b:b + 1] == slot + 1)
            torch.testing.assert_close(slots[b, slot], want[0])
            assert bool(valid[b, slot]) == bool(ok[0])
    assert not valid[2, 1]


def test_columns_follow_image_then_slot_order():
    slots = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)
    counts = torch.tensor([2, 1, 2])
    protos, valid, column_of = proposal_columns(slots, torch.ones(3, 2, dtype=torch.bool), counts)
    assert protos.squeeze(1).tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert column_of.tolist() == [[0, 1], [2, -1], [3, 4]] and valid.all()
    labels = torch.tensor([[[0, 1, 2]], [[NO_PROPOSAL, 1, 0]], [[0, 0, 0]]], dtype=torch.uint8)
    assert proposal_counts(labels, 2).tolist() == [2, 1, 0]


def test_the_queue_takes_any_number_of_proposals_with_the_proposal_rule():
    queue = PrototypeQueue(4, 2)
    rows = torch.arange(10, dtype=torch.float32).view(5, 2)
    queue.enqueue(rows[:3], any_count=True)
    assert int(queue.filled) == 3 and int(queue.ptr) == 3
    queue.enqueue(rows[3:5], any_count=True)  # wraps around: the 4 most recent
    assert sorted(queue.negatives()[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0]
    queue.enqueue(torch.cat([rows, rows]), any_count=True)  # more than K: the last K
    assert sorted(queue.negatives()[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(rows[:3])


# --------------------------------------------------------------------------- data


def test_label_maps_and_proposals_dropped_when_they_leave_the_crop():
    mask = np.zeros((4, 6), bool)
    mask[:, :4] = True
    a, b = np.zeros_like(mask), np.zeros_like(mask)
    a[:, :2], b[:, 2:3] = True, True
    labels = label_map(mask, [a, b])
    assert labels[0].tolist() == [1, 1, 2, NO_PROPOSAL, 0, 0]
    # view q holds both proposals; view k holds only a sliver of proposal 2
    q = labels.copy()
    k = labels.copy()
    k[1:, 2] = 0
    q2, k2, n = keep_proposals(q, k, min_fg=0.05)  # 1 pixel of 24 < 5 %: proposal 2 drops out
    assert n == 1 and q2[0].tolist() == [1, 1, NO_PROPOSAL, NO_PROPOSAL, 0, 0]
    assert k2[0].tolist() == [1, 1, NO_PROPOSAL, NO_PROPOSAL, 0, 0]
    _, _, n = keep_proposals(q, k, min_fg=0.0)
    assert n == 2
    q3, _, n = keep_proposals(np.where(q == 1, 0, q).astype(np.uint8), k, 0.05)
    assert n == 0 and set(np.unique(q3)) <= {0, NO_PROPOSAL}  # a pair with none left is redrawn


@pytest.fixture(scope="module")
def two_object_data(tmp_path_factory):
    """12 images 40 x 48 with a red and a blue square: version-1 masks (their union), version-2
    shards with one proposal per image (the union) and with the two squares."""
    root = tmp_path_factory.mktemp("proposal-data")
    rng = np.random.default_rng(0)
    samples, v1, single, two = [], [], [], []
    for i in range(12):
        pixels = rng.integers(0, 200, (40, 48, 3), dtype=np.uint8)
        a, b = np.zeros((40, 48), bool), np.zeros((40, 48), bool)
        y, x = rng.integers(0, 10, 2)
        a[y:y + 14, x:x + 14] = True
        b[y + 20:y + 30, x + 24:x + 36] = True
        pixels[a], pixels[b] = (230, 40, 40), (40, 40, 230)
        Image.fromarray(pixels).save(root / f"im{i:02d}.png")
        samples.append(Sample(f"im{i:02d}", root / f"im{i:02d}.png", None))
        mask = a | b
        v1.append(MaskRecord(f"im{i:02d}", mask))
        single.append(MaskRecord(f"im{i:02d}", mask, proposals=[Proposal(mask, 1.0)]))
        two.append(MaskRecord(f"im{i:02d}", mask, proposals=[Proposal(a, 1.0), Proposal(b, 1.0)]))
    for name, records in (("v1", v1), ("single", single), ("two", two)):
        write_mask_shard(root / name / "shard-00000.h5", records)
    return samples, root


def test_one_proposal_per_image_gives_the_one_mask_views(two_object_data):
    samples, root = two_object_data
    aug = ViewAugment(crop_size=24, scale=(0.3, 1.0))
    plain = TwoViewDataset(samples, MaskStore(root / "v1"), seed=5, aug=aug)
    labelled = TwoViewDataset(samples, MaskStore(root / "single"), seed=5, aug=aug, proposals=True)
    for index in range(len(samples)):
        a, b = plain[(1, index)], labelled[(1, index)]
        assert b[1].dtype == torch.uint8 and torch.equal(a[1], b[1] == 1) and torch.equal(a[3], b[3] == 1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[4], b[4])


def test_two_proposals_label_both_views_alike(two_object_data):
    samples, root = two_object_data
    ds = TwoViewDataset(samples, MaskStore(root / "two"), seed=5, aug=ViewAugment(crop_size=24, scale=(0.3, 1.0)),
                        proposals=True)
    seen = set()
    for index in range(len(samples)):
        _, q, _, k, _, _ = ds[(1, index)]
        n = int(proposal_counts(q[None], 254)[0])
        assert n >= 1 and int(proposal_counts(k[None], 254)[0]) == n
        for label in range(1, n + 1):
            assert (q == label).float().mean() > 0.01 and (k == label).float().mean() > 0.01
        seen.add(n)
    assert 2 in seen


# --------------------------------------------------------------------------- training

TINY = TrainParams(backbone="resnet18", epochs=1, batch_size=4, queue_size=8, crop_size=32, embedding_dim=8,
                   lr=0.05, num_workers=0, keep_last=1, device="cpu", seed=3, min_fg=0.02)


def test_one_proposal_per_image_trains_exactly_as_one_mask(two_object_data, tmp_path: Path):
    samples, root = two_object_data
    assert proposal_slots(MaskStore(root / "v1")) is None and proposal_slots(MaskStore(root / "single")) == 1
    runs = {}
    for name in ("v1", "single"):
        summary = train(TINY, samples, root / name, tmp_path / name, progress=False)
        assert summary["complete"]
        runs[name] = (torch.load(tmp_path / name / MODEL_FILE, map_location="cpu", weights_only=True),
                      [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_share", "seconds")}
                       for r in read_jsonl(tmp_path / name / LOG_FILE)])
    (w1, log1), (w2, log2) = runs["v1"], runs["single"]
    assert log1 == log2
    state1, state2 = w1["state_dict"], w2["state_dict"]
    assert state1.keys() == state2.keys() and all(torch.equal(state1[k], state2[k]) for k in state1)


def test_two_proposals_per_image_train(two_object_data, tmp_path: Path):
    samples, root = two_object_data
    assert proposal_slots(MaskStore(root / "two")) == 2
    summary = train(dataclasses.replace(TINY, epochs=2), samples, root / "two", tmp_path / "two", progress=False)
    assert summary["complete"] and np.isfinite(summary["loss"])
    state = torch.load(tmp_path / "two" / "checkpoints" / "epoch-0002.pt", map_location="cpu", weights_only=True)
    assert int(state["queue"]["filled"]) == 8  # 2 steps x 4 images x 1-2 proposals, at most K


def test_the_contrast_routes_refuse_proposals_before_any_start_up_work(two_object_data, tmp_path: Path):
    """One error line naming the mask artifact, before the initial features are computed and
    before any checkpoint is written."""
    samples, root = two_object_data
    params = dataclasses.replace(TINY, epochs=1, contrast={"space": "init", "groups": 2, "same_group": "drop"})
    with pytest.raises(TrainDataError, match=r"train.contrast needs one mask per image; .*two holds several"):
        train(params, samples, root / "two", tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
