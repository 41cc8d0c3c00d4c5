"""Pretrained weights by name, resolved the way torchvision users expect.

``imagenet`` is torchvision's ``IMAGENET1K_V1`` file of a backbone and ``moco_v2`` the MoCo v2
800-epoch ResNet-50 checkpoint. A name resolves to ``$TORCH_HOME/hub/checkpoints/<file>`` (torch's
own cache rule: ``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``), under
the file name torchvision and the MoCo authors use, so a file already downloaded by torchvision is
found. The file is hash-checked against the prefix its publishers give (sha256 for torchvision,
as ``torch.hub`` checks it; md5 for MoCo, as its README lists it) and downloaded only when absent.
No torch import: the configuration layer resolves names before any stage starts.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from artifacts.atomic import sha256_file

WEIGHT_NAMES = ("imagenet", "moco_v2")
DOWNLOAD_TIMEOUT_S = 30


class WeightsError(ValueError):
    """A named weight file that cannot be had: unknown name, wrong hash, or no network."""


@dataclass(frozen=True)
class WeightsSpec:
    url: str
    hash_kind: str  # "sha256" or "md5"
    hash_prefix: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_TORCHVISION = "https://download.pytorch.org/models/"
NAMED_WEIGHTS: dict[tuple[str, str], WeightsSpec] = {
    ("imagenet", "mobilenet_v2"): WeightsSpec(_TORCHVISION + "mobilenet_v2-b0353104.pth", "sha256", "b0353104"),
    ("imagenet", "resnet18"): WeightsSpec(_TORCHVISION + "resnet18-f37072fd.pth", "sha256", "f37072fd"),
    ("imagenet", "resnet50"): WeightsSpec(_TORCHVISION + "resnet50-0676ba61.pth", "sha256", "0676ba61"),
    ("moco_v2", "resnet50"): WeightsSpec(
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "md5", "a04e12f8"),
}


def is_named(value: object) -> bool:
    return isinstance(value, str) and value in WEIGHT_NAMES


def hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir() / 'checkpoints'`` without importing torch."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        torch_home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def weights_spec(name: str, backbone: str) -> WeightsSpec:
    try:
        return NAMED_WEIGHTS[(name, backbone)]
    except KeyError:
        have = ", ".join(f"{n} ({b})" for n, b in NAMED_WEIGHTS)
        raise WeightsError(f"no weights named {name!r} for backbone {backbone!r}; known: {have}") from None


def file_digest(path: str | os.PathLike, kind: str = "sha256") -> str:
    """Hex digest of a weights file, computed once per process for an unchanged file: the
    configuration check, the version and the stage all ask for it at start-up."""
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns, kind)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int, kind: str) -> str:
    if kind == "sha256":
        return sha256_file(path)
    digest = hashlib.new(kind)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, spec: WeightsSpec) -> None:
    actual = file_digest(path, spec.hash_kind)
    if not actual.startswith(spec.hash_prefix):
        raise WeightsError(
            f"{path}: {spec.hash_kind} {actual[:16]}... does not start with {spec.hash_prefix}, the hash "
            f"published for {spec.url}; the file is corrupt or another file: delete it and place the right one there")


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file in the same folder (never half-written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_weights(name: str, backbone: str, *, download: bool = True) -> Path:
    """The checked local file of the weights ``name`` for ``backbone``, downloaded if absent.

    Raises:
        WeightsError: unknown (name, backbone); a cached file whose hash does not match; a missing
            file that cannot be downloaded (the message names the URL and the exact path to place
            the file at).
    """
    spec = weights_spec(name, backbone)
    path = hub_checkpoint_dir() / spec.file_name
    if not path.is_file():
        if not download:
            raise WeightsError(f"weights {name!r} for {backbone} are not in the cache: download {spec.url} "
                               f"and place the file at {path}")
        try:
            _download(spec.url, path)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise WeightsError(f"weights {name!r} for {backbone}: cannot download {spec.url} ({error}); "
                               f"download it elsewhere and place the file at {path}") from error
    _check_hash(path, spec)
    return path


def resolve_init(value: str, backbone: str) -> str:
    """``train.init``-style values: 'random' and paths unchanged, names resolved to their file."""
    return str(resolve_weights(value, backbone)) if is_named(value) else value
