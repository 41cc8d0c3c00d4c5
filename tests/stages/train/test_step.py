"""One training step's pieces: the momentum update and the key prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.prototypes import mask_prototypes
from stages.network.runtime import normalize_images
from stages.train.checkpoint import build_model
from stages.train.params import TrainParams
from stages.train.step import Encoders, key_prototypes, model_config

TINY = TrainParams(backbone="resnet18", batch_size=4, queue_size=8, crop_size=32, embedding_dim=8, device="cpu")


def test_momentum_update_moves_trained_parameters_only() -> None:
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    key = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    query[0].weight.requires_grad_(False)  # frozen: equal in both encoders in practice
    before = [p.detach().clone() for p in key.parameters()]
    enc = Encoders(query, query, key, None, torch.optim.SGD(query[1].parameters(), lr=0.1))
    enc.momentum_update(0.9)
    for (name, q), k, k0 in zip(query.named_parameters(), key.parameters(), before):
        expected = k0 if name == "0.weight" else 0.9 * k0 + 0.1 * q.detach()
        torch.testing.assert_close(k.detach(), expected, rtol=0, atol=1e-7)


def test_key_prototypes_in_one_process_are_the_masked_means() -> None:
    torch.manual_seed(0)
    key = build_model({**model_config(TINY), "freeze_upto": None}).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:20, 4:20] = True
    masks[1, 10:30, 0:12] = True
    protos, valid, gathered = key_prototypes(key, images, masks)
    with torch.no_grad():
        expected, _ = mask_prototypes(F.normalize(key(normalize_images(images))[0], dim=1), masks)
    torch.testing.assert_close(protos, expected)
    assert valid.all() and torch.equal(gathered, protos)
