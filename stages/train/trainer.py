"""The MaskContrast training run: epochs of ``step.train_step`` with checkpoints, resume and logs.

SGD with a poly learning rate per epoch; a line per step and per epoch in ``log.jsonl``; a
checkpoint after every epoch (rank 0, atomically); under several processes a DDP query network,
sharded batches and shuffle-BN (see :mod:`stages.train.step`).

Determinism. Data augmentation and order are pure functions of (seed, epoch, index) (see
``data``), the loader has its own generator, and the RNG states of every rank (dropout draws) are
checkpointed with the weights, the optimiser and the queue; a resumed run therefore ends with the
weights of an uninterrupted one, bit for bit, on the CPU. On CUDA the same holds up to the
run-to-run nondeterminism of some kernels (atomics in bilinear upsampling's backward, cuDNN
algorithm choice), which differs between two uninterrupted runs as well.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from artifacts.checkpoints import (
    LOG_FILE,
    LOSS_CURVE_FILE,
    MODEL_FILE,
    append_jsonl,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    truncate_lines,
)
from artifacts.masks import MaskStore
from stages.bookkeeping import BOOKKEEPING
from stages.common.weights import resolve_init
from stages.data import Sample
from stages.network.init import load_init
from stages.network.model import MaskContrastModel
from stages.network.runtime import amp_name, resolve_amp, resolve_device
from stages.params import to_plain

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    build_model,
    capture_rng_state,
    cpu_state_dict,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_model_file,
)
from .data import (
    STAT_NAMES,
    EpochBatchSampler,
    TrainDataError,
    TwoViewDataset,
    ViewAugment,
    check_batch,
    derive_seed,
    make_loader,
)
from .params import AugmentParams, ContrastParams, TrainParams
from .plot import plot_loss_curve
from .neighbours import initial_features, near_duplicate_groups
from .step import Encoders, InitSpace, build_encoders, column_rule, model_config, train_step

LR_POWER = 0.9
# Parameters that do not change the result (``stages.bookkeeping``): a checkpoint written under
# other values resumes. (``init`` is compared by the file's sha256, not its path.)
VOLATILE_PARAMS = tuple(sorted(BOOKKEEPING["train"]))
_TORCH_STREAM, _SHUFFLE_STREAM = 11, 12  # derive_seed stream tags


def view_augment(params: TrainParams) -> ViewAugment:
    """The per-view augmentation of ``params`` (``augment`` names ``scale`` ``crop_scale``)."""
    a = params.augment
    return ViewAugment(crop_size=params.crop_size, scale=tuple(a.crop_scale), jitter=tuple(a.jitter),
                       jitter_p=a.jitter_p, gray_p=a.gray_p, flip_p=a.flip_p)


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stopped before any of it reached a checkpoint."""

    def __init__(self, epoch: int, step: int, losses: dict[str, float], checkpoint: Path | None) -> None:
        self.epoch, self.step, self.losses, self.checkpoint = epoch, step, losses, checkpoint
        where = (f"last good checkpoint: {checkpoint}" if checkpoint is not None
                 else "no checkpoint yet (no epoch finished): rerunning starts from the beginning")
        values = ", ".join(f"{k}={v}" for k, v in losses.items())
        super().__init__(f"training diverged: non-finite loss ({values}) at epoch {epoch}, step {step}; "
                         f"{where}. Lower the learning rate, or try amp='off'.")

def poly_lr(base: float, epoch: int, epochs: int, power: float = LR_POWER) -> float:
    """Learning rate of (1-based) ``epoch``: ``base * (1 - (epoch - 1) / epochs) ** power``,
    the reference's ``adjust_learning_rate`` with its 0-based epoch."""
    return base * (1.0 - (epoch - 1) / epochs) ** power


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the ordered sample ids: a resumed run must see the same list."""
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


def proposal_slots(store: MaskStore) -> int | None:
    """Proposal slots per image for a mask store of schema version 2 (its most proposals in one
    image, at least 1); None for a version-1 store, trained on one mask per image as before."""
    if not store.has_proposals:
        return None
    counts = store.table()["n_proposals"]
    return max(1, int(counts.max())) if counts.size else 1


def _clone_tensors(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) replaced by a private copy."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run into ``out_dir`` (see :func:`train`); after ``run()`` its ``enc`` holds
    the networks of this process (used by tests to compare ranks)."""

    def __init__(self, params: TrainParams, samples: Sequence[Sample], mask_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, *, progress: bool = True,
                 on_epoch: Callable[[int, dict], None] | None = None, max_steps: int | None = None) -> None:
        self.params = params
        self.samples = list(samples)
        self.mask_dir = Path(mask_dir)
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.on_epoch = on_epoch
        self.max_steps = max_steps
        self.enc: Encoders | None = None
        self.history: list[dict[str, Any]] = []
        self.log_lines = 0
        self.global_step = 0
        self.epochs_done = 0
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.init_report: dict | None = None

    # -- set-up
    def _build(self) -> tuple[MaskContrastModel, dict | None]:
        """The query network with its initialisation (same on every rank: seeded by ``seed``)."""
        p = self.params
        _seed_all(p.seed)
        model = build_model(model_config(p))  # frozen as configured; loading weights still works
        report = (load_init(model.backbone, resolve_init(p.init, p.backbone), p.init_kind)
                  if p.init != "random" else None)
        return model, report

    def _check_data(self, info: D.DistInfo) -> MaskStore:
        """Fail before any work: batch split, enough images, a mask for every image."""
        p = self.params
        check_batch(len(self.samples), p.batch_size, info.world_size)
        store = MaskStore(self.mask_dir)
        missing = [s.id for s in self.samples if s.id not in store]
        if missing:
            raise TrainDataError(f"{len(missing)} training images have no mask in {self.mask_dir}: "
                                 f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        return store

    def _check_resume(self, state: dict, path: Path) -> None:
        mine = to_plain(self.params)
        # checkpoints from before the augment key; tuples and lists alike
        theirs = to_plain({"augment": to_plain(AugmentParams()), "contrast": to_plain(ContrastParams()),
                           **state.get("params", {})})
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in mine.items()
                if k not in VOLATILE_PARAMS and k != "init" and theirs.get(k) != v]
        if (theirs.get("init") == "random") != (self.params.init == "random"):
            diff.append(f"init: checkpoint {theirs.get('init')!r} vs now {self.params.init!r}")
        if diff:
            raise CheckpointError(f"{path}: written with other training parameters ({'; '.join(diff)});"
                                  " use a fresh output directory")
        if state.get("samples") != samples_fingerprint(self.samples):
            raise CheckpointError(f"{path}: written for another list of training images "
                                  f"(fingerprint differs); use a fresh output directory")
        if not 1 <= state["epoch"] <= self.params.epochs:
            raise CheckpointError(f"{path}: holds epoch {state['epoch']} of a {self.params.epochs}-epoch run")

    def _find_resume_state(self) -> tuple[dict, Path] | None:
        """The newest checkpoint of ``out_dir``, checked against this run (None: a fresh start)."""
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            return None
        state = load_checkpoint(latest[1])
        self._check_resume(state, latest[1])
        return state, latest[1]

    def _resume(self, enc: Encoders, info: D.DistInfo, found: tuple[dict, Path] | None) -> None:
        """Load a checkpoint into ``enc`` and the run state; cut the log back to it (on a fresh
        start: empty it)."""
        log = self.out_dir / LOG_FILE
        if found is None:
            if info.rank == 0:
                truncate_lines(log, 0)
            return
        state, path = found
        epoch = state["epoch"]
        then, now = (state.get("init") or {}).get("sha256"), (self.init_report or {}).get("sha256")
        if then != now:  # the init file is compared by content: it may have moved
            raise CheckpointError(f"{path}: started from another init checkpoint (sha256 {then} vs now {now});"
                                  " use a fresh output directory")
        enc.model.load_state_dict(state["model"])
        enc.key.load_state_dict(state["key"])
        if enc.queue is not None:
            enc.queue.load_state_dict(state["queue"])
        if enc.space_queue is not None:
            enc.space_queue.load_state_dict(state["space_queue"])
        if enc.sample_queue is not None:
            enc.sample_queue.load_state_dict(state["sample_queue"])
        # Optimiser state is adopted as is (no copy): clone it off the memory-mapped file.
        enc.optimizer.load_state_dict(_clone_tensors(state["optimizer"]))
        if enc.scaler is not None and state.get("scaler"):
            enc.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:  # another number of processes: every rank gets a fresh, seeded stream
            warnings.warn(f"{path} was written by {len(rng)} processes, resuming with {info.world_size}: "
                          "the dropout draws of the remaining epochs differ from an uninterrupted run")
            torch.manual_seed(derive_seed(self.params.seed, _TORCH_STREAM, info.rank, epoch))
        self.epochs_done, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])
        self.log_lines = state["log_lines"]
        self.resumed_from = epoch
        self.last_checkpoint = path
        if info.rank == 0:
            truncate_lines(log, self.log_lines)

    # -- the loop
    def run(self) -> dict[str, Any]:
        info = D.init_distributed("gloo" if self.params.device == "cpu" else None)
        try:
            return self._run(info)
        finally:
            D.shutdown_distributed(info)

    def _run(self, info: D.DistInfo) -> dict[str, Any]:
        p = self.params
        started = time.perf_counter()
        device = resolve_device(p.device, info.local_rank)
        amp_dtype = resolve_amp(p.amp, device)
        main = info.rank == 0
        store = self._check_data(info) if p.epochs else None
        found = self._find_resume_state() if p.epochs else None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        model, init_report = self._build()
        self.init_report = init_report
        config = model_config(p)
        common = {"device": str(device), "amp": amp_name(amp_dtype), "init": init_report,
                  "seeds": {"seed": p.seed, "model_init": p.seed,
                            "dropout": [derive_seed(p.seed, _TORCH_STREAM, r) for r in range(info.world_size)]},
                  "world_size": info.world_size}
        if p.epochs == 0:
            if main:
                save_model_file(self.out_dir / MODEL_FILE, model, config, params=to_plain(p),
                                init=init_report, epochs=0, steps=0)
            D.barrier()
            return {**self._summary(complete=True, n_images=len(self.samples), seconds=0.0), **common}

        n_slots = proposal_slots(store)
        if n_slots is not None and column_rule(p) is not None:  # before any start-up work
            raise TrainDataError(f"train.contrast needs one mask per image; {self.mask_dir} holds several proposals "
                                 "per image (masks.proposals), which it is not implemented for")
        dataset = TwoViewDataset(self.samples, store, p.seed, view_augment(p),
                                 p.min_fg, p.max_fg, p.redraws, proposals=n_slots is not None)
        init_space = self._init_space(model, dataset, device, main) if p.contrast.space == "init" and \
            column_rule(p) is not None else None  # from the initial weights, before any checkpoint loads
        torch.manual_seed(derive_seed(p.seed, _TORCH_STREAM, info.rank))  # this rank's dropout stream
        enc = build_encoders(model, p, device, amp_dtype)
        enc.init_space = init_space
        self.enc = enc
        self._resume(enc, info, found)
        del found  # release the checkpoint's tensors
        if info.distributed:
            enc.forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        sampler = EpochBatchSampler(len(self.samples), p.batch_size, p.seed, self.epochs_done + 1, p.epochs,
                                    info.rank, info.world_size)
        steps_per_epoch = sampler.steps_per_epoch
        total_steps = p.epochs * steps_per_epoch
        loader = make_loader(dataset, sampler, p.num_workers, device.type == "cuda", p.seed)
        last = total_steps if self.max_steps is None else min(total_steps, self.max_steps)
        log = open(self.out_dir / LOG_FILE, "a", encoding="utf-8") if main else None
        bar = tqdm(total=total_steps, initial=self.global_step, unit="step", desc="train",
                   disable=not (self.progress and main), dynamic_ncols=True)
        try:
            self._loop(enc, loader, info, device, amp_dtype, steps_per_epoch, last, log, bar, n_slots or 1)
        finally:
            bar.close()
            if log is not None:
                log.close()
        complete = self.epochs_done == p.epochs
        if complete and main:
            save_model_file(self.out_dir / MODEL_FILE, model, config, params=to_plain(p),
                            init=init_report, epochs=p.epochs, steps=self.global_step,
                            history=self.history)
            plot_loss_curve(self.out_dir / LOG_FILE, self.out_dir / LOSS_CURVE_FILE)
        D.barrier()
        return {**self._summary(complete, len(self.samples), time.perf_counter() - started), **common,
                **({"init_space": self.init_space_report} if init_space is not None else {})}

    def _init_space(self, model: MaskContrastModel, dataset: TwoViewDataset, device: torch.device,
                    main: bool) -> InitSpace:
        """``train.contrast.space: init``: the initial network's mask-pooled backbone features of
        every training image (shorter side ``crop_size``) and, with ``groups``, their over-clustering
        (seeded by ``seed``). Every rank computes the same rows (deterministic, no exchange)."""
        p = self.params
        started = time.perf_counter()
        was_training = model.training
        model.to(device).eval()
        try:
            features = initial_features(model.backbone, dataset.whole, len(self.samples), p.crop_size, device,
                                        progress=self.progress and main)
        finally:
            model.train(was_training)
        groups = near_duplicate_groups(features, p.contrast.groups, p.seed) if p.contrast.groups else None
        usable = int((features.norm(dim=1) > 0).sum())
        self.init_space_report = {"images": len(self.samples), "usable": usable, "dim": int(features.shape[1]),
                                  "groups": p.contrast.groups,
                                  "seconds": round(time.perf_counter() - started, 2)}
        return InitSpace(features.to(device), None if groups is None else groups.to(device))

    def _loop(self, enc: Encoders, loader, info: D.DistInfo, device: torch.device,
              amp_dtype: torch.dtype | None, steps_per_epoch: int, last: int, log, bar, n_slots: int = 1) -> None:
        p = self.params
        batches = iter(loader)
        acc = np.zeros(3)
        stats = np.zeros(len(STAT_NAMES), dtype=np.int64)
        wait = busy = 0.0
        tick = time.perf_counter()
        while self.global_step < last:
            step = self.global_step + 1
            epoch = (step - 1) // steps_per_epoch + 1
            lr = poly_lr(p.lr, epoch, p.epochs)
            for group in enc.optimizer.param_groups:
                group["lr"] = lr
            q_img, q_mask, k_img, k_mask, item_stats, sample = next(batches)
            got = time.perf_counter()
            shuffle = (torch.Generator().manual_seed(derive_seed(p.seed, _SHUFFLE_STREAM, step))
                       if info.distributed else None)
            losses = train_step(
                enc, q_img.to(device, non_blocking=True), q_mask.to(device, non_blocking=True),
                k_img.to(device, non_blocking=True), k_mask.to(device, non_blocking=True),
                temperature=p.temperature, key_momentum=p.key_momentum, amp_dtype=amp_dtype, shuffle=shuffle,
                n_slots=n_slots, rule=column_rule(p, epoch), sample=sample.to(device, non_blocking=True))
            reduced = torch.cat([losses.double().cpu(), item_stats.sum(0).double()])
            if info.distributed:  # one collective: mean losses, summed data counts
                reduced = D.all_reduce_mean(reduced.to(device)).cpu()
                reduced[3:] *= info.world_size
            values = reduced[:3].tolist()
            now = time.perf_counter()
            step_wait, step_time = got - tick, now - tick
            tick = now
            named = dict(zip(("loss", "loss_contrastive", "loss_saliency"), values))
            if not all(math.isfinite(v) for v in values):
                raise TrainingDiverged(epoch, step, named, self.last_checkpoint)
            self.global_step = step
            acc += values
            stats += np.rint(reduced[3:].numpy()).astype(np.int64)
            wait += step_wait
            busy += step_time
            ips = p.batch_size / step_time
            if log is not None:
                append_jsonl(log, {"type": "step", "epoch": epoch, "step": step, **named, "lr": lr,
                                   "images_per_s": ips, "data_wait_share": step_wait / step_time})
                self.log_lines += 1
            bar.set_postfix(epoch=epoch, loss=f"{values[0]:.4f}", img_s=f"{ips:.1f}", refresh=False)
            bar.update(1)
            if step % steps_per_epoch == 0:
                record = {"type": "epoch", "epoch": epoch, "steps": steps_per_epoch, "lr": lr,
                          **dict(zip(("loss", "loss_contrastive", "loss_saliency"), (acc / steps_per_epoch).tolist())),
                          "images_per_s": p.batch_size * steps_per_epoch / busy, "data_wait_share": wait / busy,
                          "seconds": busy, **dict(zip(STAT_NAMES, stats.tolist()))}
                self._end_epoch(enc, info, epoch, record, log)
                acc[:] = 0
                stats[:] = 0
                wait = busy = 0.0
                tick = time.perf_counter()  # checkpoint time is not step time

    def _end_epoch(self, enc: Encoders, info: D.DistInfo, epoch: int, record: dict, log) -> None:
        """Log the epoch, checkpoint (rank 0, atomically), prune, and call ``on_epoch``."""
        self.epochs_done = epoch
        self.history.append(record)
        rng = D.all_gather_object(capture_rng_state())  # every rank's, for an exact resume
        if info.rank == 0:
            path = checkpoint_path(self.out_dir, epoch)
            record["checkpoint"] = str(path.relative_to(self.out_dir))
            append_jsonl(log, record)
            self.log_lines += 1
            os.fsync(log.fileno())  # the lines the checkpoint counts are on disk before it
            save_checkpoint(path, {
                "epoch": epoch, "global_step": self.global_step,
                "model": cpu_state_dict(enc.model), "key": cpu_state_dict(enc.key),
                "queue": cpu_state_dict(enc.queue) if enc.queue is not None else None,
                **({"space_queue": cpu_state_dict(enc.space_queue)} if enc.space_queue is not None else {}),
                **({"sample_queue": cpu_state_dict(enc.sample_queue)} if enc.sample_queue is not None else {}),
                "optimizer": enc.optimizer.state_dict(),
                "scaler": enc.scaler.state_dict() if enc.scaler is not None else None,
                "rng": rng, "samples": samples_fingerprint(self.samples),
                "data": {"seed": self.params.seed, "n_samples": len(self.samples),
                         "global_batch": self.params.batch_size, "world_size": info.world_size,
                         "next_epoch": epoch + 1, "next_step_in_epoch": 0},
                "log_lines": self.log_lines, "history": self.history,
                "params": to_plain(self.params), "model_config": model_config(self.params),
                "init": self.init_report,
            })
            prune_checkpoints(self.out_dir, self.params.keep_last)
            self.last_checkpoint = path
        else:
            self.last_checkpoint = checkpoint_path(self.out_dir, epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, record)

    def _summary(self, complete: bool, n_images: int, seconds: float) -> dict[str, Any]:
        h = self.history
        trained = sum(r["seconds"] for r in h)
        final = h[-1] if h else {}
        return {
            "complete": complete, "epochs": self.epochs_done, "steps": self.global_step,
            "loss": final.get("loss"), "loss_contrastive": final.get("loss_contrastive"),
            "loss_saliency": final.get("loss_saliency"),
            "images_per_s": sum(r["images_per_s"] * r["seconds"] for r in h) / trained if trained else None,
            "data_wait_share": sum(r["data_wait_share"] * r["seconds"] for r in h) / trained if trained else None,
            "seconds": trained, "seconds_this_call": seconds, "n_images": n_images,
            "resumed_from_epoch": self.resumed_from,
            **{name: sum(r[name] for r in h) for name in STAT_NAMES},
            "checkpoints": [path.name for _, path in list_checkpoints(self.out_dir)],
        }


def train(params: TrainParams, samples: Sequence[Sample], mask_dir: str | os.PathLike,
          out_dir: str | os.PathLike, *, progress: bool = True,
          on_epoch: Callable[[int, dict], None] | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train MaskContrast on ``samples`` with masks from ``mask_dir``; write the artifact to ``out_dir``.

    Writes ``checkpoints/epoch-NNNN.pt`` after every epoch (atomically; the last ``keep_last``
    kept), ``log.jsonl`` (a line per step and per epoch), and, once all epochs are done,
    ``model.pt`` (the query network, see ``checkpoint.load_model``) and ``loss_curve.png``.
    Continues from the newest checkpoint in ``out_dir`` (same parameters and images required).
    ``epochs == 0`` writes ``model.pt`` holding the initialisation alone.

    Under torchrun / SLURM with several processes it joins the process group (``distributed``):
    DDP query network, sharded batches of ``batch_size / world_size``, prototypes all-gathered
    into the queue, only rank 0 writes. ``on_epoch(epoch, record)`` is called on every rank after
    the epoch's checkpoint is written. ``max_steps`` stops the run once that many optimiser steps
    (counted from the start of training, resumed ones included) are done; the run is then
    incomplete (no ``model.pt``) and a later call continues it from the last checkpoint.

    Returns a summary: complete, epochs, steps, final losses (means of the last epoch),
    images_per_s, data_wait_share, seconds, seeds, device, amp, n_images, init report, counts of
    redrawn views / replaced images / unreadable images.

    Raises:
        TrainingDiverged: a non-finite loss (names the epoch, step and last good checkpoint).
        TrainDataError: images without masks, too few images for a batch, unusable masks.
        CheckpointError: the checkpoint in ``out_dir`` belongs to another run.
    """
    return Trainer(params, samples, mask_dir, out_dir, progress=progress, on_epoch=on_epoch,
                   max_steps=max_steps).run()
