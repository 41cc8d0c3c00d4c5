"""The real-data results table: MaskContrast on davis16-objects, init alone vs trained, per mask source.

Runs the whole pipeline (``maskcontrast run``, each row one invocation in a subprocess, all in one
store so shared stages are computed once) from ``configs/davis16_mobilenet.yaml``:

- ``init``: the ImageNet MobileNetV2 alone (``train.epochs=0``; prototypes from the backbone's last
  feature grid, ``extract.embedding=backbone``, since the embedding head is untrained);
- ``model``: MaskContrast trained on the U2-Net-p masks (the paper's supervised-saliency setting);
- ``bootstrap``: trained on the DeepUSPS-style ``bootstrap`` masks (no human saliency labels; its
  encoder from the same ImageNet weights);
- ``priors``: trained on the hand-crafted ``priors`` masks;
- ``features``: trained on the ``features`` masks (objects cut from the ImageNet MobileNetV2's
  feature grid; no saliency labels); ``bootstrap-features``: the bootstrap taught by them;
- ``model-backbone`` / ``bootstrap-backbone``: that row's network, prototypes from its backbone
  like ``init`` (does training improve the backbone, or only add a head on top of it?);
- ``model-<route>`` / ``model-<route>-backbone``: the ``model`` row trained with a
  ``train.contrast`` route of issue 18 (``ROUTES``: false negatives out, nearest-neighbour positives
  in, neighbours measured in the head's or the key backbone's space, or in the initial network's
  with groups of near-duplicates).

and prints one markdown table (K-means mIoU mean ± std over the seeds and its colour baseline,
linear probe, retrieval, saliency of the masks used, wall time of the row). Rerunning reuses every
complete artifact, so a table can be reprinted for free and an interrupted run continues.

    python benchmarks/bench_davis_pipeline.py [--rows init,model,bootstrap,priors] [--store DIR]
        [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "davis16_mobilenet.yaml"
SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))
IMAGENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"

ROWS = {
    "init": ["train.epochs=0", "extract.embedding=backbone", "extract.mask_source=masks"],
    "model": [],
    # a random-init bootstrap does not beat the priors on this set (README); ImageNet does
    "bootstrap": ["masks.method=bootstrap", f"masks.bootstrap.init={IMAGENET}"],
    "priors": ["masks.method=priors"],
    # objects cut from the ImageNet MobileNetV2's features (the default estimator of pipeline.yaml)
    "features": ["masks.method=features", f"masks.features.init={IMAGENET}"],
    "features-backbone": ["masks.method=features", f"masks.features.init={IMAGENET}", "extract.embedding=backbone"],
    "bootstrap-features": ["masks.method=bootstrap", f"masks.bootstrap.init={IMAGENET}",
                           "masks.bootstrap.teacher=features", f"masks.features.init={IMAGENET}"],
    "model-backbone": ["extract.embedding=backbone"],
    "bootstrap-backbone": ["masks.method=bootstrap", f"masks.bootstrap.init={IMAGENET}", "extract.embedding=backbone"],
}
# issue 18's routes (train.contrast, stages/train/neighbours.py), each on the U2-Net-p masks
ROUTES = {
    "fn": ["train.contrast.fn_topk=4"],  # the 4 columns nearest the own prototype leave the softmax
    "nn": ["train.contrast.nn_topk=2"],  # the 2 nearest columns become positives (total weight 1)
    "bbfn": ["train.contrast.fn_topk=4", "train.contrast.space=backbone"],  # ... nearest in backbone space
    "bbnn": ["train.contrast.nn_topk=2", "train.contrast.space=backbone"],
    # 4 neighbours in backbone space as positives, total weight 2 (the best 10-epoch screen)
    "bbnn4": ["train.contrast.nn_topk=4", "train.contrast.nn_weight=2", "train.contrast.space=backbone"],
    # near-duplicate groups: 30 over-clusters (3 per class, as clusters.groups) of the initial network's
    # features; the own group's columns (one video's frames) leave the softmax, or become positives,
    # and the 2 nearest columns of other groups become positives
    "grp": ["train.contrast.space=init", "train.contrast.groups=30", "train.contrast.same_group=drop"],
    "grpnn": ["train.contrast.space=init", "train.contrast.groups=30", "train.contrast.same_group=drop",
              "train.contrast.nn_topk=2"],
    "grppos": ["train.contrast.space=init", "train.contrast.groups=30", "train.contrast.same_group=positive"],
}
for _route, _sets in ROUTES.items():
    ROWS[f"model-{_route}"] = list(_sets)
    ROWS[f"model-{_route}-backbone"] = [*_sets, "extract.embedding=backbone"]


def _run(store: Path, sets: list[str]) -> Path:
    """One ``maskcontrast run``; returns the evaluate artifact it printed."""
    cmd = [sys.executable, "-m", "pipeline", "--config", str(CONFIG), "--store", str(store)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run([*cmd, "run"], cwd=REPO, stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sys.stderr.write(out.stdout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} run: exit {out.returncode}")
    for line in out.stdout.splitlines():
        if line.startswith("done: evaluate artifact at "):
            return Path(line.split(" at ", 1)[1].strip())
    raise SystemExit("the run did not print its evaluate artifact")


def _fmt(m: dict, key: str = "miou") -> str:
    if key not in m:
        return "-"
    std = m.get(f"{key}_std")
    return f"{m[key]:.1f} ± {std:.1f}" if std else f"{m[key]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="init,model,model-backbone,priors,bootstrap")
    ap.add_argument("--store", type=Path, default=REPO / "store-davis")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra overrides for every row (a row's own settings, e.g. init's train.epochs=0, win)")
    args = ap.parse_args()
    lines = ["| row | masks | K-means | colour baseline | linear (last / best) | retrieval | mask IoU | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for row in args.rows.split(","):
        t = time.perf_counter()
        report = _run(args.store, args.sets + ROWS[row])  # a row's own settings win (init keeps epochs=0)
        wall = time.perf_counter() - t
        m = json.loads((report / "metrics.json").read_text())
        km, lin, ret, sal = (m.get(k, {}) for k in ("kmeans", "linear", "retrieval", "saliency"))
        manifest = json.loads((report / "manifest.json").read_text())
        masks = next((v for k, v in manifest.get("inputs", {}).items() if k == "masks"), "-")
        linear = f"{lin['miou']:.1f} / {lin.get('miou_best_on_val', lin['miou']):.1f}" if lin else "-"
        lines.append(f"| {row} | {masks} | {_fmt(km)} | {_fmt(km.get('colour_baseline', {}))} | {linear} | "
                     f"{_fmt(ret)} | {sal.get('iou', float('nan')):.3f} | {wall / 60:.1f} min |")
        print(f"{row}: {report}", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
