"""A salient-object model in ONNX format (e.g. U^2-Net, BASNet) as an image -> soft map function.

``OnnxSaliency`` validates the model when it is opened (one float NCHW image input with 3
channels; the chosen output (N, 1, h, w) or (N, h, w)), so a wrong file fails at once with a
message naming it, instead of after hours of a run. Instances pickle without their session and
reopen it lazily, so dask can ship them to workers.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnxruntime as ort

from stages.masks.params import OnnxParams

__all__ = ["OnnxParams", "SaliencyModelError", "OnnxSaliency"]


class SaliencyModelError(ValueError):
    """The model file is missing, is not ONNX, or does not have a saliency model's inputs/outputs."""


def _describe(nodes) -> str:
    return ", ".join(f"{n.name} {n.type} {list(n.shape)}" for n in nodes) or "none"


def _is_dim(d, value: int) -> bool:
    """True when a (possibly symbolic) ONNX dim is ``value`` or unknown."""
    return not isinstance(d, int) or d == value


class OnnxSaliency:
    """uint8 RGB (H, W, 3) -> float32 saliency (H, W) in [0, 1] with an ONNX model."""

    def __init__(
        self,
        path: str | Path,
        params: OnnxParams = OnnxParams(),
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.params = params
        self.providers = list(providers) if providers is not None else None
        self.threads = threads
        self._sha256: str | None = None
        self._session: ort.InferenceSession | None = None
        self._open()

    # --- session life cycle -------------------------------------------------------------------

    def _open(self) -> ort.InferenceSession:
        """Open and validate the session; sets input name, batch flag and output index."""
        if not self.path.is_file():
            raise SaliencyModelError(f"{self.path}: saliency model file not found")
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        providers = self.providers if self.providers is not None else ort.get_available_providers()
        try:
            session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types for bad files
            raise SaliencyModelError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc
        inputs, outputs = session.get_inputs(), session.get_outputs()
        expected_in = "exactly one float input of shape (N, 3, H, W)"
        if len(inputs) != 1:
            raise SaliencyModelError(f"{self.path}: found inputs [{_describe(inputs)}]; expected {expected_in}")
        x = inputs[0]
        if x.type != "tensor(float)" or len(x.shape) != 4 or not _is_dim(x.shape[1], 3):
            raise SaliencyModelError(f"{self.path}: found input [{_describe(inputs)}]; expected {expected_in}")
        h, w = x.shape[2], x.shape[3]
        if isinstance(h, int) and isinstance(w, int) and (h, w) != self.params.size_hw:
            raise SaliencyModelError(
                f"{self.path}: the model takes {h}x{w} images but OnnxParams.input_size is "
                f"{self.params.size_hw[0]}x{self.params.size_hw[1]}; set input_size to ({h}, {w})"
            )
        k = self.params.output_index
        if not 0 <= k < len(outputs):
            raise SaliencyModelError(
                f"{self.path}: output_index {k} does not exist; found outputs [{_describe(outputs)}]"
            )
        y = outputs[k]
        shape_ok = (len(y.shape) == 4 and _is_dim(y.shape[1], 1)) or len(y.shape) == 3
        if not shape_ok or y.type not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
            raise SaliencyModelError(
                f"{self.path}: output {k} is {y.name} {y.type} {list(y.shape)}; "
                "expected a float saliency map of shape (N, 1, h, w) or (N, h, w)"
            )
        self._input_name = x.name
        self._output_name = y.name
        self.dynamic_batch = not isinstance(x.shape[0], int)
        self._session = session
        return session

    @property
    def session(self) -> ort.InferenceSession:
        return self._session if self._session is not None else self._open()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle; reopened lazily by ``session``
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OnnxSaliency({str(self.path)!r}, {self.params})"

    @property
    def sha256(self) -> str:
        """Hex sha256 of the model file (computed once)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    # --- inference ------------------------------------------------------------------------------

    def _preprocess(self, img: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> float32 (3, h, w) normalised model input."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {img.dtype} {img.shape}")
        p = self.params
        h, w = p.size_hw
        shrink = h <= img.shape[0] and w <= img.shape[1]
        x = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if p.channel_order == "BGR":
            x = x[..., ::-1]
        mean, std = np.asarray(p.mean, np.float32), np.asarray(p.std, np.float32)
        x = (x.astype(np.float32) * np.float32(p.scale) - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def _postprocess(self, out: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """One model map (h, w) -> float32 (H, W) in [0, 1]."""
        out = out.astype(np.float32)
        if self.params.minmax:
            lo, hi = float(out.min()), float(out.max())
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        if out.shape != shape:
            out = cv2.resize(out, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) -> (n, h', w') raw maps."""
        (out,) = self.session.run([self._output_name], {self._input_name: batch})
        return out.reshape(out.shape[0], out.shape[-2], out.shape[-1])

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 (H, W) in [0, 1]."""
        return self._postprocess(self._run(self._preprocess(img)[None])[0], img.shape[:2])

    def batch(self, imgs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Maps of several images: one run when the model's batch dim is dynamic, else a loop."""
        if not self.dynamic_batch:
            return [self(img) for img in imgs]
        if len(imgs) == 0:
            return []
        x = np.stack([self._preprocess(img) for img in imgs])
        return [self._postprocess(o, img.shape[:2]) for o, img in zip(self._run(x), imgs)]
