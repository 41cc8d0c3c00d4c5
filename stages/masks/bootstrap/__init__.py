"""Bootstrapped saliency: a network trained on hand-crafted prior maps as noisy pseudo-labels.

The idea of DeepUSPS (Nguyen et al., "DeepUSPS: Deep Robust Unsupervised Saliency Prediction With
Self-Supervision", NeurIPS 2019): no saliency ground truth anywhere; the pseudo-labels start as
the hand-crafted priors (``priors_saliency``) and are refined across rounds. Each round trains a
fresh encoder-decoder (``SaliencyNet``) on hard targets taken from the current pseudo-labels,
predicts every image (flip test-time augmentation) and moves the pseudo-labels towards the
prediction (DeepUSPS's moving average):

    label_{r+1} = ema * label_r + (1 - ema) * prediction_r          (``refine_labels``)

A network trained for a few epochs on noisy targets fits what the images have in common (objects
standing out from their surroundings) before it memorises per-image noise, so its predictions
rank pixels better than the targets it was trained on. Self-training of this kind also shrinks the
minority class: pixels the network is unsure about fall under 0.5, become background targets in
the next round, and so on. Like class-balanced self-training (Zou et al., ECCV 2018), the fit
therefore keeps the foreground fraction of the first round's targets (prior > label_threshold,
over all images): later rounds threshold the pseudo-labels at the matching quantile, and each
round's network output is shifted in logit space so that the same share of pixels exceeds 0.5
(``calibrate``; the shift is stored in the checkpoint). Measured on davis16-objects in
``benchmarks/bench_bootstrap.py``; the choices above (hard targets, calibration, ema, size,
frozen early stages) are the ones that measured best there.

The network (:mod:`.net`), the pseudo-label arithmetic (:mod:`.maps`), the teacher maps
(:mod:`.teacher`), the fit (:mod:`.fit`) and the estimator (:mod:`.estimator`) are modules of
their own; ``BootstrapParams`` (:mod:`stages.masks.params`) is the ``masks.bootstrap`` section.

On disk (``work_dir``, :mod:`.workdir`): ``priors-<key>.npz`` (prior maps at the input size, uint8, computed once),
``labels-<r>.npz`` (pseudo-labels after round r), ``round-<r>.pt`` (network after round r: state
dict, calibration, config), ``fit.json`` (the parameters) and ``skipped.json`` (unreadable images).
All are written atomically; a rerun continues after the last finished round.
"""
from __future__ import annotations

from stages.masks.params import BootstrapParams

from .estimator import BootstrapEstimator
from .fit import fit_bootstrap
from .maps import calibrate, fraction_threshold, refine_labels, to_u8
from .net import SaliencyNet
from .workdir import BootstrapError, round_checkpoint, round_labels

__all__ = [
    "BootstrapParams",
    "BootstrapError",
    "SaliencyNet",
    "fit_bootstrap",
    "refine_labels",
    "calibrate",
    "fraction_threshold",
    "BootstrapEstimator",
    "round_checkpoint",
    "round_labels",
    "to_u8",
]
