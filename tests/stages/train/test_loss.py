"""MaskContrast losses against hand computations, closed forms and the naive reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.train.loss import (
    PrototypeQueue,
    balanced_bce,
    contrastive_loss,
    contrastive_loss_naive,
)


def _inputs(dtype=torch.float64, b: int = 3, d: int = 8, h: int = 7, w: int = 9, k: int = 6):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    masks = torch.rand(b, h, w, generator=g) > 0.4
    masks[1, :5] = True  # unequal anchor counts per image, so the weights matter
    protos = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q, masks, protos, queue


def _loss_and_grads(fn, q, masks, protos, queue, **kwargs):
    q, protos, queue = (t.detach().clone().requires_grad_() for t in (q, protos, queue))
    loss = fn(q, masks, protos, queue, 0.5, **kwargs)
    return (loss, *torch.autograd.grad(loss, [q, protos, queue]))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])  # 7 and 64 do not divide the anchors
def test_chunked_equals_naive_in_value_and_gradients(chunk_size: int) -> None:
    q, masks, protos, queue = _inputs()
    assert masks.sum() % 7 != 0 and masks.sum() % 64 != 0
    expected = _loss_and_grads(contrastive_loss_naive, q, masks, protos, queue)
    actual = _loss_and_grads(contrastive_loss, q, masks, protos, queue, chunk_size=chunk_size)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_chunked_equals_naive_in_float32() -> None:
    q, masks, protos, queue = _inputs(torch.float32, b=4, d=32, h=16, w=16, k=8)
    expected = _loss_and_grads(contrastive_loss_naive, q, masks, protos, queue)
    actual = _loss_and_grads(contrastive_loss, q, masks, protos, queue, chunk_size=100)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_invalid_prototypes_drop_their_anchors() -> None:
    q, masks, protos, queue = _inputs()
    valid = torch.tensor([True, False, True])
    protos[1] = 0.0
    expected = _loss_and_grads(contrastive_loss_naive, q, masks, protos, queue, valid=valid)
    actual = _loss_and_grads(contrastive_loss, q, masks, protos, queue, valid=valid, chunk_size=5)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert actual[1][1].abs().sum() == 0  # image 1's pixels are not anchors
    # the same as removing those pixels from the query mask
    cut = masks.clone()
    cut[1] = False
    torch.testing.assert_close(actual[0], contrastive_loss(q, cut, protos, queue, 0.5))


def test_loss_matches_a_hand_written_weighted_cross_entropy() -> None:
    q, masks, protos, queue = _inputs(b=2, d=4, h=3, w=4, k=3)
    masks[0] = False
    masks[0, 0, :3] = True  # 3 anchors in image 0
    masks[1] = True  # 12 anchors in image 1
    columns = torch.cat([protos, queue]).tolist()
    terms, weights = [], []
    for b in range(2):
        for i in range(3):
            for j in range(4):
                if not masks[b, i, j]:
                    continue
                v = q[b, :, i, j].tolist()
                n = math.sqrt(sum(x * x for x in v))
                logits = [sum(x / n * c for x, c in zip(v, col)) / 0.5 for col in columns]
                ce = math.log(sum(math.exp(z) for z in logits)) - logits[b]
                weight = 1 / math.log(1.02 + (3 if b == 0 else 12) / 15)
                terms.append(weight * ce)
                weights.append(weight)
    expected = sum(terms) / sum(weights)
    chunked = contrastive_loss(q, masks, protos, queue, 0.5, chunk_size=4)
    assert chunked.item() == pytest.approx(expected, rel=1e-12)
    naive = contrastive_loss_naive(q, masks, protos, queue, 0.5)
    assert naive.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [0, 5])
def test_equal_logits_give_log_of_the_number_of_columns(k: int) -> None:
    # anchors along e0, every prototype and queue entry orthogonal to e0: all logits are 0
    b, d = 3, 6
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(b, d, 4, 5, dtype=torch.float64)
    q[:, 0] = torch.rand(b, 4, 5, generator=g, dtype=torch.float64) + 0.1
    masks = torch.rand(b, 4, 5, generator=g) > 0.3
    off_e0 = torch.tensor([0.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    protos = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64) * off_e0, dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64) * off_e0, dim=1)
    for fn in (contrastive_loss, contrastive_loss_naive):
        assert fn(q, masks, protos, queue, 0.5).item() == pytest.approx(math.log(b + k), rel=1e-12)


def test_no_anchors_gives_zero_loss_and_zero_gradient() -> None:
    q, masks, protos, queue = _inputs()
    q.requires_grad_()
    loss = contrastive_loss(q, torch.zeros_like(masks), protos, queue, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and q.grad is not None and q.grad.abs().sum() == 0
    all_invalid = torch.zeros(3, dtype=torch.bool)
    assert contrastive_loss(q, masks, protos, queue, 0.5, valid=all_invalid).item() == 0.0


def test_chunked_loss_under_autocast_is_float32() -> None:
    q, masks, protos, queue = _inputs(torch.float32, b=2, d=16, h=8, w=8, k=4)
    q_half = q.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(q_half, masks, protos, queue, 0.5, chunk_size=10)
    loss.backward()
    reference = _loss_and_grads(contrastive_loss_naive, q_half.detach().float(), masks, protos, queue)
    assert loss.dtype == torch.float32 and q_half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_half.grad.float(), reference[1], rtol=2e-2, atol=1e-4)


def test_loss_rejects_bad_shapes() -> None:
    q, masks, protos, queue = _inputs()
    with pytest.raises(ValueError, match=r"masks_q must be \(3, 7, 9\)"):
        contrastive_loss(q, masks[:, :5], protos, queue, 0.5)
    with pytest.raises(ValueError, match=r"prototypes must be \(3, 8\)"):
        contrastive_loss(q, masks, protos[:2], queue, 0.5)
    with pytest.raises(ValueError, match="queue must be K x 8"):
        contrastive_loss(q, masks, protos, queue[:, :4], 0.5)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        contrastive_loss(q, masks, protos, queue, 0.5, chunk_size=0)


def _batch(i: int, n: int = 2, d: int = 3) -> torch.Tensor:
    return torch.full((n, d), float(i)) + torch.arange(n, dtype=torch.float32)[:, None] / 10


def test_queue_fifo_with_wrap_around() -> None:
    queue = PrototypeQueue(size=6, dim=3)
    assert queue.negatives().shape == (0, 3)
    queue.enqueue(_batch(1))
    torch.testing.assert_close(queue.negatives(), _batch(1))
    queue.enqueue(_batch(2))
    queue.enqueue(_batch(3))
    assert int(queue.filled) == 6 and int(queue.ptr) == 0
    torch.testing.assert_close(queue.negatives(), torch.cat([_batch(1), _batch(2), _batch(3)]))
    queue.enqueue(_batch(4))  # overwrites the oldest
    torch.testing.assert_close(queue.negatives(), torch.cat([_batch(4), _batch(2), _batch(3)]))
    queue.enqueue(_batch(5, n=3))  # rows 2, 3, 4
    queue.enqueue(_batch(6, n=3))  # rows 5, 0, 1: wraps past the end
    b5, b6 = _batch(5, n=3), _batch(6, n=3)
    torch.testing.assert_close(queue.negatives(), torch.cat([b6[1:], b5, b6[:1]]))
    assert int(queue.ptr) == 2 and int(queue.filled) == 6


def test_queue_negatives_are_a_snapshot() -> None:
    queue = PrototypeQueue(size=2, dim=3)
    queue.enqueue(_batch(1))
    negatives = queue.negatives()
    queue.enqueue(_batch(2))
    torch.testing.assert_close(negatives, _batch(1))


def test_queue_state_dict_round_trip(tmp_path) -> None:
    queue = PrototypeQueue(size=4, dim=3)
    for i in range(3):
        queue.enqueue(_batch(i))
    torch.save(queue.state_dict(), tmp_path / "queue.pt")
    restored = PrototypeQueue(size=4, dim=3)
    restored.load_state_dict(torch.load(tmp_path / "queue.pt", weights_only=True))
    for q in (queue, restored):
        q.enqueue(_batch(7))
    assert torch.equal(restored.negatives(), queue.negatives())
    assert int(restored.ptr) == int(queue.ptr) == 0 and int(restored.filled) == 4
    torch.testing.assert_close(restored.negatives(), torch.cat([_batch(2), _batch(7)]))


def test_queue_rejects_batches_that_do_not_divide_it() -> None:
    queue = PrototypeQueue(size=6, dim=3)
    with pytest.raises(ValueError, match="queue size 6 is not a multiple of the batch of 4"):
        queue.enqueue(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"prototypes must be n x 3"):
        queue.enqueue(torch.zeros(2, 5))


def test_balanced_bce_by_hand() -> None:
    logits = [[0.5, -1.0], [2.0, 0.0]]
    labels = [[1, 0], [0, 0]]  # 1 positive, 3 negatives
    w_pos, w_neg = 3 / 4, 1 / 4
    total = 0.0
    for row_x, row_y in zip(logits, labels):
        for x, y in zip(row_x, row_y):
            p = 1 / (1 + math.exp(-x))
            total += w_pos * -math.log(p) if y else w_neg * -math.log(1 - p)
    expected = total / 4
    masks = torch.tensor(labels, dtype=torch.bool).view(1, 2, 2)
    actual = balanced_bce(torch.tensor(logits).view(1, 1, 2, 2), masks)
    assert actual.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"masks must be \(1, 2, 2\)"):
        balanced_bce(torch.zeros(1, 1, 2, 2), torch.zeros(2, 2))


def test_balanced_bce_weights_come_from_the_whole_batch() -> None:
    logits = torch.tensor([0.3, -0.2, 1.5, -2.0]).view(2, 1, 1, 2)
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(2, 1, 2)  # 3 of 4 pixels positive
    bce = F.binary_cross_entropy_with_logits(logits.view(2, 1, 2), masks, reduction="none")
    expected = (0.25 * bce[masks == 1].sum() + 0.75 * bce[masks == 0].sum()) / 4
    torch.testing.assert_close(balanced_bce(logits, masks), expected)


@pytest.mark.gpu
def test_chunked_equals_naive_on_cuda_under_autocast() -> None:
    q, masks, protos, queue = (t.cuda() for t in _inputs(torch.float32, b=4, d=32, h=32, w=32, k=8))
    expected = _loss_and_grads(contrastive_loss_naive, q, masks, protos, queue)
    q_half = q.to(torch.float16).requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = contrastive_loss(q_half, masks, protos, queue, 0.5, chunk_size=300)
    loss.backward()
    assert loss.dtype == torch.float32 and q_half.grad.dtype == torch.float16
    torch.testing.assert_close(loss, expected[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(q_half.grad.float(), expected[1], rtol=2e-2, atol=1e-4)
