"""Protocol runners of the evaluate stage, one module each: :mod:`.kmeans`, :mod:`.pixel_kmeans`,
:mod:`.retrieval`, :mod:`.linear` (REFERENCE.md "Evaluation"; the maths they run is in
:mod:`stages.evaluate.kmeans`, :mod:`~stages.evaluate.retrieval` and :mod:`~stages.evaluate.linear`).

Each runner reads embedding stores and labels, streams over the images with bounded memory (one
image, its label and mask at a time, plus the small per-image tables the maths needs), writes its
pictures into ``out_dir`` (:mod:`.pictures`) and returns a JSON-ready dict with the
``metrics.json`` keys of DESIGN.md: ``miou`` (percent, mean over seeds), ``miou_std``,
``per_class_iou`` (class name -> percent), ``pixel_accuracy`` and ``seeds``, plus ``figures``
(caption -> file name in ``out_dir``, for the report) and protocol details. ``figures=False``
skips the pictures (e.g. batch jobs after a model's first seed); the numbers are the same.

Scoring never rereads pixels per seed: K-means and retrieval go through per-image (outside /
inside the salient mask, class) pixel counts taken once per split (:mod:`.counts`).

Images whose label cannot be read, or that the embedding store lacks (``extract`` could not read
them), are skipped and listed under ``skipped`` in the metrics (the first 20, and the count in
``n_skipped``): the score is over the images that remain. A label whose size differs from its
image is such an unreadable label (``load_label`` checks it against the stored image shape).
"""
from __future__ import annotations

from stages.evaluate.saliency import ProtocolError

from .counts import SplitCounts, class_counts
from .kmeans import KMEANS_MODEL_FILE, colour_descriptors, kmeans_model_dict, run_kmeans, whitening_note
from .linear import run_linear
from .pixel_kmeans import PIXEL_KMEANS_MODEL_FILE, run_pixel_kmeans
from .retrieval import run_retrieval

__all__ = [
    "KMEANS_MODEL_FILE",
    "PIXEL_KMEANS_MODEL_FILE",
    "ProtocolError",
    "SplitCounts",
    "class_counts",
    "colour_descriptors",
    "kmeans_model_dict",
    "run_kmeans",
    "run_linear",
    "run_pixel_kmeans",
    "run_retrieval",
    "whitening_note",
]
