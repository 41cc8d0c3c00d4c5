"""Extract stage: prototype maths against hand computations, the end-to-end output against an
independent recomputation, mask sources, resume, bounded memory, skipped images, errors."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from artifacts.embeddings import EmbeddingStore, shard_name
from artifacts.masks import MaskRecord, write_mask_shard
from stages.data import Sample
from stages.extract import (
    SKIPPED_FILE,
    ExtractError,
    ExtractParams,
    backbone_prototypes,
    head_prototypes,
    nearest_indices,
    pullback_weights,
    resize_features,
    resize_mask,
)
from stages.extract.extract import extract
from stages.network.model import MaskContrastModel
from stages.params import ParamError

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _image(rng: np.random.Generator, h: int, w: int, box=None) -> np.ndarray:
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        img[y0:y1, x0:x1, 0] = 255
    return img


def _dataset(tmp_path: Path, n: int, seed: int = 0, bad: tuple[int, ...] = ()) -> list[Sample]:
    rng = np.random.default_rng(seed)
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    samples = []
    for i in range(n):
        path = folder / f"im{i:03d}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG truncated")
        else:
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            box = None if i % 4 == 3 else (h // 4, h // 2 + 3, w // 5, w // 2)  # every 4th: nothing red
            Image.fromarray(_image(rng, h, w, box)).save(path)
        samples.append(Sample(f"im{i:03d}", path, None))
    return samples


def _params(**kw) -> ExtractParams:
    base = dict(input_size=32, feature_size=4, batch_size=3, shard_size=4, num_workers=0, device="cpu")
    return ExtractParams(**{**base, **kw})


def _dump(directory: Path) -> dict:
    """Every dataset and attr of every shard, for comparing two outputs."""
    out = {}
    for path in sorted(directory.glob("emb-*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = ({k: f[k][()] for k in f}, dict(f.attrs))
    return out


def _assert_same_dump(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        (da, aa), (db, ab) = a[name], b[name]
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"{name}:{k}")
        assert aa == ab


# --------------------------------------------------------------------------- pure maths


def test_head_prototype_formula_by_hand():
    # Image 0: four pixels. Embeddings p0..p3 and raw logits s = 0.5, 0.6, 2.0, 0.4.
    # Salient: s > 0.5 on the RAW logit -> p1, p2 (p0: not strictly above; p3: sigmoid(0.4) = 0.6
    # would pass a sigmoid threshold, the reference's raw one excludes it).
    # sum = 0.6 * (0, 1) + 2.0 * (3, 4) = (6, 8.6); prototype = (6, 8.6) / sqrt(109.96).
    emb = torch.tensor([[[[1.0, 0.0, 3.0, 5.0]], [[0.0, 1.0, 4.0, -5.0]]],
                        [[[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # 2 x 2 x 1 x 4
    sal = torch.tensor([[[[0.5, 0.6, 2.0, 0.4]]], [[[0.5, -3.0, 0.1, 0.0]]]])  # 2 x 1 x 1 x 4
    protos, valid, salient = head_prototypes(emb, sal)
    norm = np.sqrt(6.0**2 + 8.6**2)
    np.testing.assert_allclose(protos[0].numpy(), [6.0 / norm, 8.6 / norm], rtol=1e-6)
    np.testing.assert_array_equal(protos[1].numpy(), [0.0, 0.0])  # no salient pixel
    assert valid.tolist() == [True, False]
    assert salient[:, 0].tolist() == [[False, True, True, False], [False, False, False, False]]


def test_backbone_prototype_is_mean_of_upsampled_grid():
    gen = torch.Generator().manual_seed(1)
    grid = torch.randn(3, 5, 4, 3, generator=gen)
    salient = torch.rand(3, 17, 11, generator=gen) > 0.6
    salient[2] = False
    protos, valid = backbone_prototypes(grid, salient)
    up = F.interpolate(grid, size=(17, 11), mode="bilinear", align_corners=False)  # 3 x 5 x 17 x 11
    for b in range(2):
        mean = up[b][:, salient[b]].mean(dim=1)
        np.testing.assert_allclose(protos[b].numpy(), (mean / mean.norm()).numpy(), rtol=1e-5, atol=1e-6)
    assert valid.tolist() == [True, True, False] and not protos[2].any()
    # The pulled-back weights carry the mask's total mass (bilinear weights sum to 1 per pixel).
    w = pullback_weights(salient, (4, 3))
    np.testing.assert_allclose(w.sum((1, 2)).numpy(), salient.sum((1, 2)).float().numpy(), rtol=1e-5)


def test_resize_features():
    trunk = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    blocks = trunk.view(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 2 x 2 block means by hand
    torch.testing.assert_close(resize_features(trunk, 2), blocks)
    assert resize_features(trunk, 4) is trunk
    torch.testing.assert_close(resize_features(trunk, 8),
                               F.interpolate(trunk, size=(8, 8), mode="bilinear", align_corners=False))


def test_nearest_resize_is_cv2_inter_nearest():
    # cv2 computes floor(i * (1 / (n_out / n_in))) in doubles; the exact-integer floor differs at
    # some sizes (e.g. 512 -> 374 or 498), so compare with cv2 itself over many size pairs.
    pairs = [(512, n) for n in range(1, 1100)] + [(n, 512) for n in range(1, 600)]
    pairs += [(a, b) for a in range(1, 40) for b in range(1, 40)]
    for n_in, n_out in pairs:
        row = np.arange(n_in, dtype=np.float32)[None].repeat(2, 0)
        ref = cv2.resize(row, (n_out, 2), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref, err_msg=f"{n_in} -> {n_out}")
    mask = np.random.default_rng(0).random((512, 512)) < 0.5
    for h, w in [(375, 500), (333, 500), (1, 1), (700, 999)]:
        ref = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        np.testing.assert_array_equal(resize_mask(mask, (h, w)), ref)


def test_params_validated():
    with pytest.raises(ParamError, match="^mask_source: expected one of 'model', 'masks', got 'gt'$"):
        ExtractParams(mask_source="gt")
    with pytest.raises(ParamError, match="^input_size: must be >= 32, got 0$"):
        ExtractParams(input_size=0)
    assert "batch_size" not in ExtractParams().recorded()
    assert ExtractParams().recorded()["saliency_threshold"] == 0.5


# --------------------------------------------------------------------------- the stage


def _expected(model: nn.Module, sample: Sample, size: int, feature_size: int):
    """Straightforward recomputation of one image: (mask at original size, prototype, features)."""
    img = np.array(Image.open(sample.image).convert("RGB"))
    x = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
    x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0 - MEAN) / STD
    with torch.no_grad():
        emb, sal, trunk = model(x, return_features=True)
    s = sal[0, 0]
    total = (emb[0] * (s * (s > 0.5))).sum(dim=(1, 2))  # D
    proto = total / total.norm() if total.norm() > 0 else total
    small = (s > 0.5).numpy().astype(np.uint8)
    mask = cv2.resize(small, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask, proto.numpy(), F.adaptive_avg_pool2d(trunk, feature_size)[0].half().numpy()


def test_model_source_matches_recomputation(tmp_path, stub_model):
    samples = _dataset(tmp_path, 6)
    model = stub_model()
    summary = extract(model, samples, tmp_path / "out", _params(), progress=False)
    store = EmbeddingStore(tmp_path / "out")
    assert store.ids() == [s.id for s in samples]
    assert summary["n_images"] == 6 and summary["n_skipped"] == 0 and summary["n_shards"] == 2
    for sample in samples:
        rec = store.get(sample.id, features=True)
        mask, proto, feats = _expected(model, sample, 32, 4)
        np.testing.assert_array_equal(rec.mask, mask)
        assert rec.valid == bool(mask.any())
        np.testing.assert_allclose(rec.prototype, proto, atol=1e-5)
        np.testing.assert_allclose(rec.features.astype(np.float32), feats.astype(np.float32), rtol=2e-3, atol=2e-3)
    ids, protos, valid = store.prototypes()
    assert valid.tolist() == [True, True, True, False, True, True]  # im003 has no red box
    assert summary["n_valid"] == 5 and summary["prototype_dim"] == 3
    assert summary["feature_shape"] == [256, 4, 4] and summary["feature_bytes"] > 0
    assert 0 < summary["salient_fraction_mean"] < 0.5
    attrs = store.attrs
    assert attrs["extract"]["mask_source"] == "model" and attrs["model"]["backbone"] == "stub"
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_features_optional_and_training_flag_restored(tmp_path, stub_model):
    samples = _dataset(tmp_path, 3)
    model = stub_model().train()
    summary = extract(model, samples, tmp_path / "out", _params(features=False), progress=False)
    assert model.training
    assert not EmbeddingStore(tmp_path / "out").has_features and summary["feature_bytes"] == 0


def _mask_artifact(directory: Path, samples: list[Sample], rng: np.random.Generator,
                   skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    masks = {}
    for s in samples:
        if s.id in skip:
            continue
        h, w = np.array(Image.open(s.image)).shape[:2]
        masks[s.id] = rng.random((h, w)) < 0.3
    masks[samples[0].id][:] = False  # an empty mask: invalid prototype
    records = [MaskRecord(i, m) for i, m in masks.items()]
    write_mask_shard(directory / "shard-00000.h5", records[:2])
    write_mask_shard(directory / "shard-00001.h5", records[2:])
    return masks


def test_mask_source_uses_given_masks(tmp_path, stub_model):
    samples = _dataset(tmp_path, 5)
    masks = _mask_artifact(tmp_path / "masks", samples, np.random.default_rng(3))
    model = stub_model()
    params = _params(mask_source="masks", num_workers=2)  # workers: the mask store travels pickled
    summary = extract(model, samples, tmp_path / "out", params, mask_dir=tmp_path / "masks", progress=False)
    store = EmbeddingStore(tmp_path / "out")
    assert summary["n_valid"] == 4
    for s in samples:
        rec = store.get(s.id)
        np.testing.assert_array_equal(rec.mask, masks[s.id])  # the artifact's mask, bit for bit
        img = np.array(Image.open(s.image).convert("RGB"))
        x = cv2.resize(img, (32, 32), interpolation=cv2.INTER_CUBIC)
        x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0 - MEAN) / STD
        with torch.no_grad():
            emb, _, _ = model(x, return_features=True)
        m = cv2.resize(masks[s.id].astype(np.uint8), (32, 32), interpolation=cv2.INTER_NEAREST)
        total = (emb[0] * torch.from_numpy(m).float()).sum(dim=(1, 2))
        expected = (total / total.norm()).numpy() if m.any() else np.zeros(3, np.float32)
        np.testing.assert_allclose(rec.prototype, expected, atol=1e-5)
    assert store.attrs["extract"]["mask_source"] == "masks"


def test_backbone_embedding(tmp_path, stub_model):
    samples = _dataset(tmp_path, 3)
    masks = _mask_artifact(tmp_path / "masks", samples, np.random.default_rng(4))
    model = stub_model()
    extract(model, samples, tmp_path / "out", _params(mask_source="masks", embedding="backbone"),
            mask_dir=tmp_path / "masks", progress=False)
    rec = EmbeddingStore(tmp_path / "out").get(samples[1].id)
    img = np.array(Image.open(samples[1].image).convert("RGB"))
    x = cv2.resize(img, (32, 32), interpolation=cv2.INTER_CUBIC)
    x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0 - MEAN) / STD
    with torch.no_grad():
        up = F.interpolate(model.backbone(x), size=(32, 32), mode="bilinear", align_corners=False)[0]
    m = torch.from_numpy(cv2.resize(masks[samples[1].id].astype(np.uint8), (32, 32),
                                    interpolation=cv2.INTER_NEAREST).astype(bool))
    mean = up[:, m].mean(dim=1)
    assert rec.prototype.shape == (5,)
    np.testing.assert_allclose(rec.prototype, (mean / mean.norm()).numpy(), atol=1e-5)


def test_missing_mask_is_an_error(tmp_path, stub_model):
    samples = _dataset(tmp_path, 3)
    _mask_artifact(tmp_path / "masks", samples, np.random.default_rng(0), skip=("im002",))
    with pytest.raises(ExtractError, match=r"has no mask for 1 of the 3 images \(e\.g\. 'im002'\)"):
        extract(stub_model(), samples, tmp_path / "out", _params(mask_source="masks"),
                mask_dir=tmp_path / "masks", progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(ExtractError, match="needs mask_dir"):
        extract(stub_model(), samples, tmp_path / "out", _params(mask_source="masks"), progress=False)
    # An id the masks stage itself skipped (unreadable there) is skipped here, not an error.
    (tmp_path / "masks" / SKIPPED_FILE).write_text(json.dumps({"im002": "cannot decode"}))
    summary = extract(stub_model(), samples, tmp_path / "out", _params(mask_source="masks"),
                      mask_dir=tmp_path / "masks", progress=False)
    assert summary["n_images"] == 2 and summary["n_skipped"] == 1
    assert "masks stage skipped it (cannot decode)" in summary["skipped_examples"]["im002"]


def test_mask_of_another_size_is_an_error(tmp_path, stub_model):
    samples = _dataset(tmp_path, 2)
    write_mask_shard(tmp_path / "masks" / "shard-00000.h5",
                     [MaskRecord(s.id, np.ones((7, 7), bool)) for s in samples])
    with pytest.raises(ExtractError, match="is 7x7 but image .* made from other images"):
        extract(stub_model(), samples, tmp_path / "out", _params(mask_source="masks"),
                mask_dir=tmp_path / "masks", progress=False)


def test_bad_image_skipped_and_reported(tmp_path, stub_model):
    samples = _dataset(tmp_path, 6, bad=(1, 4))
    summary = extract(stub_model(), samples, tmp_path / "out", _params(), progress=False)
    store = EmbeddingStore(tmp_path / "out")
    assert store.ids() == ["im000", "im002", "im003", "im005"]
    assert summary["n_images"] == 4 and summary["n_skipped"] == 2
    skipped = json.loads((tmp_path / "out" / SKIPPED_FILE).read_text())
    assert sorted(skipped) == ["im001", "im004"]
    assert skipped["im001"].endswith("im001.png: not an image file (or a format Pillow cannot read)")


def test_all_bad_block_gives_empty_shard(tmp_path, stub_model):
    samples = _dataset(tmp_path, 6, bad=(4, 5))  # shard 1 = im004, im005: nothing readable
    model = stub_model()
    extract(model, samples, tmp_path / "out", _params(), progress=False)
    assert (tmp_path / "out" / shard_name(1)).exists()
    seen = model.images_seen
    extract(model, samples, tmp_path / "out", _params(), progress=False)
    assert model.images_seen == seen  # nothing recomputed


class Interrupt(Exception):
    pass


def test_resume_recomputes_no_shard_and_matches_uninterrupted(tmp_path, stub_model):
    samples = _dataset(tmp_path, 10, bad=(5,))  # shards of 4: [0-3], [4-7], [8-9]
    full = stub_model()
    extract(full, samples, tmp_path / "full", _params(), progress=False)

    def stop_after_first(done: int, total: int) -> None:
        if done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(stub_model(), samples, tmp_path / "part", _params(), progress=False, on_shard=stop_after_first)
    out = tmp_path / "part"
    assert sorted(p.name for p in out.iterdir()) == [shard_name(0)]  # no partial shard, no temp file
    before = (out / shard_name(0)).stat()
    resumed = stub_model()
    calls = []
    summary = extract(resumed, samples, out, _params(), progress=False, on_shard=lambda d, t: calls.append((d, t)))
    assert resumed.images_seen == 5  # shards 1 and 2 only, minus the unreadable im005
    after = (out / shard_name(0)).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert summary["n_computed"] == 6 and summary["n_images"] == 9 and summary["n_skipped"] == 1
    _assert_same_dump(_dump(tmp_path / "full"), _dump(out))
    assert json.loads((out / SKIPPED_FILE).read_text()).keys() == {"im005"}
    # A third run finds everything done.
    again = stub_model()
    assert extract(again, samples, out, _params(), progress=False)["n_computed"] == 0 and again.images_seen == 0


def test_existing_shards_with_other_params_rejected(tmp_path, stub_model):
    samples = _dataset(tmp_path, 5)
    extract(stub_model(), samples, tmp_path / "out", _params(), progress=False)
    with pytest.raises(ExtractError, match="was written with extract parameters"):
        extract(stub_model(), samples, tmp_path / "out", _params(input_size=64), progress=False)


def test_memory_does_not_grow_with_the_number_of_images(tmp_path, stub_model):
    n = 6
    samples = _dataset(tmp_path, 4 * n)
    params = _params(feature_size=16, shard_size=3, batch_size=3)  # features: 128 KiB per image
    model = stub_model()
    extract(model, samples[:n], tmp_path / "warm", params, progress=False)  # lazy initialisations

    def peak(count: int, name: str) -> int:
        tracemalloc.start()
        try:
            extract(model, samples[:count], tmp_path / name, params, progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(n, "small"), peak(4 * n, "large")
    # Keeping anything per image across shards would add >= 18 x 128 KiB = 2.3 MiB here.
    assert large - small < 512 * 1024, (small, large)


def test_real_model_head_and_backbone(tmp_path):
    samples = _dataset(tmp_path, 3)
    model = MaskContrastModel("mobilenet_v2", output_stride=32, embedding_dim=8)
    s1 = extract(model, samples, tmp_path / "head", _params(input_size=64, feature_size=4), progress=False)
    assert s1["prototype_dim"] == 8 and s1["feature_shape"] == [256, 4, 4]
    masks = _mask_artifact(tmp_path / "masks", samples, np.random.default_rng(5))
    s2 = extract(model, samples, tmp_path / "bb", _params(input_size=64, mask_source="masks", embedding="backbone"),
                 mask_dir=tmp_path / "masks", progress=False)
    assert s2["prototype_dim"] == 1280 and s2["n_valid"] == sum(m.any() for m in masks.values())


@pytest.mark.gpu
def test_cuda_autocast_close_to_cpu(tmp_path, stub_model):
    samples = _dataset(tmp_path, 5)
    extract(stub_model(), samples, tmp_path / "cpu", _params(), progress=False)
    extract(stub_model(), samples, tmp_path / "gpu", _params(device="cuda"), progress=False)
    _, a, va = EmbeddingStore(tmp_path / "cpu").prototypes()
    _, b, vb = EmbeddingStore(tmp_path / "gpu").prototypes()
    assert (va == vb).all()
    assert (np.sum(a[va] * b[vb], axis=1) > 0.99).all()


# --------------------------------------------------------------------------- proposals


def _split_masks(samples, masks):
    """Each mask's left and right halves as two proposals (an empty mask: none)."""
    out = {}
    for s in samples:
        m = masks[s.id]
        left, right = m.copy(), m.copy()
        left[:, m.shape[1] // 2:] = False
        right[:, :m.shape[1] // 2] = False
        out[s.id] = [p for p in (left, right) if p.any()]
    return out


@pytest.mark.parametrize("embedding", ["head", "backbone"])
def test_each_proposal_is_embedded_as_an_image_with_that_mask(tmp_path, stub_model, embedding):
    from artifacts.masks import Proposal

    samples = _dataset(tmp_path, 4)
    masks = _mask_artifact(tmp_path / "v1", samples, np.random.default_rng(5))
    parts = _split_masks(samples, masks)
    write_mask_shard(tmp_path / "v2" / "shard-00000.h5",
                     [MaskRecord(s.id, masks[s.id], proposals=[Proposal(p, 1.0) for p in parts[s.id]])
                      for s in samples])
    model = stub_model()
    params = _params(mask_source="masks", embedding=embedding)
    summary = extract(model, samples, tmp_path / "out", params, mask_dir=tmp_path / "v2", progress=False)
    assert summary["schema_version"] == 2 and summary["n_proposals"] == sum(len(p) for p in parts.values())
    extract(model, samples, tmp_path / "plain", params, mask_dir=tmp_path / "v1", progress=False)
    store, plain = EmbeddingStore(tmp_path / "out"), EmbeddingStore(tmp_path / "plain")
    for s in samples:  # the per-image record is the version-1 one
        a, b = store.get(s.id), plain.get(s.id)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.prototype, b.prototype)
    for k in range(2):  # proposal k of each image is an image whose mask is that proposal
        one = {s.id: (parts[s.id][k] if len(parts[s.id]) > k else np.zeros_like(masks[s.id])) for s in samples}
        write_mask_shard(tmp_path / f"only{k}" / "shard-00000.h5", [MaskRecord(i, m) for i, m in one.items()])
        extract(model, samples, tmp_path / f"emb{k}", params, mask_dir=tmp_path / f"only{k}", progress=False)
        alone = EmbeddingStore(tmp_path / f"emb{k}")
        for s in samples:
            regions = store.read_regions(s.id)
            if len(parts[s.id]) <= k:
                continue
            np.testing.assert_array_equal(regions[k].mask, parts[s.id][k])
            np.testing.assert_allclose(regions[k].prototype, alone.get(s.id).prototype, atol=1e-5)
            assert regions[k].valid == alone.get(s.id).valid
    ids, counts, protos, valid = store.regions()
    assert ids == [s.id for s in samples] and counts.tolist() == [max(1, len(parts[i])) for i in ids]
    assert protos.shape[0] == counts.sum() and not valid[0]  # image 0's mask is empty: one empty region


def test_model_source_splits_the_heads_mask_into_components(tmp_path, stub_model):
    from stages.masks.params import ProposalParams

    samples = _dataset(tmp_path, 4)
    model = stub_model()
    split = ProposalParams("components", max_proposals=2, min_proposal=0.0)
    summary = extract(model, samples, tmp_path / "out", _params(), progress=False, proposals=split)
    plain = extract(model, samples, tmp_path / "plain", _params(), progress=False, proposals=ProposalParams())
    assert summary["schema_version"] == 2 and plain["schema_version"] == 1
    store = EmbeddingStore(tmp_path / "out")
    assert store.attrs["extract"]["proposals"]["max_proposals"] == 2 and summary["n_proposals"] > 0
    for s in samples:
        rec = store.get(s.id, proposals=True)
        np.testing.assert_array_equal(rec.prototype, EmbeddingStore(tmp_path / "plain").get(s.id).prototype)
        assert len(rec.proposals) <= 2
        union = np.zeros(rec.shape, bool)
        for p in rec.proposals:
            assert (p.mask <= rec.mask).all() and not (p.mask & union).any()
            union |= p.mask
    with pytest.raises(ExtractError, match="written with extract parameters"):
        extract(model, samples, tmp_path / "out", _params(), progress=False, proposals=ProposalParams())
