"""The bootstrap estimator: saliency maps from a fitted round checkpoint, as the masks stage calls
every estimator (optionally snapped to colour edges by the features estimator's dense CRF)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from artifacts.atomic import sha256_file
from stages.data import Sample
from stages.masks.features import crf_refine
from stages.masks.params import FeatureParams
from stages.network.runtime import resolve_device

from .maps import calibrate, resize_square
from .net import SaliencyNet, normalise, predict_tta
from .workdir import CHECKPOINT_FORMAT, BootstrapError

BOOTSTRAP_CRF = FeatureParams().crf_params()  # masks.bootstrap.crf: the features estimator's CRF


class BootstrapEstimator:
    """Saliency from a ``fit_bootstrap`` checkpoint: uint8 RGB (H, W, 3) -> float32 (H, W) in [0, 1].

    Picklable: holds the checkpoint path and device; the network is loaded lazily, once per process.
    """

    name = "bootstrap"

    def __init__(self, checkpoint: Path, device: str = "cpu", crf: bool = False) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.crf = crf
        self._net: SaliencyNet | None = None
        self._ckpt: dict | None = None
        self._sha256: str | None = None

    def __getstate__(self) -> dict:
        return {"checkpoint": self.checkpoint, "device": self.device, "crf": self.crf}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["checkpoint"], state["device"], state.get("crf", False))

    def _load(self) -> SaliencyNet:
        if self._net is None:
            if not self.checkpoint.is_file():
                raise BootstrapError(f"{self.checkpoint}: bootstrap checkpoint not found")
            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
                raise BootstrapError(f"{self.checkpoint}: not a bootstrap checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
            net = SaliencyNet(ckpt["backbone"], ckpt["decoder_channels"])
            net.load_state_dict(ckpt["state_dict"])
            self._net = net.to(resolve_device(self.device), memory_format=torch.channels_last).eval()
            self._ckpt = ckpt
        return self._net

    def describe(self) -> dict[str, Any]:
        self._load()
        if self._sha256 is None:
            self._sha256 = sha256_file(self.checkpoint)
        config = self._ckpt["config"]
        return {"estimator": self.name, "checkpoint_sha256": self._sha256, "estimator_params": {
            **config["params"], "round": self._ckpt["round"], "prior_params": config["prior_params"],
            **({"crf": True} if self.crf else {})}}

    def __call__(self, img: np.ndarray, sample: Sample | None = None) -> np.ndarray:
        net = self._load()
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        small = resize_square(img, self._ckpt["input_size"])
        device = next(net.parameters()).device
        x = normalise(torch.from_numpy(small[None]).to(device)).contiguous(memory_format=torch.channels_last)
        prob = calibrate(predict_tta(net, x)[0].cpu().numpy(), self._ckpt["threshold"])  # S x S
        if self.crf:
            out = crf_refine(img, prob, BOOTSTRAP_CRF, FeatureParams.crf_size)
        else:
            out = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
