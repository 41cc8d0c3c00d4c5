"""Mask prototypes against hand computations: empty, cancelling and soft masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.prototypes import mask_prototypes


def test_mask_prototypes_by_hand_and_with_empty_masks() -> None:
    g = torch.Generator().manual_seed(0)
    key = F.normalize(torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64), dim=1)
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 2, 1] = True
    masks[2, 1, 2] = True  # one pixel
    masks[3] = True
    protos, valid = mask_prototypes(key, masks)
    assert valid.tolist() == [True, False, True, True]
    summed = key[0, :, 0, 0] + key[0, :, 2, 1]
    torch.testing.assert_close(protos[0], summed / summed.norm())
    torch.testing.assert_close(protos[2], key[2, :, 1, 2])
    torch.testing.assert_close(protos[3], F.normalize(key[3].sum((1, 2)), dim=0))
    assert torch.equal(protos[1], torch.zeros(5, dtype=torch.float64))
    assert torch.isfinite(protos).all()
    torch.testing.assert_close(protos[valid].norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_mask_prototypes_cancelling_and_float_masks() -> None:
    key = torch.zeros(1, 2, 1, 2)
    key[0, 0, 0, 0], key[0, 0, 0, 1] = 1.0, -1.0  # opposite unit vectors
    protos, valid = mask_prototypes(key, torch.ones(1, 1, 2))
    assert not valid.item() and torch.equal(protos, torch.zeros(1, 2))
    protos, valid = mask_prototypes(key, torch.tensor([[[1.0, 0.25]]]))  # soft weights
    assert valid.item() and torch.equal(protos, torch.tensor([[1.0, 0.0]]))
