"""K-means in the PCA-whitened space (the paper's protocol) against the label-free discriminant space.

For each extract artifact (``STORE/extract/<version>``, with its train and val splits), scores the
val prototypes with the K-means protocol of the evaluate stage (``run_kmeans``: the same counts,
seeds and matching) in

- ``pca``: PCA(``pca_dim``, whiten) of the val prototypes (the paper's; the baseline, same process);
- ``discriminant gG``: Fisher's discriminant of G x k over-clusters of the *train* prototypes
  (``evaluate.kmeans.space: discriminant``, ``groups: G``), once per over-clustering seed
  (``--fit-seeds``; the pipeline uses seed 0), reported as the mean over those seeds of the
  5-seed K-means mIoU, with the range;
- ``val-fit g3``: the same space fitted on the val prototypes themselves (what the label-free
  ``clusters`` stage does, where only one split exists);
- with ``--oracle``, two label-using probes (not pipeline options): Fisher's discriminant of the
  train prototypes grouped by their true class (each image's majority label), an upper bound for
  a linear re-weighting of these prototypes, and grouped by video (ids ``<video>_<frame>``).

    python benchmarks/bench_kmeans_space.py --data DATA [--groups 2,3,4] [--fit-seeds 0,1,2] \\
        [NAME=]STORE/extract/<version> ...

Labels are read only to score. Prints one markdown table; the difference column is against the
``pca`` row of the same artifact.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifacts.embeddings import EmbeddingStore  # noqa: E402
from stages.data.index import DatasetIndex  # noqa: E402
from stages.evaluate.kmeans import KMeansProtocol, PCAWhitening, discriminant_directions, fit_discriminant  # noqa: E402
from stages.evaluate.protocols import class_counts, run_kmeans  # noqa: E402
from stages.evaluate.protocols.counts import region_prototypes  # noqa: E402
from stages.evaluate.protocols.kmeans import discriminant_space  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("extracts", nargs="+", help="[NAME=]extract artifact directory (with train/ and val/)")
    ap.add_argument("--data", type=Path, required=True, help="the dataset root the artifacts were extracted from")
    ap.add_argument("--groups", default="2,3,4", help="over-clusters per K-means cluster, comma-separated")
    ap.add_argument("--fit-seeds", default="0,1,2", help="over-clustering seeds, comma-separated")
    ap.add_argument("--pca-dim", type=int, default=32)
    ap.add_argument("--n-init", type=int, default=3, help="k-means++ restarts per seed (evaluate.kmeans.n_init)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--oracle", action="store_true", help="also the discriminants of the true classes and videos")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    fit_seeds = [int(s) for s in args.fit_seeds.split(",")]
    dataset = DatasetIndex.open(args.data)
    k = len(dataset.classes) - 1
    val_ids = dataset.ids(args.val_split)

    print(f"| artifact | space | K-means (5 seeds) | vs pca |")
    print("|---|---|---|---|")
    for item in args.extracts:
        name, _, path = item.rpartition("=")
        path = Path(path)
        name = name or path.name
        val, train = path / args.val_split, path / args.train_split
        for split in (val, train):
            if not split.is_dir():
                sys.exit(f"{split}: no such embedding split; extract it (e.g. with the linear or retrieval protocol)")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base = run_kmeans(val, dataset, val_ids, tmp / "pca", pca_dim=args.pca_dim, n_init=args.n_init,
                              split=args.val_split,
                              progress=False, figures=False, colour_baseline=False, cache_dir=tmp)
            print(f"| {name} | pca {args.pca_dim} | {base['miou']:.1f} ± {base['miou_std']:.1f} | |", flush=True)
            store = EmbeddingStore(val)
            sc = class_counts(store, dataset, val_ids, False, split=args.val_split, cache_dir=tmp, protocol="K-means")
            protos = region_prototypes(store, sc)
            protocol = KMeansProtocol(n_clusters=k, pca_dim=args.pca_dim, n_init=args.n_init)
            for g in groups:
                runs = [protocol.run(protos, sc.counts, space=discriminant_space(
                    train, g * k, reg=0.1, pca_dim=args.pca_dim, seed=s)[0]).miou for s in fit_seeds]
                mean = float(np.mean(runs))
                print(f"| {name} | discriminant g{g} (train fit) | {mean:.1f} [{min(runs):.1f}–{max(runs):.1f}] | "
                      f"{mean - base['miou']:+.1f} |", flush=True)
            if args.oracle:
                from bench_davis_neighbours import image_class

                ids, train_protos, ok = EmbeddingStore(train).prototypes()
                x = train_protos[ok].astype(np.float64)
                kept = [i for i, v in zip(ids, ok) if v]
                for what, groups_of in (("true classes (labels)", [image_class(args.data / "labels", i) for i in kept]),
                                        ("videos (from the ids)", [i.rsplit("_", 1)[0] for i in kept])):
                    dirs = discriminant_directions(x, np.unique(groups_of, return_inverse=True)[1], 0.1)
                    space = PCAWhitening(x.mean(0), dirs.T.copy(), np.ones(dirs.shape[1]))
                    r = protocol.run(protos, sc.counts, space=space)
                    print(f"| {name} | discriminant of the {what} | {r.miou:.1f} ± {r.miou_std:.1f} | "
                          f"{r.miou - base['miou']:+.1f} |", flush=True)
            valid = protos[np.linalg.norm(protos, axis=1) > 0]
            runs = [protocol.run(protos, sc.counts, space=fit_discriminant(
                valid, min(3 * k, len(valid) - 1), reg=0.1, pca_dim=args.pca_dim, seed=s)).miou for s in fit_seeds]
            mean = float(np.mean(runs))
            print(f"| {name} | discriminant g3 (val fit) | {mean:.1f} [{min(runs):.1f}–{max(runs):.1f}] | "
                  f"{mean - base['miou']:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
