"""False negatives out, semantic positives in (stages/train/neighbours.py): the selection rule on
planted prototypes, the masked multi-positive loss against straightforward references (value and
gradients), and training with every option off being today's training."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from stages.params import ParamError
from stages.train import TrainParams, train
from stages.train.data import TrainDataError
from stages.train.params import ContrastParams
from stages.train import step, trainer
from stages.train.loss import contrastive_loss, contrastive_loss_naive
from stages.train.neighbours import (
    ColumnRule,
    contrastive_loss_targets,
    contrastive_loss_targets_naive,
    initial_features,
    near_duplicate_groups,
    pooled_features,
    select_columns,
)
from tests.stages.train.test_trainer import TINY, _state, data  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(b=4, d=8, h=5, w=6, k=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, h, w, generator=g, dtype=dtype, requires_grad=True)
    masks = torch.rand(b, h, w, generator=g) > 0.4
    protos = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return q, masks, protos, queue


def _planted(n_classes=3, per_class_batch=2, per_class_queue=4, d=16, noise=0.05, seed=0):
    """Batch and queue prototypes of ``n_classes`` planted classes (centre + small noise);
    returns them and the class of every column [batch; queue]."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, d, generator=g), dim=1)
    batch_cls = torch.arange(n_classes).repeat_interleave(per_class_batch)
    queue_cls = torch.arange(n_classes).repeat(per_class_queue)
    make = lambda cls: F.normalize(centres[cls] + noise * torch.randn(len(cls), d, generator=g), dim=1)  # noqa: E731
    return make(batch_cls), make(queue_cls), torch.cat([batch_cls, queue_cls])


# --------------------------------------------------------------------------- the selection rule


def test_false_negative_filtering_removes_the_planted_same_class_negatives() -> None:
    protos, queue, cls = _planted()
    b = protos.shape[0]
    same = cls[:b, None] == cls[None, :]  # B x N, the own column included
    own = torch.eye(b, cls.numel(), dtype=torch.bool)
    per_row = int(same[0].sum()) - 1  # same-class columns besides the own one: 1 + 4
    for rule in (ColumnRule(fn_threshold=0.8), ColumnRule(fn_topk=per_row)):
        keep, targets = select_columns(protos, queue, rule)
        assert torch.equal(keep, ~same | own), rule  # exactly the planted same-class negatives out
        assert torch.equal(targets, own.float())  # no extra positives
    keep, _ = select_columns(protos, queue, ColumnRule(fn_topk=2))
    assert (keep.sum(1) == cls.numel() - 2).all() and not (~keep & ~same).any()  # the 2 nearest: own class


def test_nearest_neighbour_positives_are_the_planted_same_class_columns() -> None:
    protos, queue, cls = _planted()
    b = protos.shape[0]
    keep, targets = select_columns(protos, queue, ColumnRule(nn_topk=3, nn_weight=0.6, fn_threshold=0.8))
    extra = targets - torch.eye(b, cls.numel())
    assert torch.allclose(extra.sum(1), torch.full((b,), 0.6))
    assert ((extra > 0).sum(1) == 3).all()
    assert (cls[None, :].expand(b, -1)[extra > 0].view(b, 3) == cls[:b, None]).all()  # same class
    assert keep[extra > 0].all() and keep[torch.arange(b), torch.arange(b)].all()  # positives stay in the softmax


def test_empty_prototypes_are_never_selected() -> None:
    protos, queue, _ = _planted()
    protos[1] = 0.0  # an image with an empty key mask
    queue[:5] = 0.0  # queue rows of such images
    keep, targets = select_columns(protos, queue, ColumnRule(fn_topk=40, nn_topk=40))
    zero = torch.cat([protos, queue]).norm(dim=1) == 0
    own = torch.eye(*targets.shape)
    assert keep[:, zero].all() and torch.equal(targets[:, zero], own[:, zero])
    assert keep[1].all() and torch.equal(targets[1], own[1])  # the empty image selects nothing


def test_rule_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"fn_threshold must be a cosine in \[-1, 1\], got 1.5"):
        ColumnRule(fn_threshold=1.5)
    with pytest.raises(ValueError, match="fn_topk and nn_topk must be >= 0"):
        ColumnRule(nn_topk=-1)
    with pytest.raises(ParamError, match=r"unknown keys \['nn_k'\]") as info:
        TrainParams(contrast={"nn_k": 2})
    assert info.value.key == "contrast"
    with pytest.raises(ParamError, match="must be >= 0.0, got -1") as info:
        TrainParams(contrast={"nn_topk": 2, "nn_weight": -1})
    assert info.value.key == "contrast.nn_weight"
    with pytest.raises(ParamError, match="contrast.space: expected one of 'head', 'backbone', 'init', got 'trunk'"):
        TrainParams(contrast={"space": "trunk"})
    assert not ColumnRule().active and not ColumnRule(nn_weight=2.0).active and ColumnRule(fn_topk=1).active


def test_warmup_keeps_todays_loss_for_its_epochs() -> None:
    p = TrainParams(contrast={"nn_topk": 2, "warmup_epochs": 3})
    assert [step.column_rule(p, e) is None for e in (1, 3, 4)] == [True, True, False]
    assert step.column_rule(p, 4) == ColumnRule(nn_topk=2, nn_weight=1.0)
    assert all(step.column_rule(TrainParams(), e) is None for e in (None, 1, 40))  # defaults: today's loss


# --------------------------------------------------------------------------- the loss


def _loop_reference(q, masks, protos, queue, tau, keep, targets) -> torch.Tensor:
    """The loss written anchor by anchor: sum_j t_j (log sum_{kept} exp l - l_j), image weights."""
    b, d, h, w = q.shape
    columns = torch.cat([protos, queue])
    counts = masks.reshape(b, -1).sum(1).double()
    weight = 1.0 / torch.log(1.02 + counts / counts.sum())
    total, wsum = 0.0, 0.0
    for i in range(b):
        for y, x in masks[i].nonzero().tolist():
            a = q[i, :, y, x] / q[i, :, y, x].norm()
            logits = columns @ a / tau
            lse = torch.logsumexp(logits[keep[i]], dim=0)
            total = total + weight[i] * sum(targets[i, j] * (lse - logits[j]) for j in range(len(logits))
                                            if targets[i, j] != 0)
            wsum = wsum + weight[i]
    return total / wsum


@pytest.mark.parametrize("rule", [ColumnRule(fn_topk=3), ColumnRule(fn_threshold=0.1),
                                  ColumnRule(nn_topk=2, nn_weight=0.5), ColumnRule(fn_topk=4, nn_topk=2, nn_weight=2.0)])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_equals_the_references_in_value_and_gradients(rule: ColumnRule, chunk_size: int) -> None:
    q, masks, protos, queue = _inputs()
    keep, targets = select_columns(protos, queue, rule)
    assert not keep.all() or (targets > 0).sum() > 4  # the rule does something here
    ref = _loop_reference(q, masks, protos, queue, 0.5, keep, targets)
    naive = contrastive_loss_targets_naive(q, masks, protos, queue, 0.5, keep, targets)
    chunked = contrastive_loss_targets(q, masks, protos, queue, 0.5, keep, targets, chunk_size=chunk_size)
    g_ref, = torch.autograd.grad(ref, q)
    g_naive, = torch.autograd.grad(naive, q)
    g_chunked, = torch.autograd.grad(chunked, q)
    assert torch.allclose(naive, ref, atol=1e-12) and torch.allclose(chunked, ref, atol=1e-12)
    assert torch.allclose(g_naive, g_ref, atol=1e-12) and torch.allclose(g_chunked, g_ref, atol=1e-12)


def test_chunked_gradient_passes_gradcheck() -> None:
    q, masks, protos, queue = _inputs(b=3, d=4, h=3, w=4, k=6)
    keep, targets = select_columns(protos, queue, ColumnRule(fn_topk=2, nn_topk=2, nn_weight=0.7))
    assert torch.autograd.gradcheck(
        lambda x: contrastive_loss_targets(x, masks, protos, queue, 0.5, keep, targets, chunk_size=5), (q,))


def test_all_columns_and_one_hot_targets_are_todays_loss() -> None:
    q, masks, protos, queue = _inputs(seed=1)
    b, n = protos.shape[0], protos.shape[0] + queue.shape[0]
    keep, targets = torch.ones(b, n, dtype=torch.bool), torch.eye(b, n, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True])
    today = contrastive_loss_naive(q, masks, protos, queue, 0.5, valid)
    new = contrastive_loss_targets(q, masks, protos, queue, 0.5, keep, targets, valid)
    assert torch.allclose(today, new, atol=1e-12)
    assert torch.allclose(*(torch.autograd.grad(x, q)[0] for x in (today, new)), atol=1e-12)


def test_masking_every_negative_with_one_target_gives_zero_loss() -> None:
    q, masks, protos, queue = _inputs(seed=2)
    b, n = protos.shape[0], protos.shape[0] + queue.shape[0]
    keep = torch.eye(b, n, dtype=torch.bool)
    assert contrastive_loss_targets(q, masks, protos, queue, 0.5, keep, keep.double()).item() == 0.0
    # equal logits over the kept columns: log(number kept)
    same = torch.zeros_like(q).detach()
    same[:, 0] = 1.0
    flat = torch.zeros_like(protos)
    keep[:, b:b + 3] = True
    loss = contrastive_loss_targets(same, masks, flat, torch.zeros_like(queue), 0.5, keep, torch.eye(b, n).double())
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-12)


def test_targets_on_masked_columns_are_refused() -> None:
    q, masks, protos, queue = _inputs()
    keep = torch.ones(4, 12, dtype=torch.bool)
    keep[0, 5] = False
    targets = torch.eye(4, 12, dtype=torch.float64)
    targets[0, 5] = 0.5
    with pytest.raises(ValueError, match="a target column is masked out"):
        contrastive_loss_targets(q, masks, protos, queue, 0.5, keep, targets)
    with pytest.raises(ValueError, match=r"keep and targets must be \(4, 12\)"):
        contrastive_loss_targets(q, masks, protos, queue, 0.5, keep[:, :5], targets)


# --------------------------------------------------------------------------- training


def test_every_option_off_trains_exactly_todays_weights(data, tmp_path, monkeypatch) -> None:
    """Defaults (``contrast`` absent, or given with its default values) take today's code path:
    the same weights, bit for bit, as a run whose step is forced onto the plain loss."""
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=1)  # 3 steps
    train(params, samples, masks, tmp_path / "default", progress=False)
    train(dataclasses.replace(params, contrast=dataclasses.asdict(ContrastParams())), samples, masks,
          tmp_path / "explicit", progress=False)
    real_step = step.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: real_step(*a, **{**k, "rule": None,
                                                                                "contrastive_fn": contrastive_loss}))
    train(params, samples, masks, tmp_path / "today", progress=False)
    weights = [_state(tmp_path / run / "model.pt")["state_dict"] for run in ("default", "explicit", "today")]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[2][name]) and torch.equal(weights[1][name], weights[2][name])


def test_a_rule_that_selects_nothing_trains_todays_weights_up_to_rounding(data, tmp_path) -> None:
    """The new loss path with nothing dropped (no cosine exceeds 1) is today's loss: same weights
    after 3 steps up to float rounding; with a real rule the weights differ."""
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=1)
    runs = {"today": {}, "noop": {"fn_threshold": 1.0}, "nn": {"nn_topk": 2}}
    for name, contrast in runs.items():
        train(dataclasses.replace(params, contrast=contrast), samples, masks, tmp_path / name, progress=False)
    w = {name: _state(tmp_path / name / "model.pt")["state_dict"] for name in runs}
    floats = [k for k in w["today"] if w["today"][k].is_floating_point()]
    diff = {name: max((w["today"][k] - w[name][k]).abs().max().item() for k in floats) for name in ("noop", "nn")}
    assert diff["noop"] < 1e-3 and diff["nn"] > 0.1, diff  # float32 rounding, amplified over 3 steps


# --------------------------------------------------------------------------- the backbone space


def test_pooled_features_are_the_normalised_masked_means() -> None:
    grid = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # exactly cell (0, 0)
    masks[0, 2:, 2:3] = True  # half of cell (1, 1)
    pooled = pooled_features(grid, masks)
    expected = F.normalize(grid[0, :, 0, 0] + 0.5 * grid[0, :, 1, 1], dim=0)
    assert torch.allclose(pooled[0], expected) and torch.equal(pooled[1], torch.zeros(3))  # empty: zero row


def test_the_backbone_space_decides_the_selection() -> None:
    """Prototypes random, the planted classes only in the space: the rule follows the space."""
    space_b, space_q, cls = _planted()
    protos, queue = (F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=1)
                     for n in (space_b.shape[0], space_q.shape[0]))
    b = protos.shape[0]
    same = cls[:b, None] == cls[None, :]
    keep, _ = select_columns(protos, queue, ColumnRule(fn_threshold=0.8, space="backbone"), space=(space_b, space_q))
    assert torch.equal(keep, ~same | torch.eye(b, cls.numel(), dtype=torch.bool))
    protos[0] = 0.0  # an invalid prototype selects nothing, whatever its features
    _, targets = select_columns(protos, queue, ColumnRule(nn_topk=2, nn_weight=1.0, space="backbone"),
                                 space=(space_b, space_q))
    assert torch.equal(targets[0], torch.eye(b, cls.numel())[0]) and (targets[1:] > 0).sum() == 5 * 3  # own + 2 each
    with pytest.raises(ValueError, match="space rows"):
        select_columns(protos, queue, ColumnRule(nn_topk=2), space=(space_b[:2], space_q))


def test_backbone_space_trains_and_resumes_exactly(data, tmp_path) -> None:
    """The feature queue is checkpointed beside the prototype queue: stopping after the warm-up
    epoch and continuing gives the uninterrupted run's weights and queues."""
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=2, keep_last=2,
                                 contrast={"nn_topk": 1, "fn_topk": 1, "space": "backbone", "warmup_epochs": 1})
    samples = samples[:8]  # 2 steps per epoch
    full = train(params, samples, masks, tmp_path / "full", progress=False)
    part = train(params, samples, masks, tmp_path / "run", progress=False, max_steps=2)
    assert full["complete"] and not part["complete"]
    train(params, samples, masks, tmp_path / "run", progress=False)
    a, b = (_state(tmp_path / run / "checkpoints" / "epoch-0002.pt") for run in ("full", "run"))
    for part_name in ("model", "queue", "space_queue"):
        for name in a[part_name]:
            assert torch.equal(a[part_name][name], b[part_name][name]), (part_name, name)
    space_queue = a["space_queue"]["queue"]
    assert space_queue.shape == (8, 512) and (space_queue.norm(dim=1) > 0.99).all()  # resnet18: 512 channels
    today = train(dataclasses.replace(params, contrast={}), samples, masks, tmp_path / "today", progress=False)
    assert today["loss"] != full["loss"]  # the rule acts in epoch 2


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_keep_the_feature_queue_aligned_with_the_prototype_queue(data, tmp_path) -> None:
    """With shuffle-BN the pooled features are gathered and unshuffled like the prototypes: both
    ranks hold the same, full feature queue."""
    from tests.stages.train.test_distributed import WORKER, run_two_ranks

    samples, masks = data
    params = dict(backbone="resnet18", epochs=1, batch_size=4, queue_size=8, crop_size=32, embedding_dim=8,
                  lr=0.05, num_workers=0, device="cpu", seed=1,
                  contrast={"nn_topk": 1, "space": "backbone"})
    spec = {"samples": [(s.id, str(s.image)) for s in samples[:8]], "masks": str(masks), "out": str(tmp_path / "out"),
            "dump": str(tmp_path), "params": params}
    run_two_ranks(tmp_path, WORKER.replace(
        '"queue": trainer.enc.queue.queue.clone(),',
        '"queue": trainer.enc.queue.queue.clone(), "space": trainer.enc.space_queue.queue.clone(),'), spec)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["space"], ranks[1]["space"]) and torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert (ranks[0]["space"].norm(dim=1) > 0.99).all()


# --------------------------------------------------------------------------- groups of near-duplicates


def _select_naive(sim, usable, same, rule):
    """select_columns's group rule written out column by column (the reference)."""
    b, n = sim.shape
    keep = torch.ones(b, n, dtype=torch.bool)
    targets = torch.zeros(b, n)
    for i in range(b):
        targets[i, i] = 1.0
        others = [j for j in range(n) if usable[i, j] and not same[i, j]]
        ranked = sorted(others, key=lambda j: -sim[i, j].item())
        for j in ranked[:rule.fn_topk]:
            keep[i, j] = False
        for j in ranked[:rule.nn_topk]:
            keep[i, j] = True
            targets[i, j] += rule.nn_weight / rule.nn_topk
        mates = [j for j in range(n) if same[i, j]]
        for j in mates:
            if rule.same_group == "drop":
                keep[i, j] = False
            elif rule.same_group == "positive":
                targets[i, j] += rule.group_weight / len(mates)
    return keep, targets


@pytest.mark.parametrize("rule", [
    ColumnRule(same_group="drop", space="init"),
    ColumnRule(same_group="positive", group_weight=0.5, space="init"),
    ColumnRule(same_group="drop", nn_topk=2, nn_weight=1.0, space="init"),
    ColumnRule(same_group="keep", fn_topk=3, space="init"),
])
def test_groups_select_as_the_column_by_column_reference(rule: ColumnRule) -> None:
    space_b, space_q, cls = _planted(n_classes=3, per_class_batch=2, per_class_queue=4, noise=0.3, seed=2)
    protos, queue = (F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=1)
                     for n in (space_b.shape[0], space_q.shape[0]))
    queue[3], space_q[3] = 0.0, 0.0  # a queue row of an empty mask (its space row is zero too)
    groups = torch.tensor([0, 0, 1, 1, 2, 3] + [0, 1, 2, 3] * 3)  # images' groups, not the classes
    groups[len(space_b) + 5] = -1  # a queue row whose image is unknown
    b = space_b.shape[0]
    keep, targets = select_columns(protos, queue, rule, space=(space_b, space_q), groups=(groups[:b], groups[b:]))
    columns = torch.cat([space_b, space_q])
    sim = space_b @ columns.t()
    usable = (columns.norm(dim=1) > 0)[None, :].expand(b, -1).clone()
    usable[torch.arange(b), torch.arange(b)] = False
    same = usable & (groups[:b, None] == groups[None, :])
    want_keep, want_targets = _select_naive(sim, usable, same, rule)
    assert torch.equal(keep, want_keep) and torch.allclose(targets, want_targets)


def test_dropping_the_own_group_removes_the_planted_near_duplicates_and_only_them() -> None:
    """Planted videos: each image's own-video columns (its near-duplicates) leave the softmax;
    the same-class columns of other videos stay, and cross-group neighbours are never its own video."""
    space_b, space_q, cls = _planted(noise=0.02)
    b = space_b.shape[0]
    video = torch.cat([torch.arange(b) // 2, torch.arange(space_q.shape[0]) % (b // 2)])  # one video per class
    protos, queue = space_b.clone(), space_q.clone()
    keep, targets = select_columns(protos, queue, ColumnRule(same_group="drop", nn_topk=1, nn_weight=1.0,
                                                              space="init"),
                                   space=(space_b, space_q), groups=(video[:b], video[b:]))
    own = torch.eye(b, video.numel(), dtype=torch.bool)
    same_video = (video[:b, None] == video[None, :]) & ~own
    assert not keep[same_video].any() and keep[~same_video].all()
    assert not (targets.bool() & same_video).any()  # the extra positive is from another video


def test_initial_features_pool_each_image_over_its_mask_and_skip_bad_images() -> None:
    from stages.data.io import BadInputError

    class Mean(torch.nn.Module):  # a 'backbone' whose features are the normalised pixels
        def forward(self, x):
            return x

    images = [torch.full((20, 30, 3), v, dtype=torch.uint8).numpy() for v in (10, 200)]
    masks = [torch.zeros(20, 30, dtype=torch.bool).numpy() for _ in images]
    masks[0][5:15, 5:15] = True
    masks[1][:, :] = True

    def load(i):
        if i == 2:
            raise BadInputError("img2.jpg", "unreadable")
        return images[i], masks[i]

    rows = initial_features(Mean(), load, 3, 10, torch.device("cpu"))
    assert rows.shape == (3, 3) and torch.allclose(rows[:2].norm(dim=1), torch.ones(2))
    assert torch.equal(rows[2], torch.zeros(3))  # the unreadable image: a zero row


def test_near_duplicate_groups_find_planted_groups_and_refuses_too_few_images() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=g) * 5
    rows = F.normalize(centres.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 64, generator=g), dim=1)
    rows[7] = 0.0
    groups = near_duplicate_groups(rows, 4, seed=0, pca_dim=8)
    assert groups[7] == -1
    for c in range(4):
        members = [i for i in range(c * 6, c * 6 + 6) if i != 7]
        assert len(set(groups[members].tolist())) == 1
    assert len(set(groups.tolist()) - {-1}) == 4
    with pytest.raises(TrainDataError, match="train.contrast.groups: 30 groups need at least as many training images"):
        near_duplicate_groups(rows, 30, seed=0)


def test_group_keys_are_checked() -> None:
    with pytest.raises(ParamError, match="contrast.groups: needs space: init"):
        TrainParams(contrast={"groups": 4})
    with pytest.raises(ParamError, match="contrast.same_group: 'drop' needs groups > 0"):
        TrainParams(contrast={"same_group": "drop", "space": "init"})
    with pytest.raises(ParamError, match="contrast.groups: must be 0"):
        TrainParams(contrast={"groups": 1, "space": "init"})
    p = TrainParams(contrast={"groups": 4, "space": "init", "same_group": "positive", "group_weight": 2.0})
    assert step.column_rule(p) == ColumnRule(nn_weight=1.0, space="init", same_group="positive", group_weight=2.0)


def test_init_space_trains_and_resumes_exactly(data, tmp_path) -> None:
    """Fixed initial features and groups: the image queue is checkpointed beside the prototype
    queue, and the features come from the initial weights on a resumed run too."""
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=2, keep_last=2,
                                 contrast={"space": "init", "groups": 3, "same_group": "drop", "nn_topk": 1,
                                           "warmup_epochs": 1})
    samples = samples[:8]  # 2 steps per epoch
    full = train(params, samples, masks, tmp_path / "full", progress=False)
    part = train(params, samples, masks, tmp_path / "run", progress=False, max_steps=2)
    assert full["complete"] and not part["complete"]
    assert full["init_space"]["images"] == 8 and full["init_space"]["groups"] == 3
    train(params, samples, masks, tmp_path / "run", progress=False)
    a, b = (_state(tmp_path / run / "checkpoints" / "epoch-0002.pt") for run in ("full", "run"))
    for part_name in ("model", "queue", "sample_queue"):
        for name in a[part_name]:
            assert torch.equal(a[part_name][name], b[part_name][name]), (part_name, name)
    images = a["sample_queue"]["queue"][:, 0]
    assert images.shape == (8,) and ((images >= -1) & (images < 8)).all() and (images == images.round()).all()
    today = train(dataclasses.replace(params, contrast={}), samples, masks, tmp_path / "today", progress=False)
    assert today["loss"] != full["loss"]  # the rule acts in epoch 2


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_keep_the_image_queue_aligned_with_the_prototype_queue(data, tmp_path) -> None:
    """``space: init``: both ranks compute the same initial features and groups, and gather the
    images of the step's prototypes like the prototypes: the same, full image queue on both."""
    from tests.stages.train.test_distributed import WORKER, run_two_ranks

    samples, masks = data
    params = dict(backbone="resnet18", epochs=1, batch_size=4, queue_size=8, crop_size=32, embedding_dim=8,
                  lr=0.05, num_workers=0, device="cpu", seed=1,
                  contrast={"nn_topk": 1, "space": "init", "groups": 2, "same_group": "drop"})
    spec = {"samples": [(s.id, str(s.image)) for s in samples[:8]], "masks": str(masks), "out": str(tmp_path / "out"),
            "dump": str(tmp_path), "params": params}
    run_two_ranks(tmp_path, WORKER.replace(
        '"queue": trainer.enc.queue.queue.clone(),',
        '"queue": trainer.enc.queue.queue.clone(), "images": trainer.enc.sample_queue.queue.clone(), '
        '"groups": trainer.enc.init_space.groups.clone(),'), spec)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("images", "groups", "queue"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert sorted(ranks[0]["images"][:, 0].long().tolist()) == sorted(set(ranks[0]["images"][:, 0].long().tolist()))


def test_the_routes_refuse_proposal_label_maps() -> None:
    labels = torch.ones(2, 8, 8, dtype=torch.uint8)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="train.contrast needs one mask per image"):
        step.train_step(None, images, labels, images, labels, temperature=0.5, key_momentum=0.999,
                        rule=ColumnRule(nn_topk=1, nn_weight=1.0))
