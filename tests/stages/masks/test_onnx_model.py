"""OnnxSaliency: validation errors, pre/post-processing, batching, pickling; U^2-Net-p on real weights.

The ``onnx`` package is not installed (and torch.onnx.export needs it), so the tiny test models
are written directly as ONNX protobuf bytes by the small encoder below (field numbers from
onnx.proto: ModelProto, GraphProto, NodeProto, AttributeProto, ValueInfoProto, TypeProto).
"""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from stages.masks.onnx_model import OnnxParams, OnnxSaliency, SaliencyModelError

# --- a minimal ONNX protobuf writer -------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _bytes_field(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _str_field(num: int, text: str) -> bytes:
    return _bytes_field(num, text.encode())


FLOAT, INT64 = 1, 7  # TensorProto.DataType


def _value_info(name: str, dims: list, elem_type: int = FLOAT) -> bytes:
    """ValueInfoProto{name=1, type=2{tensor_type=1{elem_type=1, shape=2{dim=1{value=1 | param=2}}}}}."""
    shape = b"".join(_bytes_field(1, _int_field(1, d) if isinstance(d, int) else _str_field(2, d)) for d in dims)
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, _int_field(1, elem_type) + _bytes_field(2, shape)))


def _node(op: str, inputs: list[str], outputs: list[str], attrs: tuple[bytes, ...] = ()) -> bytes:
    """NodeProto{input=1, output=2, op_type=4, attribute=5}."""
    return (
        b"".join(_str_field(1, i) for i in inputs)
        + b"".join(_str_field(2, o) for o in outputs)
        + _str_field(4, op)
        + b"".join(_bytes_field(5, a) for a in attrs)
    )


def _ints_attr(name: str, values: list[int]) -> bytes:  # AttributeProto{name=1, ints=8, type=20 (INTS=7)}
    return _str_field(1, name) + b"".join(_int_field(8, v) for v in values) + _int_field(20, 7)


def _int_attr(name: str, value: int) -> bytes:  # AttributeProto{name=1, i=3, type=20 (INT=2)}
    return _str_field(1, name) + _int_field(3, value) + _int_field(20, 2)


def _model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """ModelProto{ir_version=1, graph=7{node=1, name=2, input=11, output=12}, opset_import=8{version=2}}."""
    graph = (
        b"".join(_bytes_field(1, n) for n in nodes)
        + _str_field(2, "test")
        + b"".join(_bytes_field(11, v) for v in inputs)
        + b"".join(_bytes_field(12, v) for v in outputs)
    )
    return _int_field(1, 7) + _bytes_field(8, _int_field(2, 13)) + _bytes_field(7, graph)


def _brightness_model(batch="N", height="H", width="W") -> bytes:
    """Saliency = sigmoid(mean over channels of the normalised input): (N, 3, H, W) -> (N, 1, H, W)."""
    return _model(
        [
            _node("ReduceMean", ["x"], ["m"], (_ints_attr("axes", [1]), _int_attr("keepdims", 1))),
            _node("Sigmoid", ["m"], ["y"]),
        ],
        [_value_info("x", [batch, 3, height, width])],
        [_value_info("y", [batch, 1, height, width])],
    )


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _disk_image(h: int = 48, w: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright disk on a dark textured background; returns (uint8 RGB image, disk mask)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    disk = (ys - h / 2) ** 2 + (xs - w / 2) ** 2 < (min(h, w) / 4) ** 2
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    img[disk] = rng.integers(200, 256, (int(disk.sum()), 3))
    return img, disk


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture
def brightness(tmp_path):
    return _write(tmp_path, "bright.onnx", _brightness_model())


def test_map_shape_range_and_contrast(brightness):
    model = OnnxSaliency(brightness, OnnxParams(input_size=(24, 32)))
    img, disk = _disk_image()
    sal = model(img)
    assert sal.shape == img.shape[:2] and sal.dtype == np.float32
    assert sal.min() >= 0.0 and sal.max() <= 1.0
    assert sal.min() == pytest.approx(0.0, abs=0.05) and sal.max() == pytest.approx(1.0, abs=0.05)  # min-max
    assert sal[disk].mean() > 0.8 and sal[~disk].mean() < 0.3
    assert model.dynamic_batch


def test_matches_hand_preprocessing(brightness):
    """Same input size as the image: output = minmax(sigmoid(mean_c((x/255 - mean) / std)))."""
    img, _ = _disk_image(16, 20)
    p = OnnxParams(input_size=(16, 20), minmax=False)
    x = (img.astype(np.float32) / 255 - np.array(p.mean, np.float32)) / np.array(p.std, np.float32)
    expected = 1 / (1 + np.exp(-x.mean(2)))
    np.testing.assert_allclose(OnnxSaliency(brightness, p)(img), expected, atol=1e-5)
    bgr = OnnxParams(input_size=(16, 20), minmax=False, channel_order="BGR", mean=p.mean[::-1], std=p.std[::-1])
    np.testing.assert_allclose(OnnxSaliency(brightness, bgr)(img), expected, atol=1e-5)


def test_batch_equals_loop_dynamic_and_fixed(tmp_path, brightness):
    imgs = [_disk_image(40, 52, seed)[0] for seed in range(3)] + [_disk_image(30, 30, 9)[0]]
    params = OnnxParams(input_size=(24, 32))
    dyn = OnnxSaliency(brightness, params)
    fixed = OnnxSaliency(_write(tmp_path, "fixed.onnx", _brightness_model(1, 24, 32)), params)
    assert dyn.dynamic_batch and not fixed.dynamic_batch
    loop = [dyn(im) for im in imgs]
    for out in (dyn.batch(imgs), fixed.batch(imgs)):
        assert len(out) == len(imgs)
        for a, b in zip(out, loop):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert dyn.batch([]) == []


def test_pickle_reopens_session(brightness):
    model = OnnxSaliency(brightness, OnnxParams(input_size=(24, 32)))
    img, _ = _disk_image()
    clone = pickle.loads(pickle.dumps(model))
    assert clone._session is None
    np.testing.assert_array_equal(clone(img), model(img))
    assert clone.sha256 == hashlib.sha256(brightness.read_bytes()).hexdigest() == model.sha256


def test_fixed_size_mismatch_names_expected_size(tmp_path):
    path = _write(tmp_path, "fixed.onnx", _brightness_model(1, 24, 32))
    with pytest.raises(SaliencyModelError, match=r"fixed\.onnx: the model takes 24x32 images.*320x320"):
        OnnxSaliency(path)


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "gray.onnx",
            _model([_node("Identity", ["x"], ["y"])], [_value_info("x", ["N", 1, 8, 8])], [_value_info("y", ["N", 1, 8, 8])]),
            r"gray\.onnx: found input \[x tensor\(float\) \['N', 1, 8, 8\]\]; expected exactly one float input of shape \(N, 3, H, W\)",
        ),
        (
            "two_inputs.onnx",
            _model(
                [_node("Add", ["a", "b"], ["y"])],
                [_value_info("a", ["N", 3, 8, 8]), _value_info("b", ["N", 3, 8, 8])],
                [_value_info("y", ["N", 3, 8, 8])],
            ),
            r"two_inputs\.onnx: found inputs \[a .*, b .*\]; expected exactly one float input",
        ),
        (
            "int_input.onnx",
            _model([_node("Identity", ["x"], ["y"])], [_value_info("x", ["N", 3, 8, 8], INT64)], [_value_info("y", ["N", 3, 8, 8], INT64)]),
            r"int_input\.onnx: found input \[x tensor\(int64\)",
        ),
        (
            "rgb_out.onnx",
            _model([_node("Identity", ["x"], ["y"])], [_value_info("x", ["N", 3, 8, 8])], [_value_info("y", ["N", 3, 8, 8])]),
            r"rgb_out\.onnx: output 0 is y tensor\(float\) \['N', 3, 8, 8\]; expected a float saliency map of shape \(N, 1, h, w\)",
        ),
        (
            "flat_out.onnx",
            _model(
                [_node("ReduceMean", ["x"], ["y"], (_ints_attr("axes", [1, 2, 3]), _int_attr("keepdims", 0)))],
                [_value_info("x", ["N", 3, 8, 8])],
                [_value_info("y", ["N"])],
            ),
            r"flat_out\.onnx: output 0 is y tensor\(float\) \['N'\]",
        ),
    ],
)
def test_not_a_saliency_model(tmp_path, name, data, message):
    path = _write(tmp_path, name, data)
    with pytest.raises(SaliencyModelError, match=message):
        OnnxSaliency(path, OnnxParams(input_size=8))


def test_output_index_out_of_range(brightness):
    with pytest.raises(SaliencyModelError, match=r"bright\.onnx: output_index 2 does not exist; found outputs \[y "):
        OnnxSaliency(brightness, OnnxParams(output_index=2))


def test_random_bytes_and_missing_file(tmp_path):
    junk = _write(tmp_path, "junk.onnx", np.random.default_rng(0).bytes(256))
    with pytest.raises(SaliencyModelError, match=r"junk\.onnx: not a loadable ONNX model"):
        OnnxSaliency(junk)
    with pytest.raises(SaliencyModelError, match=r"absent\.onnx: saliency model file not found"):
        OnnxSaliency(tmp_path / "absent.onnx")
    assert issubclass(SaliencyModelError, ValueError)


def test_bad_image_and_params(brightness):
    model = OnnxSaliency(brightness, OnnxParams(input_size=8))
    with pytest.raises(ValueError, match=r"uint8 RGB image.*float32 \(8, 8, 3\)"):
        model(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channel_order"):
        OnnxParams(channel_order="RGBA")


@pytest.mark.realdata
def test_u2netp_bright_disk(u2netp_path):
    model = OnnxSaliency(u2netp_path, threads=1)
    assert not model.dynamic_batch  # the shipped export has a fixed batch of 1
    img, disk = _disk_image(240, 320)
    sal = model(img)
    assert sal.shape == (240, 320) and sal.dtype == np.float32
    assert sal[disk].mean() > 0.7
    assert sal[~disk].mean() < 0.2
