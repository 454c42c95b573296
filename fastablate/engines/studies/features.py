"""Feature maps: what a layer responds to, where in the image, for one model or several, for
clean and adversarial images.

- Maps: a layer's activation (C, H, W) of an image becomes one (H, W) map, the mean over
  channels (``mean``) or Grad-CAM for the predicted class (``gradcam``: Selvaraju et al.
  2017, the ReLU of the channels weighted by the spatial mean of the class score's gradient),
  upsampled to the image and drawn over it (plots/heatmaps-<image>.png: rows = layers,
  columns = models, and clean | adversarial | difference with ``--examples``).
- Channels: every channel of one image at a layer (plots/channels-<layer>.png), dead ones
  (zero on every evaluated image) marked.
- Statistics per layer and model over ``--stats-images`` images: mean, std, fraction of dead
  channels, fraction of zero activations; with ``--examples``, the mean change of each
  layer's map from the clean to the adversarial image.

Layers are module names of the net (``fastablate models --layers MODEL`` lists them with their
output shapes): conv layers, units (``layer1.0``), stages (``layer3``) and linear layers
(statistics only: they have no map).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.data import ImageSet, balanced_subset, read_saved
from fastablate.engines.core.distributed import all_max, all_sum
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, check_finite, hash_seed, model_name, my_batches, slug, table
from fastablate.engines.core.spec import Choice, Float, Int, List, Spec, Text, applies, one_of, option
from fastablate.engines.studies.noise_hooks import LAYER_KINDS, LAYER_WORDS, NoiseInjector, conv_layers
from fastablate.errors import FastablateError
from fastablate.modes import eval_mode
from fastablate.units.layers import layer_shapes, token_grid


@dataclass(frozen=True)
class FeaturesSpec(Spec):
    images: Optional[int] = option(None, "Images to draw maps of: the first N of a seeded class-balanced subset "
                                         "[default: 4].", type=Int(min=1, max=64))
    index: Optional[tuple[int, ...]] = option(None, "Images to draw maps of, by index in the split (instead of "
                                                    "--images).", type=List(Int(min=0)))
    layers: Optional[tuple[str, ...]] = option(None, "Layers: all (every conv and linear layer) or names, e.g. "
                                                     "conv1,layer1.0,layer3 [default: the stem conv and each "
                                                     "stage].", type=List(Text()))
    method: str = option("mean", "Map of a layer: mean over channels, or Grad-CAM for the predicted class.",
                         type=Choice("mean", "gradcam"))
    examples: Optional[str] = option(None, "adversarial.pt of attack --save-examples: clean and adversarial "
                                           "images side by side.", type=Text("FILE"), role="input")
    stats_images: int = option(512, "Images the per-layer statistics are taken over.", type=Int(min=1))
    noise_sigma: Optional[float] = option(None, "Noise view: maps under Gaussian noise of this std on the outputs "
                                                "of --noise-layers N random or --noise-at NAMES conv layers, beside "
                                                "the clean ones.", type=Float(0, 1e6, min_open=True))
    noise_layers: Optional[int] = option(None, "Noise view: this many conv layers, chosen at random (seeded).",
                                         type=Int(min=1))
    noise_at: Optional[tuple[str, ...]] = option(None, "Noise view: these conv layers, e.g. conv1,layer3.2.conv2.",
                                                 type=List(Text()))
    noise_relative: bool = option(False, "Noise view: --noise-sigma times each layer's activation std.")
    noise_on: str = option("conv", "Noise view: the layers noise goes on: conv, linear (a transformer's) or all.",
                           type=Choice(*LAYER_KINDS))
    compare_layers: tuple = option((), "The layers of a --compare model paired one to one with --layers "
                                       "(repeatable: one list per --compare model, in order), e.g. "
                                       "features.0,features.10 beside conv1,layer1 [default: each model's own, "
                                       "paired by position].", type=List(Text()), multiple=True)

    def validate(self) -> None:
        one_of(self, ("images", "index"), "choose the images")
        one_of(self, ("noise_layers", "noise_at"), "choose the perturbed layers")
        one_of(self, ("examples", "noise_sigma"), "choose what the clean maps are compared with")
        if self.noise_sigma and not (self.noise_layers or self.noise_at):
            raise FastablateError("--noise-sigma needs the layers to perturb: --noise-layers N or --noise-at NAME,..")
        applies(self, ("noise_layers", "noise_at", "noise_relative", "noise_on"), self.noise_sigma is not None,
                "the noise view (--noise-sigma), which is not given")
        if self.examples and self.index is not None:
            raise FastablateError("--index picks images of the split; with --examples the images are the "
                                  "examples' fooled ones: use --images")


def default_layers(model: nn.Module, shapes: dict[str, tuple]) -> list[str]:
    """The first conv layer, then the output of each stage: the top-level modules holding
    units (layer1, layer2, ...); for a VGG the last conv before each change of resolution;
    where one module holds every unit (a transformer's blocks), four blocks evenly spaced."""
    from fastablate.units import units

    net = getattr(model, "net", model)
    first_conv = next((n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    try:
        view = units(model).units
    except FastablateError:  # no units (a plain net without an adapter): the first conv alone
        view = []
    stages = []
    for i, u in enumerate(view):
        top = u.name.split(".")[0]
        if top == "features":  # a VGG: all units in one Sequential; a stage ends where a pool follows
            if i + 1 == len(view) or view[i + 1].in_shape != u.out_shape:
                stages.append(u.name)
        elif top not in stages:
            stages.append(top)
    if len(stages) == 1 and len(view) > 1:
        blocks = list(dict.fromkeys(".".join(u.name.split(".")[:2]) for u in view))
        stages = [blocks[round(k * len(blocks) / 4) - 1] for k in range(1, 5)] if len(blocks) >= 4 else blocks
    return [n for n in [first_conv] + [s for s in stages if s != first_conv] if n in shapes]


def resolve_layers(model: nn.Module, spec: FeaturesSpec, image_size: int, index: int = 0) -> list[str]:
    """The layers drawn of the run's model ``index`` (0: the first; i: the i-th --compare model,
    which takes its --compare-layers list when given)."""
    shapes = layer_shapes(model, image_size)
    net = getattr(model, "net", model)
    given = spec.compare_layers[index - 1] if index and spec.compare_layers else spec.layers
    flag = "--compare-layers" if index and spec.compare_layers else "--layers"
    if given is None:
        names = default_layers(model, shapes)
    elif list(given) == ["all"]:
        names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    else:
        names = list(given)
    valid = [n for n in shapes]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        shown = ", ".join(valid[:12]) + (" ..." if len(valid) > 12 else "")
        raise FastablateError(f"{flag}: {model_name(model)} has no layer {unknown[0]!r}; layers are: {shown} "
                              f"(fastablate models --layers {getattr(model, 'arch', '')} lists all)")
    return names


class Recorder:
    """Forward hooks keeping the outputs of the named layers of the last forward pass. A
    transformer's tokens are kept as their patch grid, and the layer passes on the same
    tokens rebuilt from it, so a gradient (Grad-CAM) reaches the grid."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        net = getattr(model, "net", model)
        self.out: dict[str, Tensor] = {}
        self.hooks = [net.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            grid = token_grid(output) if isinstance(output, Tensor) else None
            if grid is None:
                self.out[name] = output
                return None
            grid, prefix = grid
            self.out[name] = grid
            return torch.cat([output[:, :prefix], grid.flatten(2).transpose(1, 2)], 1)
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def layer_maps(model: nn.Module, names: Sequence[str], x: Tensor, method: str) -> tuple[dict[str, Tensor], Tensor]:
    """({layer: (N, H, W) map}, predictions) for images ``x``; layers without a spatial
    output get no map."""
    rec = Recorder(model, names)
    try:
        with eval_mode(model, frozen=True):
            x = x.detach().requires_grad_(method == "gradcam")
            with torch.set_grad_enabled(method == "gradcam"):
                logits = model(x)
                check_finite(model, logits, x)
                pred = logits.argmax(1)
                acts = {n: a for n, a in rec.out.items() if a.dim() == 4}
                if method == "gradcam":
                    score = logits.gather(1, pred[:, None]).sum()
                    grads = torch.autograd.grad(score, list(acts.values()))
                    maps = {n: F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()
                            for (n, a), g in zip(acts.items(), grads)}
                else:
                    maps = {n: a.mean(1).detach() for n, a in acts.items()}
    finally:
        rec.remove()
    return maps, pred.detach()


@dataclass
class FeaturesData:
    ds: ImageSet  # the split (statistics are taken over a subset of it)
    x: Tensor  # (N, C, H, W) images to draw, in [0, 1]
    y: Tensor
    index: list[int]  # their indices in the split, or among the examples
    x_adv: Tensor | None = None  # their adversarial versions (--examples)

    def __len__(self) -> int:
        return len(self.ds)


@dataclass
class LayerStats:
    """Running activation statistics of one layer (channels along dim 1)."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0
    zeros: int = 0
    alive: Tensor | None = None  # (C,) any nonzero activation seen (all False before any image)

    def add(self, a: Tensor) -> None:
        a = a.detach().double()
        self.total += a.sum().item()
        self.squares += (a * a).sum().item()
        self.count += a.numel()
        self.zeros += int((a == 0).sum())
        nz = (a != 0).transpose(0, 1).flatten(1).any(1).cpu()
        self.alive = nz if self.alive is None else self.alive | nz

    def reduce(self) -> None:
        """Sum the statistics of every process (under torchrun)."""
        t = all_sum(torch.tensor([self.total, self.squares, self.count, self.zeros], dtype=torch.float64))
        self.total, self.squares, self.count, self.zeros = t[0].item(), t[1].item(), int(t[2]), int(t[3])
        self.alive = all_max(self.alive.to(torch.int32)).bool()

    def summary(self) -> dict:
        mean = self.total / max(self.count, 1)
        return {"mean": mean, "std": math.sqrt(max(0.0, self.squares / self.count - mean * mean)),
                "channels": int(self.alive.numel()), "dead_channels": int((~self.alive).sum()),
                "dead_fraction": float((~self.alive).double().mean()), "zero_fraction": self.zeros / max(self.count, 1)}


@dataclass
class FeaturesResult:
    model: str
    layers: list[str]
    stats: dict[str, dict]  # layer -> statistics
    images: list[int]  # indices of the drawn images (in the split, or among the examples)
    seconds: float
    method: str
    adversarial_change: dict[str, float] = field(default_factory=dict)  # layer -> mean |map change|
    relative_change: dict[str, float] = field(default_factory=dict)  # layer -> ||change|| / ||clean map||
    drawn: dict = field(default_factory=dict, repr=False)  # what the plots need: images, maps, channels
    perturbed: str = "adversarial"  # what the changes compare the clean maps with: adversarial or noisy
    noise: dict = field(default_factory=dict)  # the noise view: perturbed conv layers and their sigma

    def to_dict(self) -> dict:
        out = {"model": self.model, "method": self.method, "layers": self.layers, "stats": self.stats,
               "images": self.images, "seconds": self.seconds}
        key = "adversarial" if self.perturbed == "adversarial" else "noise"
        if self.adversarial_change:
            out[f"{key}_change"] = self.adversarial_change
            out[f"{key}_relative_change"] = self.relative_change
        if self.noise:
            out["noise"] = self.noise
        return out

    def rows(self) -> list[dict]:
        key = "adversarial" if self.perturbed == "adversarial" else "noise"
        return [{"model": self.model, "layer": n, **self.stats[n],
                 f"{key}_change": self.adversarial_change.get(n), "relative_change": self.relative_change.get(n)}
                for n in self.layers]

    def plot(self, directory: Path, *others: "FeaturesResult") -> list[Path]:
        from fastablate.engines.studies.feature_plots import plot_channels, plot_heatmaps

        results = [self, *others]
        paths = [plot_heatmaps(results, i, directory / f"heatmaps-{img}.png") for i, img in enumerate(self.images)]
        for r in results:
            suffix = "" if r is self else f"-{slug(r.model)}"
            paths += [plot_channels(r, layer, directory / f"channels-{slug(layer)}{suffix}.png")
                      for layer in r.drawn["channels"]]
        return paths


def noise_layer_indices(model: nn.Module, spec: FeaturesSpec, seed: int) -> list[int]:
    """The layers the noise view perturbs: --noise-at, or --noise-layers N chosen by the seed."""
    names, kind = [n for n, _ in conv_layers(model, spec.noise_on)], LAYER_WORDS[spec.noise_on]
    if not names:
        raise FastablateError(f"the noise view perturbs {kind} layers; {model_name(model)} has none")
    if spec.noise_at:
        unknown = [a for a in spec.noise_at if a not in names]
        if unknown:
            raise FastablateError(f"--noise-at: {model_name(model)} has no {kind} layer {unknown[0]!r}; {kind} layers "
                                  f"are: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
        return [names.index(a) for a in spec.noise_at]
    if spec.noise_layers > len(names):
        raise FastablateError(f"--noise-layers {spec.noise_layers}: {model_name(model)} has {len(names)} {kind} "
                              "layers")
    return sorted(random.Random(f"{seed}:features-noise").sample(range(len(names)), spec.noise_layers))


def noise_view(injector: NoiseInjector, model: nn.Module, x: Tensor, spec: FeaturesSpec, seed: int) -> dict:
    """Turn on the noise of the noise view (the gaussian_noise op, keyed by the seed and the
    layer) and say what it is: {layer: sigma}."""
    chosen = noise_layer_indices(model, spec, seed)
    with eval_mode(model):
        stds = injector.activation_std(model, x) if spec.noise_relative else None
    sigmas = {i: spec.noise_sigma * (stds[i] if stds else 1.0) for i in chosen}
    injector.active = {i: (s, hash_seed(seed, "features-noise", i)) for i, s in sigmas.items()}
    injector.row = 0
    return {"layers": {injector.layers[i][0]: s for i, s in sigmas.items()}, "sigma": spec.noise_sigma,
            "relative": spec.noise_relative}


def run_features(model: nn.Module, data: FeaturesData, spec: FeaturesSpec, runtime: Runtime) -> FeaturesResult:
    """Maps of the chosen images (clean, and adversarial with --examples), channel grids of the
    first image, statistics over ``spec.stats_images`` images."""
    start = time.perf_counter()
    ds = data.ds
    names = resolve_layers(model, spec, ds.image_size, runtime.model_index)
    dev = runtime.device
    x, idx = data.x.to(dev), data.index
    maps, pred = layer_maps(model, names, x, spec.method)
    drawn = {"x": x.cpu(), "maps": {n: m.cpu() for n, m in maps.items()}, "pred": pred.cpu(),
             "labels": data.y, "classes": list(ds.classes)}
    change, relative, noise = {}, {}, {}
    if data.x_adv is not None or spec.noise_sigma:
        if spec.noise_sigma:  # the same images through the model with noise on some conv layers
            injector = NoiseInjector(model, on=spec.noise_on)
            try:
                noise = noise_view(injector, model, x, spec, runtime.seed)
                adv_maps, adv_pred = layer_maps(model, names, x, spec.method)
            finally:
                injector.remove()
            x_other = x.cpu()
        else:
            adv_maps, adv_pred = layer_maps(model, names, data.x_adv.to(dev), spec.method)
            x_other = data.x_adv
        drawn.update(x_adv=x_other, adv_maps={n: m.cpu() for n, m in adv_maps.items()}, adv_pred=adv_pred.cpu(),
                     perturbed="noisy" if spec.noise_sigma else "adversarial")
        for n in maps:
            d = adv_maps[n] - maps[n]
            change[n] = d.abs().mean().item()
            relative[n] = (d.flatten(1).norm(dim=1) / maps[n].flatten(1).norm(dim=1).clamp_min(1e-12)).mean().item()
    # Channels of the first image at each spatial layer.
    rec = Recorder(model, names)
    shapes = layer_shapes(model, ds.image_size)
    stats = {n: LayerStats(alive=torch.zeros(shapes[n][0], dtype=torch.bool)) for n in names}
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
            drawn["channels"] = {n: a[0].cpu() for n, a in rec.out.items() if a.dim() == 4}
            sub = ds.subset(balanced_subset(ds.labels, min(spec.stats_images, len(ds)), runtime.seed))
            for _, xb, _ in my_batches(sub, runtime.with_(progress=False), ""):
                model(xb)
                for n in names:
                    stats[n].add(rec.out[n])
    finally:
        rec.remove()
    for s in stats.values():
        s.reduce()
    summary = {n: s.summary() for n, s in stats.items()}
    drawn["dead"] = {n: [c for c in range(summary[n]["channels"]) if not bool(stats[n].alive[c])]
                     for n in drawn["channels"]}
    return FeaturesResult(model_name(model), names, summary, idx, time.perf_counter() - start, spec.method,
                          change, relative, drawn, "noisy" if spec.noise_sigma else "adversarial", noise)


class FeaturesStudy(Study):
    """Feature maps: per-layer heatmaps over the image (mean activation or Grad-CAM), channel
    grids with dead channels, activation statistics; model vs model, clean vs adversarial."""

    name = "features"
    command = "features"
    spec_class = FeaturesSpec

    def prepare(self, ds, spec: FeaturesSpec, seed: int) -> FeaturesData:
        """The images to draw (``--index``, ``--examples``' fooled ones, or a balanced few) and
        the split the statistics are taken over."""
        count = spec.images or 4
        if spec.examples:
            ex = load_examples(spec.examples, ds)
            fooled = ex["success"].nonzero().squeeze(1)[:count]
            if fooled.numel() == 0:
                raise FastablateError(f"--examples {spec.examples} holds no fooled image to compare")
            return FeaturesData(ds, ex["x"][fooled], ex["y"][fooled], fooled.tolist(), ex["x_adv"][fooled])
        if spec.index is not None:
            bad = [i for i in spec.index if i >= len(ds)]
            if bad:
                raise FastablateError(f"--index {bad[0]}: {ds.name}/{ds.split} has {len(ds)} images (0..{len(ds) - 1})")
            index = torch.tensor(spec.index)
        else:
            index = balanced_subset(ds.labels, min(count, len(ds)), seed)
        return FeaturesData(ds, ds.floats(index), ds.labels[index], index.tolist())

    def load_models(self, setup, spec, data: FeaturesData, runtime):
        return super().load_models(setup, spec, data.ds, runtime)

    def check(self, models, data: FeaturesData, spec):
        if spec.compare_layers and len(spec.compare_layers) != len(models) - 1:
            n = len(spec.compare_layers)
            raise FastablateError(f"--compare-layers is given {n} time{'s' if n != 1 else ''} for {len(models) - 1} "
                                  "--compare models: give one list per --compare model, in order")
        layers = [resolve_layers(m, spec, data.ds.image_size, i) for i, m in enumerate(models)]
        if spec.noise_sigma:
            for m in models:
                noise_layer_indices(m, spec, 0)
        for i, names in enumerate(layers[1:], 1):
            if spec.compare_layers and len(names) != len(layers[0]):
                raise FastablateError(f"--compare-layers {','.join(names)} names {len(names)} layers of "
                                      f"{model_name(models[i])}, --layers {len(layers[0])} of "
                                      f"{model_name(models[0])}: pair them one to one")

    def run(self, model, data, spec, runtime):
        return run_features(model, data, spec, runtime)

    def report(self, results: Sequence[FeaturesResult], spec) -> str:
        rows = [{"model": r.model, "layer": n, "mean": s["mean"], "std": s["std"],
                 "dead": f"{s['dead_channels']}/{s['channels']}", "zero_fraction": s["zero_fraction"],
                 **({"adv_change": r.relative_change[n]} if n in r.relative_change else {})}
                for r in results for n, s in r.stats.items()]
        return table(rows)


def load_examples(path: str, ds: ImageSet) -> dict:
    """attack --save-examples' adversarial.pt, checked against the data's image size."""
    ex = read_saved(path, "--examples ")
    keys = ("x", "x_adv", "y", "success")
    if not isinstance(ex, dict) or not all(isinstance(ex.get(k), Tensor) for k in keys):
        raise FastablateError(f"--examples {path}: not attack --save-examples output (x, x_adv, y, success)")
    if ex["x"].shape[1:] != (3, ds.image_size, ds.image_size) or ex["x_adv"].shape != ex["x"].shape:
        raise FastablateError(f"--examples {path} holds images of shape {tuple(ex['x'].shape[1:])}; the model takes "
                              f"(3, {ds.image_size}, {ds.image_size})")
    return ex
