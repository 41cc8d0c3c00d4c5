"""Weights by name: the torch hub cache, hash checks, and one clear error when offline."""
from __future__ import annotations

import shutil
import urllib.error

import pytest

from stages.common import weights as W

REAL_DOWNLOAD = W._download


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(url, dest):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(W, "_download", offline)
    return tmp_path / "th" / "hub" / "checkpoints"


def test_cache_follows_torch_home(torch_home):
    assert W.hub_checkpoint_dir() == torch_home


def test_cache_hit_is_used_without_network(torch_home, mobilenet_weights):
    torch_home.mkdir(parents=True)
    shutil.copy(mobilenet_weights, torch_home / "mobilenet_v2-b0353104.pth")
    assert W.resolve_weights("imagenet", "mobilenet_v2") == torch_home / "mobilenet_v2-b0353104.pth"
    assert W.resolve_init("imagenet", "mobilenet_v2") == str(torch_home / "mobilenet_v2-b0353104.pth")


def test_hash_mismatch_names_the_file_and_the_expected_hash(torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "mobilenet_v2-b0353104.pth").write_bytes(b"not the weights")
    with pytest.raises(W.WeightsError, match=r"mobilenet_v2-b0353104\.pth: sha256 .* does not start with b0353104"):
        W.resolve_weights("imagenet", "mobilenet_v2")


def test_offline_miss_names_the_url_and_the_path(torch_home):
    with pytest.raises(W.WeightsError) as info:
        W.resolve_weights("moco_v2", "resnet50")
    text = str(info.value)
    assert "moco_v2_800ep_pretrain.pth.tar" in text and text.startswith("weights 'moco_v2' for resnet50: cannot download https://")
    assert f"place the file at {torch_home / 'moco_v2_800ep_pretrain.pth.tar'}" in text
    assert not torch_home.exists() or not any(torch_home.iterdir())  # nothing half-written


def test_unknown_pair_lists_the_known_names():
    with pytest.raises(W.WeightsError, match=r"no weights named 'moco_v2' for backbone 'mobilenet_v2'; known: .*imagenet \(resnet50\)"):
        W.weights_spec("moco_v2", "mobilenet_v2")


def test_download_writes_through_a_temporary_file(torch_home, monkeypatch, tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 1000)

    def fake_urlopen(url, timeout):
        return open(source, "rb")

    monkeypatch.setattr(W.urllib.request, "urlopen", fake_urlopen)
    dest = torch_home / "f.bin"
    REAL_DOWNLOAD("https://example.invalid/f.bin", dest)
    assert dest.read_bytes() == source.read_bytes() and [p.name for p in torch_home.iterdir()] == ["f.bin"]


def test_paths_and_random_pass_through():
    assert W.resolve_init("random", "resnet50") == "random"
    assert W.resolve_init("/some/file.pth", "resnet50") == "/some/file.pth"
