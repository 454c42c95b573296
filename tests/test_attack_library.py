"""fastablate.attacks as a library: functions with keyword options, objects in torchattacks'
shape, one record per attack, the model left as it came, every bad input refused at the door."""
import importlib.util

import pytest
import torch
from torch import nn

from fastablate import attacks
from fastablate.engines.core.attack_options import AttackOptions, applies_to
from fastablate.errors import FastablateError


class Plain(nn.Module):
    """A user's own module: a trained network behind its own input normalization."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def data(trained_resnet8):
    """(a plain nn.Module taking [0, 1] images, 12 images it classifies correctly, their labels)."""
    from fastablate.data import batches, build_dataset
    from fastablate.models import load_model

    trained = load_model(trained_resnet8)
    net = Plain(trained.net, trained.mean.flatten().tolist(), trained.std.flatten().tolist()).eval()
    x, y = next(batches(build_dataset("synthetic", None, "test", limit=60), 60))
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    return net, x[ok][:12], y[ok][:12]


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()], \
        [p.requires_grad for p in net.parameters()]


@pytest.mark.parametrize("name", list(attacks.ATTACKS))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_each_attack_object_leaves_the_model_as_it_came(name, mode, data):
    net, x, y = data
    net.train(mode != "eval")  # as a user's model may be, mid-training
    if mode == "mixed":
        net.net.bn1.eval()  # a frozen BatchNorm in a training model
    net.net.conv1.weight.requires_grad_(False)  # and partly frozen
    before = _state(net)
    record = attacks.ATTACKS[name]
    options = {"k": 5} if record.sparse else {}
    small = {"steps": 3, "queries": 20}
    options.update({n: v for n, v in small.items() if n in record.options})
    atk = record.cls(net, seed=0, **options)
    x_adv = atk(x, y)
    after = _state(net)
    assert torch.equal(torch.tensor(after[1]), torch.tensor(before[1])) and after[2] == before[2]
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())  # BatchNorm statistics too
    assert all(p.grad is None for p in net.parameters())
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    if record.sparse:
        assert ((x_adv != x).any(1).flatten(1).sum(1) <= 5).all()
    net.net.conv1.weight.requires_grad_(True)


def test_functions_restore_modes_and_report_what_they_did(data):
    net, x, y = data
    net.train()
    out = attacks.sparse(net.eval(), x, y, k=4, steps=5, generator=torch.Generator().manual_seed(1))
    net.train()
    out2 = attacks.sparse(net, x, y, k=4, steps=5, generator=torch.Generator().manual_seed(1))
    assert net.training and all(m.training for m in net.modules())  # eval for the call only
    assert torch.equal(out.x_adv, out2.x_adv)  # it ran in eval mode both times
    with torch.no_grad():
        fooled = net.eval()(out.x_adv).argmax(1) != y
    net.train()
    assert torch.equal(out.success, fooled) and torch.equal(out.l0, (out.x_adv != x).any(1).flatten(1).sum(1))
    assert torch.allclose(out.l2, (out.x_adv - x).flatten(1).norm(dim=1))
    assert (out.l0 <= 4).all() and out.fooled_by is None


def test_sparse_rs_object_on_a_plain_module(data):
    """The Done-when: SparseRS(model, k=5, queries=300)(x, y) on a plain nn.Module."""
    net, x, y = data
    x_adv = attacks.SparseRS(net.eval(), k=5, queries=300, seed=0)(x, y)
    again = attacks.SparseRS(net, k=5, queries=300, seed=0)(x, y)
    assert torch.equal(x_adv, again)  # a seed gives the same search
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
    assert fooled.any() and torch.equal(x_adv[~fooled], x[~fooled])


def test_normalization_and_targeted_modes(data):
    net, x, y = data
    atk = attacks.PGD(net.net, eps=0.1, steps=5, seed=3)  # the network alone takes normalized images
    atk.set_normalization_used(net.mean.flatten(), net.std.flatten())
    ref = attacks.PGD(net, eps=0.1, steps=5, seed=3)
    torch.testing.assert_close(atk(x, y), ref(x, y))
    assert not net.net.training
    targets = (y + 1) % 10
    atk = attacks.PGD(net, eps=0.3, steps=20, seed=0)
    atk.set_mode_targeted_by_label()
    out = atk.run(x, targets)
    with torch.no_grad():
        pred = net(out.x_adv).argmax(1)
    assert out.success.any() and (pred[out.success] == targets[out.success]).all()
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
    assert torch.equal(atk.run(x, y).x_adv, out.x_adv)  # the same targets, the same seed
    atk.set_mode_default()
    assert not torch.equal(atk(x, y), out.x_adv)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("torchattacks"), reason="torchattacks is not installed")
def test_in_torchattacks_loop(data):
    """The loop a torchattacks user writes, with one of torchattacks' attacks and ours, on the same
    images: the same shapes and ranges, and ours within its L0 budget."""
    import torchattacks

    net, x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    for atk in (torchattacks.PGD(net.eval(), eps=8 / 255, alpha=2 / 255, steps=5),
                attacks.SparseRS(net, k=5, queries=100, seed=0)):
        for images, labels in loader:
            adv = atk(images, labels)
            assert adv.shape == images.shape and adv.dtype == images.dtype and adv.device == images.device
            assert adv.min() >= 0 and adv.max() <= 1
            if isinstance(atk, attacks.Attack):
                assert ((adv != images).any(1).flatten(1).sum(1) <= 5).all()
            else:
                assert (adv - images).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda net, x, y: attacks.sparse(net, x * 2, y, k=2), "2]: attacks work on images in [0, 1]"),
    (lambda net, x, y: attacks.sparse(net, x, y, k=2000), "sparse attack: k = 2000 pixels is not in 1..1024"),
    (lambda net, x, y: attacks.sparse_rs(net, x, y, k=0), "k = 0 pixels is not in 1..1024"),
    (lambda net, x, y: attacks.sparse_rs(net, x, y, k=2, queries=0), "needs at least 1 per image"),
    (lambda net, x, y: attacks.pgd(net, x, y, eps=-1.0), "pgd attack: eps = -1.0; it must be positive"),
    (lambda net, x, y: attacks.fgsm(net, x, y.float()), "integer labels"),
    (lambda net, x, y: attacks.ensemble(net, x, y, attacks=[]), "give at least one attack"),
    (lambda net, x, y: attacks.SparseRS(net, k=5, steps=3), "SparseRS: unknown option 'steps'; it takes k, queries"),
    (lambda net, x, y: attacks.noise(net, x, y, target=y), "target class"),
])
def test_bad_input_is_refused_where_it_enters(call, message, data):
    net, x, y = data
    with pytest.raises(FastablateError) as e:
        call(net.eval(), x, y)
    assert message in str(e.value), str(e.value)


def test_the_options_are_derived_from_the_records():
    """What each option applies to and each default come from the attacks' signatures."""
    assert applies_to("queries") == ("sparse", "sparse-rs", "sparse-ensemble")
    assert applies_to("eps") == ("fgsm", "pgd", "pgd-l2") and applies_to("pixels") == applies_to("k")
    assert AttackOptions(attack="pgd-l2").resolved(32).eps == 0.5 and AttackOptions(attack="pgd").resolved(32).step \
        == pytest.approx(8 / 255 / 4)
    assert AttackOptions(attack="sparse-ensemble").resolved(32).options() == {
        "k": 5, "steps": 30, "restarts": 1, "step": 1.0, "queries": 1000}
    with pytest.raises(FastablateError, match="--steps does not apply to --attack sparse-rs"):
        AttackOptions(attack="sparse-rs", steps=3)
    assert {r.cls.function for r in attacks.ATTACKS.values()} == {r.function for r in attacks.ATTACKS.values()}
