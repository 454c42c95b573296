"""``fastablate train`` against the usual plain PyTorch loop (torchvision transforms on each
image in a DataLoader, SGD, then a test pass), on the same CIFAR-10 JPEG images, model,
batch size, threads and epochs; and the floor both share: the model's forward and backward
passes (and the optimizer step) on the same number of batches of random tensors, with the
test set's forward passes.

Each side: one epoch over N training images plus one pass over N test images, from the JPEG
files (listing, decoding, augmenting, training, evaluating: everything a user waits for).
The share of time outside the model is 1 - floor / total.

Run (an ImageFolder copy of CIFAR-10 with train/ and test/, e.g. ../shared/data extracted):

    FASTABLATE_BENCH_CIFAR=~/data/cifar10-jpg python -m pytest bench/test_train_speed.py \\
        --benchmark-only --benchmark-columns=median,rounds -s

``FASTABLATE_BENCH_TRAIN_IMAGES`` sets N (default 10000; ResNet-18 uses N / 5).
"""
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.data import balanced_subset, build_dataset
from fastablate.models import build_model

ROOT = os.environ.get("FASTABLATE_BENCH_CIFAR")
N = int(os.environ.get("FASTABLATE_BENCH_TRAIN_IMAGES", "10000"))
BATCH = 128
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MODELS = {"resnet20": N, "resnet18": N // 5}
pytestmark = pytest.mark.skipif(not ROOT, reason="set FASTABLATE_BENCH_CIFAR to an ImageFolder CIFAR-10")
SHARE: dict[str, dict[str, float]] = {}


def _subset(split: str, n: int) -> list[int]:
    """The images --limit n picks (a seeded class-balanced subset), for the plain loop too."""
    ds = build_dataset("imagefolder", ROOT, split)
    return balanced_subset(ds.labels, n, 0).tolist()


def plain_loop(model_name: str, n: int) -> float:
    """The usual recipe: ImageFolder + per-image transforms in a DataLoader, SGD with a
    cosine schedule, then a test pass in no_grad; returns the test accuracy."""
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(0)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train = torch.utils.data.Subset(torchvision.datasets.ImageFolder(Path(ROOT) / "train", train_tf),
                                    _subset("train", n))
    test = torch.utils.data.Subset(torchvision.datasets.ImageFolder(Path(ROOT) / "test", test_tf), _subset("test", n))
    net = build_model(model_name, 10).net
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(loader))
    net.train()
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256):
            correct += (net(x).argmax(1) == y).sum().item()
    return correct / len(test)


def fastablate_train(model_name: str, n: int, out: Path) -> float:
    r = CliRunner().invoke(cli, ["train", "--model", model_name, "--dataset", "imagefolder", "--data-dir", ROOT,
                                 "--limit", str(n), "--epochs", "1", "--batch-size", str(BATCH), "--device", "cpu",
                                 "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    import json

    return json.loads((out / "results.json").read_text())["accuracy"]


def floor(model_name: str, n: int) -> None:
    """The model's own work: n / BATCH training steps (forward, backward, SGD) on random
    batches, channels-last, and the test set's forward passes at the evaluation batch."""
    torch.manual_seed(0)
    net = build_model(model_name, 10).net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    net.train()
    for _ in range(-(-n // BATCH)):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt = torch.rand(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(-(-n // 256)):
            net(xt)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("side", ["plain-pytorch", "fastablate", "floor"])
def test_one_epoch_and_a_test_pass(benchmark, model_name, side, tmp_path):
    n = MODELS[model_name]
    benchmark.group = f"train 1 epoch + test: {model_name}, {n} + {n} CIFAR-10 JPEGs, batch {BATCH}"
    fn = {"plain-pytorch": lambda: plain_loop(model_name, n),
          "fastablate": lambda: fastablate_train(model_name, n, tmp_path / "run"),
          "floor": lambda: floor(model_name, n)}[side]
    start = time.perf_counter()
    benchmark.pedantic(fn, rounds=1, iterations=1)
    SHARE.setdefault(model_name, {})[side] = time.perf_counter() - start
    times = SHARE[model_name]
    if len(times) == 3:
        print(f"\n{model_name}: fastablate / plain = {times['fastablate'] / times['plain-pytorch']:.2f}; outside the "
              f"model: fastablate {1 - times['floor'] / times['fastablate']:.0%}, plain "
              f"{1 - times['floor'] / times['plain-pytorch']:.0%}")
