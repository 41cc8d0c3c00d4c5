"""The pipeline configuration: ``pipeline.yaml`` -> validated, frozen dataclasses.

Only this layer reads the file. Its sections are the stages' own parameter classes (declared
once, with defaults, checks and documentation, e.g. ``stages.train.params.TrainParams``); a stage
receives its section, never the config itself. Relative paths in the file are resolved against the file's
directory; relative paths given with ``--set`` against the current directory.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.configtypes import ConfigError, build, in_range, opt, to_plain
from stages.bookkeeping import HASHED_AS, is_bookkeeping
from stages.clusters.params import ClusterParams
from stages.common.weights import WEIGHT_NAMES, WeightsError, is_named, resolve_weights
from stages.data.io import DEFAULT_MAX_PIXELS
from stages.evaluate.params import VOC_SEEDS, EvaluateParams  # noqa: F401  (VOC_SEEDS: the presets' seeds)
from stages.extract.params import ExtractParams
from stages.masks.params import BootstrapParams, FeatureParams, OnnxParams, PostParams, PriorParams, ProposalParams
from stages.params import at_default_since
from stages.train.params import TrainParams

DEFAULT_CONFIG = "pipeline.yaml"


def _split_name(v):
    return "must be a split name or 'all'" if not v or "/" in v else None


@dataclass(frozen=True)
class DataConfig:
    root: Path = opt(Path("demo-data"), doc="dataset root: a VOC2012 (or VOCdevkit) folder, or a folder with images/")
    layout: Literal["auto", "voc", "folder"] = opt("auto", doc="dataset layout; auto detects JPEGImages/ vs images/")
    train_split: str = opt("train", doc="split used for mask proposals, training and the linear probe", check=_split_name)
    val_split: str = opt("val", doc="split used for K-means, retrieval queries and scores", check=_split_name)
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, check=in_range(1),
                          doc="images with more pixels are skipped (with the reason) as possible decompression bombs")


@dataclass(frozen=True)
class MasksConfig(ProposalParams, PostParams):
    """The masks section: the post-processing keys (``PostParams``) and the object-proposal keys
    (``ProposalParams``), declared there, the estimator and its sub-sections."""

    method: Literal["priors", "bootstrap", "model", "import", "features"] = opt("priors", doc="mask-proposal estimator")
    split: str = opt("all", doc="images to compute masks for: a split name or 'all'", check=_split_name)
    model_path: Optional[Path] = opt(None, doc="ONNX salient-object model (method: model)")
    import_dir: Optional[Path] = opt(None, doc="folder of <id>.png masks, 0/255 (method: import)")
    store_soft: bool = opt(True, doc="also store the soft map as uint8")
    shard_size: int = opt(512, doc="images per HDF5 shard", check=in_range(1))
    priors: PriorParams = opt(default_factory=PriorParams)
    model: OnnxParams = opt(default_factory=OnnxParams)
    bootstrap: BootstrapParams = opt(default_factory=BootstrapParams)
    features: FeatureParams = opt(default_factory=FeatureParams)

    def __post_init__(self):
        super().__post_init__()
        if self.method == "model" and self.model_path is None:
            raise ConfigError("masks.method is 'model' but no model file is given", "model_path")
        if self.method == "import" and self.import_dir is None:
            raise ConfigError("masks.method is 'import' but no folder is given", "import_dir")
        if self.proposals == "cuts" and self.method != "features":
            raise ConfigError(f"cuts proposals come from the features estimator's repeated cuts; set "
                              f"masks.method: features (it is {self.method!r}) or masks.proposals: components",
                              "proposals")

    @property
    def proposal_params(self) -> ProposalParams:
        """The proposal settings as the masks stage takes them."""
        return ProposalParams.of(self)


@dataclass(frozen=True)
class DaskConfig:
    scheduler: Optional[str] = opt(None, doc="tcp://host:port of a dask scheduler; null = a local cluster")
    n_workers: int = opt(0, doc="local cluster workers; 0 = one per core", check=in_range(0))


@dataclass(frozen=True)
class Config:
    store: Path = opt(Path("store"), doc="artifact store directory")
    data: DataConfig = opt(default_factory=DataConfig)
    masks: MasksConfig = opt(default_factory=MasksConfig)
    train: TrainParams = opt(default_factory=TrainParams)
    extract: ExtractParams = opt(default_factory=ExtractParams)
    evaluate: EvaluateParams = opt(default_factory=EvaluateParams)
    clusters: ClusterParams = opt(default_factory=ClusterParams)
    dask: DaskConfig = opt(default_factory=DaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def section(self, name: str, drop_volatile: bool = True) -> dict[str, Any]:
        """Section ``name`` as plain data. With ``drop_volatile`` (the default), as it enters artifact
        versions: bookkeeping keys (``stages.bookkeeping``) left out, or at their ``HASHED_AS`` value,
        and keys added since versions existed (``since_default``) left out while at their default."""
        if not drop_volatile:
            return to_plain(getattr(self, name), section=name)
        since = at_default_since(self)
        out = to_plain(getattr(self, name), drop=lambda s, n: is_bookkeeping(s, n) or since(s, n), section=name)
        for key, value in HASHED_AS.items():
            head, _, leaf = key.rpartition(".")
            if head == name:
                out[leaf] = value
        return out


# -- loading ----------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` -> ``("train.epochs", 5)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}", key, "--set") from None
    return key, value


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section", key, source)
        node = nxt
    node[parts[-1]] = value


def _resolve_relative(cls: type, data: Any, base: Path) -> Any:
    """Make relative paths in ``data`` absolute against ``base`` (typed by the dataclass fields)."""
    if not isinstance(data, dict):
        return data
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out[f.name] = _resolve_relative(tp, out[f.name], base)
        elif _is_path_type(tp) and isinstance(out[f.name], str) and out[f.name]:
            p = Path(out[f.name]).expanduser()
            out[f.name] = os.path.normpath(p if p.is_absolute() else base / p)  # no configs/../ in messages
        elif f.name == "init" and isinstance(out[f.name], str) and out[f.name] not in ("random", "", *WEIGHT_NAMES):
            p = Path(out[f.name]).expanduser()
            out[f.name] = os.path.normpath(p if p.is_absolute() else base / p)  # no configs/../ in messages
    return out


def _is_path_type(tp: Any) -> bool:
    return tp is Path or (Path in getattr(tp, "__args__", ()))


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
                store: str | os.PathLike[str] | None = None) -> Config:
    """Read ``path`` (if it exists; None means defaults), apply ``--set`` overrides, validate everything."""
    source = str(path) if path is not None else "<defaults>"
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            with open(p, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", None, source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("the top level must be a mapping of sections", None, source)
        data = _resolve_relative(Config, loaded or {}, p.resolve().parent)
    cwd = Path.cwd()
    for text in overrides:
        key, value = parse_override(text)
        patch: dict = {}
        _set_dotted(patch, key, value, "--set")
        patch = _resolve_relative(Config, patch, cwd)
        _merge(data, patch)
    if store is not None:
        data["store"] = str(Path(store).expanduser().resolve())
    try:
        return build(Config, data, "", source, base)
    except ConfigError as exc:
        if not overrides:
            raise
        raise ConfigError(exc.detail, exc.key, _with_sets(source, overrides, exc.key)) from None


def _with_sets(source: str, overrides: list[str] | tuple[str, ...], key: str | None) -> str:
    """``source`` with the ``--set`` options, once, the ones that set ``key`` (or a key inside it,
    or the section holding it) first."""
    def sets_key(text: str) -> bool:
        k = text.partition("=")[0].strip()
        return bool(key) and (k == key or key.startswith((k + ".", k + "[")) or k.startswith(key + "."))

    ordered = sorted(overrides, key=lambda text: not sets_key(text))  # stable: the rest in the given order
    return f"{source} (with --set {', '.join(ordered)})"


def _merge(into: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def check_paths(cfg: Config, *, need_data: bool = True, source: str | None = None) -> None:
    """Reject missing input paths before any work starts (the stages would only fail later)."""
    if need_data and not cfg.data.root.exists():
        raise ConfigError(f"dataset folder does not exist: {cfg.data.root} (the demo dataset is made with "
                          f"`maskcontrast data make-demo DIR`)", "data.root", source)
    m = cfg.masks
    if m.method == "model" and m.model_path is not None and not m.model_path.is_file():
        raise ConfigError(f"model file does not exist: {m.model_path}", "masks.model_path", source)
    if m.method == "import" and m.import_dir is not None and not m.import_dir.is_dir():
        raise ConfigError(f"mask folder does not exist: {m.import_dir}", "masks.import_dir", source)
    _check_init(cfg.train.init, cfg.train.backbone, "train.init", source)
    if cfg.clusters.names is not None and not cfg.clusters.names.is_file():
        raise ConfigError(f"names file does not exist: {cfg.clusters.names}", "clusters.names", source)
    if m.method == "bootstrap":
        _check_init(m.bootstrap.init, m.bootstrap.backbone, "masks.bootstrap.init", source)
    if m.method == "features" or (m.method == "bootstrap" and m.bootstrap.teacher == "features"):
        _check_init(m.features.init, m.features.backbone, "masks.features.init", source, allow_random=False)
        if m.features.class_prior > 0 and (m.features.init == "moco_v2" or m.features.init_kind == "moco"):
            raise ConfigError("a MoCo checkpoint has no ImageNet classifier for the class prior: "
                              "set masks.features.class_prior: 0", "masks.features.class_prior", source)


def _check_init(value: str, backbone: str, key: str, source: str | None, allow_random: bool = True) -> None:
    """A weights name resolves to a checked file in the torch hub cache (downloaded if absent); a
    path must exist. Either failure is one configuration error naming the key."""
    expected = f"expected {'random, ' if allow_random else ''}{' or '.join(WEIGHT_NAMES)} or an existing checkpoint file"
    if value == "random":
        if not allow_random:
            raise ConfigError(f"{expected}, got random (this estimator needs pretrained weights)", key, source)
        return
    if is_named(value):
        try:
            resolve_weights(value, backbone)
        except WeightsError as error:
            raise ConfigError(str(error), key, source) from None
    elif not Path(value).is_file():
        raise ConfigError(f"{expected}, got {value}", key, source)
