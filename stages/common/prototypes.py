"""Mask prototypes: the mean direction of a network's embeddings over a mask, the positives of the
training loss and the per-image vectors the extract stage stores, computed alike by both."""
from __future__ import annotations

import torch


def mask_prototypes(
    key_emb: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image prototype: L2-normalise(sum of key embeddings over the mask).

    Args:
        key_emb: B x D x H x W, already L2-normalised per pixel.
        masks: B x H x W, bool or float (float values weight the sum, as the reference's bmm).
        eps: a summed vector with norm <= eps has no direction and is marked invalid.
    Returns:
        prototypes B x D (float32 or wider; zero rows where invalid) and valid B (bool).
    """
    if key_emb.dim() != 4:
        raise ValueError(f"key_emb must be B x D x H x W, got shape {tuple(key_emb.shape)}")
    b, d, h, w = key_emb.shape
    if tuple(masks.shape) != (b, h, w):
        raise ValueError(f"masks must be {(b, h, w)} to match key_emb, got {tuple(masks.shape)}")
    dtype = torch.promote_types(key_emb.dtype, torch.float32)
    summed = torch.bmm(
        key_emb.reshape(b, d, h * w).to(dtype), masks.reshape(b, h * w, 1).to(dtype)
    ).squeeze(2)  # B x D
    norm = summed.norm(dim=1, keepdim=True)  # B x 1
    valid = norm.squeeze(1) > eps
    prototypes = torch.where(valid[:, None], summed / norm.clamp_min(eps), torch.zeros_like(summed))
    return prototypes, valid


def slot_prototypes(
    key_emb: torch.Tensor, labels: torch.Tensor, n_slots: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-proposal prototypes: slot l of image b is L2-normalise(sum of key embeddings over the
    pixels labelled l + 1), as :func:`mask_prototypes` computes one per image (with ``n_slots``
    1 and labels 0/1 the two agree to the bit).

    Args:
        key_emb: B x D x H x W, already L2-normalised per pixel.
        labels: B x H x W integer, l in 1..n_slots is slot l - 1; 0 and larger labels are no slot.
        n_slots: L, slots per image.
        eps: a summed vector with norm <= eps (an empty slot among them) is marked invalid.
    Returns:
        prototypes B x L x D (float32 or wider; zero rows where invalid) and valid B x L (bool).
    """
    if key_emb.dim() != 4:
        raise ValueError(f"key_emb must be B x D x H x W, got shape {tuple(key_emb.shape)}")
    b, d, h, w = key_emb.shape
    if tuple(labels.shape) != (b, h, w):
        raise ValueError(f"labels must be {(b, h, w)} to match key_emb, got {tuple(labels.shape)}")
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    dtype = torch.promote_types(key_emb.dtype, torch.float32)
    slots = torch.arange(1, n_slots + 1, device=labels.device, dtype=labels.dtype)  # L
    onehot = (labels.reshape(b, h * w, 1) == slots).to(dtype)  # B x HW x L
    summed = torch.bmm(key_emb.reshape(b, d, h * w).to(dtype), onehot).transpose(1, 2)  # B x L x D
    norm = summed.norm(dim=2, keepdim=True)  # B x L x 1
    valid = norm.squeeze(2) > eps
    prototypes = torch.where(valid[..., None], summed / norm.clamp_min(eps), torch.zeros_like(summed))
    return prototypes, valid
