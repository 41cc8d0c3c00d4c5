"""Object proposals on planted blobs: ``single``, ``components`` (size floor, cap, order, scores),
``cuts`` (disjoint, floor, cap, on a planted feature grid), and the parameter checks."""
from __future__ import annotations

import numpy as np
import pytest

from artifacts.masks import Proposal
from stages.masks.features import FeatureParams
from stages.masks.proposals import (
    ProposalParams,
    ProposalsError,
    component_proposals,
    cut_proposals,
    proposals_from_cuts,
    proposals_from_mask,
    single_proposal,
)
from stages.params import ParamError

H, W = 60, 80


def _box(y0, y1, x0, x1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def planted():
    """Three separated blobs of 400, 150 and 100 pixels and a 4-pixel speck (0.08 % of 4800)."""
    big, mid, small, speck = _box(5, 25, 5, 25), _box(40, 50, 10, 25), _box(30, 40, 60, 70), _box(55, 57, 75, 77)
    return [big, mid, small, speck]


# --------------------------------------------------------------------------- single


def test_single_is_the_whole_mask(planted):
    mask = planted[0] | planted[1]
    soft = np.where(mask, 0.8, 0.1)
    [p] = single_proposal(mask, soft)
    np.testing.assert_array_equal(p.mask, mask)
    assert p.score == pytest.approx(0.8) and p.area == mask.mean()
    assert single_proposal(mask)[0].score == 1.0
    assert single_proposal(np.zeros((H, W), bool)) == []
    params = ProposalParams("single", max_proposals=1, min_proposal=0.5)  # floor and cap do not apply
    assert len(proposals_from_mask(mask, params)) == 1


# --------------------------------------------------------------------------- components


def test_components_are_the_blobs_largest_first_above_the_floor(planted):
    mask = np.logical_or.reduce(planted)
    got = component_proposals(mask, ProposalParams("components", max_proposals=5, min_proposal=0.01))
    assert len(got) == 3  # the speck is under the floor (4 < 48 pixels)
    for p, want in zip(got, planted[:3]):
        np.testing.assert_array_equal(p.mask, want)
        assert p.area == want.mean() and p.score == 1.0
    union = np.logical_or.reduce([p.mask for p in got])
    assert (union <= mask).all() and sum(p.mask.sum() for p in got) == union.sum()  # disjoint, in the mask
    floor0 = component_proposals(mask, ProposalParams("components", max_proposals=5, min_proposal=0.0))
    assert len(floor0) == 4 and floor0[-1].mask.sum() == 4


def test_components_are_capped_at_max_proposals(planted):
    mask = np.logical_or.reduce(planted)
    got = component_proposals(mask, ProposalParams("components", max_proposals=2, min_proposal=0.01))
    assert [int(p.mask.sum()) for p in got] == [400, 150]


def test_components_are_8_connected():
    mask = _box(10, 20, 10, 20) | _box(20, 30, 20, 30)  # the two squares touch at a corner only
    [p] = component_proposals(mask, ProposalParams("components"))
    np.testing.assert_array_equal(p.mask, mask)


def test_component_scores_are_the_soft_mean_and_break_area_ties():
    left, right = _box(10, 20, 5, 15), _box(10, 20, 50, 60)  # equal areas
    soft = np.zeros((H, W), np.float32)
    soft[left], soft[right] = 0.6, 0.9
    got = component_proposals(left | right, ProposalParams("components"), soft)
    np.testing.assert_array_equal(got[0].mask, right)
    assert [p.score for p in got] == [pytest.approx(0.9), pytest.approx(0.6)]
    # without scores, the tie goes to the component met first in row-major order
    assert component_proposals(left | right, ProposalParams("components"))[0].mask[10, 5]


def test_components_of_an_empty_mask_and_dispatch(planted):
    params = ProposalParams("components")
    assert component_proposals(np.zeros((H, W), bool), params) == []
    assert len(proposals_from_mask(planted[0] | planted[1], params)) == 2
    with pytest.raises(ProposalsError, match="masks.proposals: 'cuts' proposals come from the features"):
        proposals_from_mask(planted[0], ProposalParams("cuts"))


@pytest.mark.parametrize("mask, soft, match", [
    (np.ones((4, 4), np.uint8), None, r"non-empty bool \(H, W\) mask, got uint8 \(4, 4\)"),
    (np.ones((0, 4), bool), None, "non-empty bool"),
    ([[True]], None, "non-empty bool .* got list"),
    (np.ones((4, 4), bool), np.ones((4, 5)), r"soft map must have the mask's shape \(4, 4\), got float64 \(4, 5\)"),
])
def test_bad_masks_are_refused(mask, soft, match):
    with pytest.raises(ValueError, match=match):
        component_proposals(mask, ProposalParams("components"), soft)


# --------------------------------------------------------------------------- cuts


def test_cut_maps_become_disjoint_proposals_in_their_order():
    first, second, tiny = _box(5, 30, 5, 30), _box(20, 45, 20, 45), _box(50, 52, 70, 72)
    maps = [(np.where(first, 0.9, 0.1), 0.8), (np.where(second, 0.7, 0.0), 0.5), (np.where(tiny, 1.0, 0.0), 0.4)]
    got = proposals_from_cuts(maps, ProposalParams("cuts", max_proposals=3, min_proposal=0.01))
    assert [p.score for p in got] == [pytest.approx(0.8), pytest.approx(0.5)]  # tiny is under the floor
    np.testing.assert_array_equal(got[0].mask, first)
    np.testing.assert_array_equal(got[1].mask, second & ~first)  # the better cut keeps the shared pixels
    assert len(proposals_from_cuts(maps, ProposalParams("cuts", max_proposals=1))) == 1
    assert proposals_from_cuts([], ProposalParams("cuts")) == []
    with pytest.raises(ValueError, match="cut maps differ in shape"):
        proposals_from_cuts([(np.ones((4, 4)), 1.0), (np.ones((4, 5)), 0.5)], ProposalParams("cuts"))


def _grid(objects, h=16, w=24, c=16, noise=0.1, seed=0):
    """(c, h, w) unit vectors: two background directions (top, bottom), each object a block of its own."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(c, 2 + len(objects)))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    grid = np.empty((c, h, w))
    grid[:, : h // 2], grid[:, h // 2:] = dirs[:, 0, None, None], dirs[:, 1, None, None]
    for k, (y0, y1, x0, x1) in enumerate(objects):
        grid[:, y0:y1, x0:x1] = dirs[:, 2 + k, None, None]
    grid += noise * rng.normal(size=grid.shape)
    return (grid / np.linalg.norm(grid, axis=0, keepdims=True)).astype(np.float32)


def test_cuts_find_each_planted_object_at_image_size():
    objects = [(3, 7, 3, 8), (9, 14, 15, 21)]
    grid = _grid(objects)
    shape = (16 * 8, 24 * 8)  # the image: 8 px per grid cell
    params = ProposalParams("cuts", max_proposals=3, min_proposal=0.005)
    got = cut_proposals(grid, shape, params, FeatureParams(crf=False, min_object_score=0.3))
    assert len(got) >= 2 and all(p.mask.shape == shape for p in got)
    assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)
    for y0, y1, x0, x1 in objects:
        truth = _box(8 * y0, 8 * y1, 8 * x0, 8 * x1, shape)
        assert max((p.mask & truth).sum() / (p.mask | truth).sum() for p in got) > 0.7
    total = np.sum([p.mask for p in got], axis=0)
    assert total.max() == 1  # disjoint
    assert len(cut_proposals(grid, shape, ProposalParams("cuts", max_proposals=1), FeatureParams(crf=False))) == 1
    with pytest.raises(ValueError, match=r"image \(10, 10\) does not have the proposals' shape"):
        cut_proposals(grid, shape, params, FeatureParams(crf=False), image=np.zeros((10, 10, 3), np.uint8))


# --------------------------------------------------------------------------- parameters


def test_defaults():
    p = ProposalParams()
    assert (p.proposals, p.max_proposals, p.min_proposal, p.multiple) == ("single", 3, 0.01, False)
    assert ProposalParams("components").multiple and ProposalParams("cuts").multiple


@pytest.mark.parametrize("kwargs, match", [
    ({"proposals": "blobs"}, r"proposals: expected one of 'single', 'components', 'cuts', got 'blobs'"),
    ({"max_proposals": 0}, r"max_proposals: must be an int >= 1, got 0"),
    ({"max_proposals": 2.0}, r"max_proposals: must be an int >= 1, got 2.0"),
    ({"max_proposals": True}, r"max_proposals: must be an int >= 1, got True"),
    ({"min_proposal": 1.0}, r"min_proposal: must be a number in \[0, 1\), got 1.0"),
    ({"min_proposal": -0.1}, r"min_proposal: must be a number in \[0, 1\), got -0.1"),
    ({"min_proposal": float("nan")}, r"min_proposal: must be a number in \[0, 1\), got nan"),
    ({"min_proposal": "0.1"}, r"min_proposal: must be a number in \[0, 1\), got '0.1'"),
])
def test_parameter_checks_name_the_key_and_the_expected_value(kwargs, match):
    with pytest.raises(ParamError, match=match) as info:
        ProposalParams(**kwargs)
    assert info.value.key == next(iter(kwargs))
    assert issubclass(ProposalsError, ParamError) and issubclass(ProposalsError, ValueError)


def test_proposals_are_artifact_proposals(planted):
    got = proposals_from_mask(planted[0], ProposalParams("components"))
    assert all(isinstance(p, Proposal) for p in got)
