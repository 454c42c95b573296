"""A lesion study of a ResNet written by hand, from Python, in the way a notebook runs it.

The model is the user's own class, trained by the user's own loop; fastablate learns its
structure from two one-line adapters and runs every study on it, writing nothing to disk
until asked. Run it with ``python docs/examples/lesion_own_resnet.py`` (about 20 s on 2 CPU
cores); the tests execute it.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fastablate as fa
from fastablate.data import build_dataset
from fastablate.units import BlockParts, ModelParts, register_adapter, register_model_adapter


class Block(nn.Module):
    """out = relu(x + conv-bn-relu-conv-bn(x)): a residual block with an identity shortcut."""

    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(width))

    def forward(self, x):
        return F.relu(x + self.branch(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# How the unit view sees the two classes: a block is relu(shortcut(x) + residual(x)) with an
# identity shortcut; the model is stem -> blocks -> head.
register_adapter(Block, lambda b: BlockParts(residual=b.branch, shortcut=nn.Identity(), relu=True))
register_model_adapter(TinyResNet, lambda m: ModelParts(m.stem, [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)],
                                                        m.head))

# The user's data and training loop (any would do): 10 classes of synthetic 32x32 patterns.
torch.manual_seed(0)
train, test = (build_dataset("synthetic", split=s) for s in ("train", "test"))
x_train, y_train = train.floats(torch.arange(400)), train.labels[:400]
x_test, y_test = test.floats(torch.arange(200)), test.labels[:200]
model = TinyResNet()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for epoch in range(4):
    model.train()
    for i in torch.randperm(len(x_train)).split(50):
        opt.zero_grad()
        F.cross_entropy(model(x_train[i]), y_train[i]).backward()
        opt.step()
model.eval()

loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=64)

# One call per study; nothing is written.
clean = fa.evaluate(model, loader)
lesion = fa.lesion(model, loader, plans=["all-single", "k-random"], k=[1, 2, 3], samples=4)
noise = fa.noise(model, (x_test, y_test), layers=[1, 2], sigma=[0.5, 1.0], trials=3, relative=True)
attack = fa.attack(model, (x_test[:40], y_test[:40]), attack="sparse", pixels=0.005, queries=50)
paths = fa.paths(model, (x_test[:16], y_test[:16]), samples=5)
features = fa.features(model, x_test[:2], layers="all")

print(f"clean accuracy {clean.accuracy:.3f}")
print(lesion.report())
singles = [v["accuracy"] for v in lesion.variants if v["plan"] == "all-single"]
print(f"one block deleted: mean accuracy {sum(singles) / len(singles):.3f} (intact {lesion.intact['accuracy']:.3f})")
print(noise.report())
print(attack.report())
print(f"effective paths: {paths.effective['lo']}-{paths.effective['hi']} blocks long")
figures = lesion.plot()  # matplotlib Figures: shown inline in Jupyter
print(f"{len(figures)} lesion figures; features of {len(features.layers)} layers")

# Asked for: the run directory the CLI would write.
# lesion.save("runs/tiny-resnet-lesion")
