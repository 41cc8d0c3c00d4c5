"""The evaluate stage's parameters (the ``evaluate`` section of ``pipeline.yaml``), declared once.

``protocols`` run in the given order; ``seeds`` are the K-means seeds (one run each) and the
linear probe's seed (the first). Each protocol's own keys are a sub-section (``kmeans``,
``linear``, ``retrieval``). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from stages.params import check_fields, in_range, non_empty, opt

#: The reference's five seeds (VOC, Table 2 of the paper).
VOC_SEEDS = (1234, 1235, 1236, 1237, 1238)


def _split_name(v):
    return "must be a split name or 'all'" if v is not None and (not v or "/" in v) else None


@dataclass(frozen=True)
class KMeansParams:
    n_clusters: Optional[int] = opt(None, doc="default: number of foreground classes", check=in_range(1))
    pca_dim: int = opt(32, doc="PCA-whitening dimension of the prototypes", check=in_range(1))
    n_init: int = opt(3, doc="k-means++ restarts per seed (lowest inertia kept)", check=in_range(1))
    # the space K-means clusters in; these three keys enter versions and job keys through
    # space_options only, and not at all while space is pca: the versions made before them are kept
    space: Literal["pca", "discriminant"] = opt(
        "pca", doc="pca: the paper's PCA whitening; discriminant: Fisher's discriminant of over-clusters of the "
                   "train prototypes (label-free; kmeans.fit_discriminant)", since_default=True)
    groups: int = opt(3, doc="discriminant space: over-clusters of the train prototypes per K-means cluster",
                      check=in_range(1), since_default=True)
    reg: float = opt(0.1, doc="discriminant space: shrinkage of the within-group scatter (times its mean eigenvalue)",
                     check=in_range(0.0, lo_open=True), since_default=True)
    pixel: bool = opt(False, doc="also run pixel-level K-means on the stored features (plain backbones)")
    pixel_matching: Literal["hungarian", "majority"] = opt("hungarian", doc="matching of the pixel variant")
    pixel_clusters: Optional[int] = opt(None, doc="pixel variant k (over-clustering); default: number of classes",
                                        check=in_range(1))

    def __post_init__(self):
        check_fields(self)

    def space_options(self) -> dict[str, Any]:
        """The clustering space's keys as they enter versions and job keys: none for pca (the
        parameters made before the discriminant space; groups and reg do nothing then)."""
        return {} if self.space == "pca" else {"space": self.space, "groups": self.groups, "reg": self.reg}


@dataclass(frozen=True)
class LinearParams:
    epochs: int = opt(60, doc="epochs of the linear probe (1x1 convolution on the frozen features)", check=in_range(1))
    lr: float = opt(0.1, doc="SGD learning rate", check=in_range(0.0, lo_open=True))
    lr_drop_epoch: int = opt(25, doc="epoch where the learning rate drops tenfold", check=in_range(0))
    momentum: float = opt(0.9, doc="SGD momentum", check=in_range(0.0, 1.0))
    weight_decay: float = opt(1e-4, doc="SGD weight decay", check=in_range(0.0))
    batch_size: int = opt(16, doc="images per step", check=in_range(1))
    # dense CRF (the reference's parameters, stages/evaluate/crf.py) on the last epoch's val
    # predictions; while false the key stays out of the evaluate parameters, so the versions made
    # before it existed are unchanged
    crf: bool = opt(False, doc="also score val after dense-CRF post-processing (the paper's linear + CRF column)")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class RetrievalParams:
    class_subset: Optional[tuple[str, ...]] = opt(None, doc="extra mIoU on these classes only (others ignored)")
    bank_split: Optional[str] = opt(None, doc="split of the memory bank (the reference: VOC train); null = data.train_split",
                                    check=_split_name)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class EvaluateParams:
    protocols: tuple[Literal["kmeans", "linear", "retrieval", "saliency"], ...] = opt(
        ("kmeans", "linear", "retrieval"), doc="evaluation protocols to run", check=non_empty)
    seeds: tuple[int, ...] = opt(VOC_SEEDS, doc="seeds of the K-means and linear protocols", check=non_empty)
    kmeans: KMeansParams = opt(default_factory=KMeansParams)
    linear: LinearParams = opt(default_factory=LinearParams)
    retrieval: RetrievalParams = opt(default_factory=RetrievalParams)

    def __post_init__(self):
        check_fields(self)


def needs_train_split(params: EvaluateParams, bank_is_train: bool = True) -> bool:
    """Whether the protocols read the train split's embeddings: the linear probe learns on them,
    retrieval banks them (``bank_is_train``: no other bank split), K-means fits its discriminant
    space on them."""
    protocols = set(params.protocols)
    return ("linear" in protocols or ("retrieval" in protocols and bank_is_train)
            or ("kmeans" in protocols and params.kmeans.space == "discriminant"))


def protocol_options(params: EvaluateParams) -> dict[str, dict[str, Any]]:
    """Per protocol (``pixel_kmeans`` included), the runner keyword arguments that ``params`` sets,
    as JSON values (they enter the job keys of a comparison). ``linear.crf`` is absent while off."""
    k, lc = params.kmeans, params.linear
    subset = params.retrieval.class_subset
    return {
        "kmeans": {"n_clusters": k.n_clusters, "pca_dim": k.pca_dim, "n_init": k.n_init, **k.space_options()},
        "pixel_kmeans": {"n_clusters": k.pixel_clusters, "matching": k.pixel_matching},
        "retrieval": {"class_subset": None if subset is None else list(subset)},
        "linear": {"epochs": lc.epochs, "lr": lc.lr, "lr_drop_epoch": lc.lr_drop_epoch, "momentum": lc.momentum,
                   "weight_decay": lc.weight_decay, "batch_size": lc.batch_size,
                   **({"crf": True} if lc.crf else {})},  # absent when off: the job keys made before it
    }
