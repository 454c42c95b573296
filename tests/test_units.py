"""The unit view: stem -> units -> head equals model(x); lesions keep the shortcut."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn
from torch import nn

from fastablate.errors import FastablateError
from fastablate.models import MODELS, build_model
from fastablate.units import BlockParts, register_adapter, units

pytestmark = pytest.mark.numerics  # rerun by .ci/run under another CPU code path

# One VGG of each kind in the default tier: the others are the same adapter, at other depths.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("vgg") and n not in
                                  ("vgg11", "vgg19_bn") else n for n in MODELS])
def test_unit_view_reproduces_forward(name):
    model = randomize_bn(build_model(name))
    x = torch.rand(2, 3, 32, 32)
    view = units(model)
    with torch.no_grad():
        assert torch.equal(view.forward(x), model(x))
        # Each unit also equals post(shortcut + residual) from its parts.
        h = view.stem(x)
        for u in view.units:
            out = u(h)
            p = u.parts
            by_parts = p.residual(h) if p.shortcut is None else p.apply_post(p.shortcut(h) + p.residual(h))
            assert torch.equal(out, by_parts), u.name
            h = out


def test_kinds_and_shapes():
    view = units(build_model("resnet20"))
    assert len(view.units) == 9 and view.units[0].name == "layer1.0"
    kinds = {u.name: u.kind for u in view.units}
    assert kinds["layer1.0"] == "identity-skip" and kinds["layer2.0"] == "projection-skip"
    assert view["layer2.0"].in_shape == (16, 32, 32) and view["layer2.0"].out_shape == (32, 16, 16)
    assert all(u.lesionable for u in view.units)
    assert units(build_model("resnet18"))["layer2.0"].kind == "projection-skip"
    plain = units(build_model("plain20"))
    assert {u.kind for u in plain.units} == {"plain"}
    assert not plain["layer2.0"].lesionable
    assert plain["layer2.0"].reason == "plain unit changes shape (16, 32, 32) -> (32, 16, 16)"
    assert plain["layer2.1"].lesionable


def test_preactivation_units_keep_exactly_their_shortcut():
    """x + residual(x) with nothing after the add: deleting an identity unit is the identity; a
    unit that changes shape keeps its projection of the pre-activated input."""
    for name in ("preresnet20", "preresnet164"):
        view = units(randomize_bn(build_model(name)))
        assert all(u.parts.post_kind == "identity" and u.lesionable for u in view.units)
        h = torch.randn(2, *view["layer1.1"].in_shape)
        with torch.no_grad():
            assert torch.equal(view["layer1.1"].lesioned(h), h) and view["layer1.1"].kind == "identity-skip"
            u = view["layer2.0"]
            h = torch.randn(2, *u.in_shape)
            assert u.kind == "projection-skip"
            assert torch.equal(u.lesioned(h), u.module.proj(F.relu(u.module.bn1(h))))
    plain = units(build_model("preplain20"))
    assert {u.kind for u in plain.units} == {"plain"} and not plain["layer2.0"].lesionable


@pytest.mark.parametrize("name, unit", [("resnet20", "layer1.1"), ("resnet20", "layer3.0"),
                                        ("resnet18", "layer2.0"), ("resnet50", "layer1.0")])
def test_lesion_keeps_shortcut(name, unit):
    model = randomize_bn(build_model(name))
    view = units(model)
    u = view[unit]
    h = torch.randn(2, *u.in_shape)
    with torch.no_grad():
        expected = F.relu(u.parts.shortcut(h))
        assert torch.equal(u.lesioned(h), expected)
    if u.kind == "identity-skip":
        assert torch.equal(u.lesioned(h), F.relu(h))


def test_option_a_shortcut_lesion():
    u = units(build_model("resnet20"))["layer2.0"]
    h = torch.randn(1, 16, 32, 32)
    out = u.lesioned(h)
    assert out.shape == (1, 32, 16, 16)
    assert torch.equal(out[:, 8:24], F.relu(h[:, :, ::2, ::2])) and not out[:, :8].any() and not out[:, 24:].any()


def test_lesioned_forward_differs_and_plain_identity():
    model = randomize_bn(build_model("plain20"))
    view = units(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = view.stem(x)
        assert torch.equal(view["layer1.0"].lesioned(h), h)
        assert not torch.equal(view.forward(x, ["layer1.1"]), model(x))
    with pytest.raises(FastablateError, match="unit layer2.0 is not lesionable: plain unit changes shape"):
        view.forward(x, ["layer2.0"])
    with pytest.raises(FastablateError, match="unknown unit 'layer9.0'; units are: layer1.0"):
        view.forward(x, ["layer9.0"])


def test_vgg_units():
    view = units(build_model("vgg11_bn"))
    assert len(view.units) == 8  # one per conv layer
    assert view.units[0].name == "features.0" and not view.units[0].lesionable
    # cfg A: 64 M 128 M 256 256 M 512 512 M 512 512 M; a conv followed by a pool changes shape.
    assert [u.name for u in view.lesionable()] == ["features.22"]
    assert len(units(build_model("vgg16")).lesionable()) == 4


def test_user_torchvision_instances():
    for net in (torchvision.models.resnet18(num_classes=4), torchvision.models.vgg11(num_classes=4)):
        net = randomize_bn(net)
        x = torch.rand(1, 3, 64, 64)
        view = units(net, (3, 64, 64))
        with torch.no_grad():
            assert torch.equal(view.forward(x), net(x))


class PreActBlock(nn.Module):
    """A pre-activation block: out = x + conv(relu(bn(x))), no post-activation."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def branch(self, x):
        return self.conv(F.relu(self.bn(x)))

    def forward(self, x):
        return x + self.branch(x)


def test_register_adapter_for_new_block():
    net = torchvision.models.resnet18(num_classes=3)
    net.layer1[1] = PreActBlock(64)
    with pytest.raises(FastablateError, match="no unit adapter for block type PreActBlock at layer1.1"):
        units(net)
    register_adapter(PreActBlock, lambda b: BlockParts(b.branch, nn.Identity()))
    net.eval()
    view = units(net)
    u = view["layer1.1"]
    assert u.kind == "identity-skip"
    h = torch.randn(1, 64, 8, 8)
    assert torch.equal(u.lesioned(h), h)  # post is the identity
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view.forward(x), net(x))


def test_model_without_adapter_or_residual_units():
    with pytest.raises(FastablateError, match="no residual units found in Linear: .* the modules seen: none"):
        units(nn.Linear(3, 3))


def test_post_kinds():
    assert units(build_model("resnet20")).units[0].parts.post_kind == "relu"
    assert units(build_model("plain20")).units[0].parts.post_kind == "identity"
    parts = BlockParts(nn.Identity(), nn.Identity(), post=torch.tanh)
    assert parts.post_kind == "custom" and torch.equal(parts.apply_post(torch.ones(2)), torch.tanh(torch.ones(2)))
