"""Load pretrained backbone weights: MoCo v2 checkpoints or torchvision ImageNet state dicts.

Only the backbone is initialised (``model.backbone``, whose parameter names are torchvision's).
Anything that does not fit exactly, apart from the classifier and BatchNorm's
``num_batches_tracked`` counters (absent from older torchvision files), is an ``InitError``.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from stages.common.weights import file_digest
from stages.network.choices import INIT_KINDS

MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")  # DDP-saved and single-process MoCo
CLASSIFIER_PREFIXES = ("fc.", "classifier.")  # ResNet / MobileNetV2 heads, MoCo's MLP head
_LIST_AT_MOST = 10


class InitError(ValueError):
    """A checkpoint that cannot initialise the backbone, with the file and the offending keys."""


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_AT_MOST])
    more = f", ... ({len(keys) - _LIST_AT_MOST} more)" if len(keys) > _LIST_AT_MOST else ""
    return f"{len(keys)} [{shown}{more}]"


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _moco_state(obj: object) -> Mapping[str, torch.Tensor] | None:
    """The ``state_dict`` of a MoCo checkpoint if ``obj`` looks like one, else None."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return None
    state = obj["state_dict"]
    return state if any(k.startswith(MOCO_PREFIXES) for k in state) else None


def _detect_kind(obj: object, path: Path) -> str:
    if _moco_state(obj) is not None:
        return "moco"
    if _is_tensor_dict(obj):
        return "torchvision"
    top = list(obj)[:_LIST_AT_MOST] if isinstance(obj, Mapping) else type(obj).__name__
    raise InitError(
        f"{path}: cannot tell the checkpoint kind; expected a MoCo checkpoint "
        f"({{'state_dict': {{'module.encoder_q.*': tensor}}}}) or a torchvision state dict "
        f"(name -> tensor), found {top}"
    )


def _split_moco(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Query-encoder entries (prefix stripped), their original keys, and the keys outside it."""
    state = _moco_state(obj)
    if state is None:
        raise InitError(
            f"{path}: not a MoCo checkpoint: expected a 'state_dict' with keys starting with "
            f"{' or '.join(MOCO_PREFIXES)}"
        )
    candidates, origin, other = {}, {}, []
    for key, value in state.items():
        prefix = next((p for p in MOCO_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
        else:
            candidates[key[len(prefix) :]] = value
            origin[key[len(prefix) :]] = key
    return candidates, origin, other


def load_init(model_backbone: nn.Module, path: str | Path, kind: str = "auto") -> dict:
    """Load a pretrained checkpoint into ``model_backbone`` in place.

    Args:
        model_backbone: the backbone module (``MaskContrastModel.backbone``), torchvision names.
        path: a MoCo v2 checkpoint (``{'state_dict': {'module.encoder_q.<name>': tensor}}``) or a
            torchvision ImageNet state dict (``{'<name>': tensor}``).
        kind: ``moco``, ``torchvision`` or ``auto`` (detected from the layout).
    Returns:
        ``{kind, path, sha256, loaded, ignored}``: the kind used, the file, its sha256, how many
        backbone entries were loaded and the checkpoint keys deliberately left out (classifier
        heads; for MoCo also everything outside the query encoder, e.g. ``module.encoder_k.*``).
    Raises:
        InitError: unreadable file, unknown layout, or keys / shapes that do not match the
            backbone (missing and unexpected keys listed, first ten of each with counts).
    """
    path = Path(path)
    if kind not in INIT_KINDS:
        raise InitError(f"{path}: unknown init kind {kind!r}: expected one of {', '.join(INIT_KINDS)}")
    if not path.is_file():
        raise InitError(f"{path}: init checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise InitError(
            f"{path}: cannot be read as a tensors-only checkpoint"
            f" (torch.load weights_only=True): {error}"
        ) from error
    if kind == "auto":
        kind = _detect_kind(obj, path)

    if kind == "moco":
        candidates, origin, ignored = _split_moco(obj, path)
    else:
        if not _is_tensor_dict(obj):
            raise InitError(f"{path}: not a torchvision state dict (a flat mapping of name -> tensor)")
        candidates, origin, ignored = dict(obj), {k: k for k in obj}, []
    ignored += [origin[k] for k in candidates if k.startswith(CLASSIFIER_PREFIXES)]
    candidates = {k: v for k, v in candidates.items() if not k.startswith(CLASSIFIER_PREFIXES)}

    own = model_backbone.state_dict()
    missing = [k for k in own if k not in candidates and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in candidates if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in candidates.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise InitError(
            f"{path}: does not fit the backbone as a {kind} checkpoint; "
            f"missing keys {_key_list(missing)}; unexpected keys {_key_list(unexpected)}; "
            f"shape mismatches {_key_list(mismatched)}"
        )
    # Counters absent from older files keep the model's value, so the load can be strict.
    full = {k: candidates.get(k, own[k]) for k in own}
    model_backbone.load_state_dict(full, strict=True)
    return {
        "kind": kind,
        "path": str(path),
        "sha256": file_digest(path),  # hashed once per process (stages.common.weights)
        "loaded": len(candidates),
        "ignored": sorted(ignored),
    }
