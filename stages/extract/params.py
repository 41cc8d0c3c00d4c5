"""The extract stage's parameters (the ``extract`` section of ``pipeline.yaml``), declared once.

``input_size``: square inference size (aspect not kept, as the reference); ``interpolation``:
image resize, ``bicubic`` (the reference's cv2.INTER_CUBIC) or ``bilinear``. ``mask_source``,
``embedding``: see :mod:`stages.extract.extract`. ``features``/``feature_size``: store the decoder
trunk at ``feature_size`` x ``feature_size`` in float16. ``batch_size``, ``num_workers`` (decode +
resize processes; 0: in this process), ``device`` (``auto``, ``cpu``, ``cuda[:N]``) change only
speed. ``shard_size``: images per shard file (the unit of resumption). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from stages.bookkeeping import BOOKKEEPING
from stages.params import check_fields, in_range, opt, to_plain

MaskSource = Literal["model", "masks"]
Embedding = Literal["head", "backbone"]
MASK_SOURCES: tuple[str, ...] = get_args(MaskSource)
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
SALIENCY_THRESHOLD = 0.5  # on the raw logit, as the reference
# Parameters that change nothing in the output (``stages.bookkeeping``; not recorded in the shards).
_VOLATILE = tuple(sorted(BOOKKEEPING["extract"]))


@dataclass(frozen=True)
class ExtractParams:
    input_size: int = opt(512, doc="inference size (square, aspect not kept, as the reference)", check=in_range(32))
    interpolation: Literal["bicubic", "bilinear"] = opt("bicubic", doc="image resize to the inference size")
    mask_source: MaskSource = opt("model", doc="salient region from the saliency head or the mask shards")
    embedding: Embedding = opt(
        "head", doc="prototype from the 32-d embedding head, or from the backbone's last features (baselines)")
    features: bool = opt(True, doc="store the 256-d decoder features (float16) for the linear probe")
    feature_size: int = opt(32, doc="side of the stored feature grid", check=in_range(4))
    shard_size: int = opt(256, doc="images per embedding shard", check=in_range(1))
    batch_size: int = opt(8, check=in_range(1))
    num_workers: int = opt(2, doc="decode/resize worker processes", check=in_range(0))
    device: str = opt("auto")

    def __post_init__(self) -> None:
        check_fields(self)

    def recorded(self) -> dict[str, Any]:
        """The parameters that determine the output, as stored in every shard's ``extract`` attr."""
        out = {k: v for k, v in to_plain(self).items() if k not in _VOLATILE}
        out["saliency_threshold"] = SALIENCY_THRESHOLD
        return out
