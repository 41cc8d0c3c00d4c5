"""Backbones and the MaskContrast network: shapes, output stride, torchvision names, freezing."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from stages.network.backbones import BACKBONES, build_backbone, dilate_resnet_layer, frozen_modules
from stages.network.model import AtrousConv2d, MaskContrastModel, freeze_early


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _conv_config(module: nn.Module) -> dict[str, tuple]:
    return {
        name: (m.stride, m.dilation, m.padding)
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.mark.parametrize(
    "backbone", ["resnet18", "mobilenet_v2", pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_forward_shapes_at_output_stride_8(backbone: str, image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MaskContrastModel(backbone=backbone, output_stride=8, embedding_dim=32).eval()
    with torch.no_grad():
        embedding, saliency, trunk = model(image, return_features=True)
        assert torch.equal(model.features(image), trunk)
    assert embedding.shape == (2, 32, 64, 64)
    assert saliency.shape == (2, 1, 64, 64)
    assert trunk.shape == (2, 256, 8, 8)  # measured output stride 8


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_output_stride(backbone: str, output_stride: int) -> None:
    module, channels = build_backbone(backbone, output_stride)
    with torch.no_grad():
        out = module.eval()(torch.zeros(1, 3, 32, 48))
    assert out.shape == (1, channels, 32 // output_stride, 48 // output_stride)


def test_decoder_rates_dropout_and_heads() -> None:
    model = MaskContrastModel(backbone="mobilenet_v2", output_stride=16, embedding_dim=8, dropout=0.1)
    aspp = model.decoder[0]
    assert [aspp.convs[i][0].dilation for i in (1, 2, 3)] == [(6, 6), (12, 12), (18, 18)]
    assert aspp.project[3].p == 0.1
    assert model.head.out_channels == 8 and model.head.bias is not None
    assert model.head.kernel_size == (1, 1)
    assert model.classification_head.bias is None and model.classification_head.out_channels == 1
    reference = MaskContrastModel("resnet18")
    assert [reference.decoder[0].convs[i][0].dilation for i in (1, 2, 3)] == [(12, 12), (24, 24), (36, 36)]
    assert reference.decoder[0].project[3].p == 0.5
    assert MaskContrastModel("resnet18", aspp_rates=(1, 2, 3)).decoder[0].convs[3][0].dilation == (3, 3)


@pytest.mark.parametrize("shape", [(5, 7), (12, 12), (13, 30), (30, 13), (40, 41)])
def test_atrous_conv_skipping_padding_taps_is_exact(shape: tuple[int, int]) -> None:
    # dilation 12: rows and/or columns of the kernel read only padding on grids up to 12 wide
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=12, dilation=12, bias=True)
    fast = AtrousConv2d.replacing(conv)
    assert fast.weight is conv.weight and set(fast.state_dict()) == set(conv.state_dict())
    x = torch.randn(2, 6, *shape, dtype=torch.float64, requires_grad=True)
    conv, fast = conv.double(), fast.double()
    ref, out = conv(x), fast(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    grads = torch.autograd.grad(out, (x, fast.weight, fast.bias), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="stride-1 'same' 3x3"):
        AtrousConv2d.replacing(nn.Conv2d(6, 4, 3, padding=1, dilation=2))


def test_resnet18_dilation_keeps_torchvision_names_and_shapes() -> None:
    module, _ = build_backbone("resnet18", 8)
    reference = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()}
    ours = {k: v.shape for k, v in module.state_dict().items()}
    assert ours == {k: s for k, s in reference.items() if not k.startswith("fc.")}
    assert module.layer4[1].conv1.dilation == (4, 4)
    assert module.layer4[0].conv1.stride == (1, 1) and module.layer4[0].conv1.dilation == (2, 2)
    assert module.layer4[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_manual_dilation_equals_torchvision_on_bottlenecks(output_stride: int) -> None:
    flags = [False, output_stride == 8, True]
    reference = torchvision.models.resnet50(replace_stride_with_dilation=flags)
    manual = torchvision.models.resnet50()
    if output_stride == 8:
        dilate_resnet_layer(manual.layer3, 2)
        dilate_resnet_layer(manual.layer4, 4)
    else:
        dilate_resnet_layer(manual.layer4, 2)
    assert _conv_config(manual) == _conv_config(reference)


def test_mobilenet_keeps_torchvision_names() -> None:
    module, channels = build_backbone("mobilenet_v2", 8)
    reference = torchvision.models.mobilenet_v2().state_dict()
    assert list(module.state_dict()) == [k for k in reference if not k.startswith("classifier.")]
    assert channels == 1280
    depthwise = module.features[15].conv[1][0]
    assert depthwise.stride == (1, 1) and depthwise.dilation == (4, 4)


def test_unknown_backbone_and_stride_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="output_stride must be one of"):
        build_backbone("resnet18", 4)
    with pytest.raises(ValueError, match="freeze point 'layer9' unknown"):
        frozen_modules("resnet18", "layer9")


def test_frozen_module_sets() -> None:
    assert frozen_modules("resnet50", "layer2") == (
        "backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2"
    )
    assert frozen_modules("mobilenet_v2", "layer2") == tuple(f"backbone.features.{i}" for i in range(7))


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_freeze_early_survives_train_and_an_optimizer_step(backbone: str, image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MaskContrastModel(backbone=backbone)
    names = freeze_early(model, "layer2")
    frozen = [model.get_submodule(n) for n in names]
    model.train()
    assert all(not m.training for f in frozen for m in f.modules())
    assert model.decoder.training and model.backbone.training

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    embedding, saliency = model(image[:, :, :32, :32])
    (embedding.square().mean() + saliency.mean()).backward()
    optimizer.step()
    after = model.state_dict()

    prefixes = tuple(n + "." for n in names)
    frozen_keys = [k for k in before if k.startswith(prefixes)]
    assert any(k.endswith("running_mean") for k in frozen_keys)
    for key in frozen_keys:  # weights and BN statistics alike
        assert torch.equal(before[key], after[key]), key
    later = [k for k in before if k.startswith("backbone.") and not k.startswith(prefixes)]
    changed = [k for k in later if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    assert all(not p.requires_grad for f in frozen for p in f.parameters())
