"""The figures of the features study: heatmaps over the image, channel grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from fastablate.plots import save, subplots


def _overlay(ax, image: Tensor, m: Tensor, cmap: str = "jet", symmetric: bool = False):
    """The map upsampled to the image, blended over it; returns the map's image for a colour bar."""
    size = image.shape[-1]
    up = F.interpolate(m[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    lim = float(up.abs().max()) or 1.0
    kw = {"vmin": -lim, "vmax": lim} if symmetric else {}
    shown = ax.imshow(up.numpy(), cmap=cmap, alpha=0.55, interpolation="bilinear", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def plot_heatmaps(results: Sequence, i: int, path: Path) -> Path:
    """Rows = layers, columns = models (clean | adversarial or noisy | difference with --examples
    or the noise view);
    each cell the layer's map of image ``i`` over the image, with a colour bar. Each model
    draws its own layers, paired by position in its list (a ResNet's ``layer2`` beside a VGG's
    ``features.10``); a model with fewer layers leaves its last rows empty."""
    first = results[0]
    drawn_layers = [[n for n in r.layers if n in r.drawn["maps"]] for r in results]
    same = all(layers == drawn_layers[0] for layers in drawn_layers)
    adversarial = "adv_maps" in first.drawn
    other = first.drawn.get("perturbed", "adversarial")  # the second view: adversarial or noisy
    kinds = ["clean", other, "difference"] if adversarial else ["map"]
    cols = [(m, r, k) for m, r in enumerate(results) for k in kinds]
    nrows = max(len(layers) for layers in drawn_layers)
    fig, axes = subplots(nrows, len(cols), figsize=(2.3 * len(cols) + 0.8, 2.1 * nrows + 0.6),
                                  squeeze=False)
    classes = first.drawn["classes"]
    for c, (m, r, kind) in enumerate(cols):
        d = r.drawn
        for row in range(nrows):
            ax = axes[row][c]
            if row >= len(drawn_layers[m]):
                ax.axis("off")
                ax.text(0.5, 0.5, f"{r.model}:\nno layer {row + 1}", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
                continue
            layer = drawn_layers[m][row]
            if kind == "difference":
                shown = _overlay(ax, d["x"][i], d["adv_maps"][layer][i] - d["maps"][layer][i], "coolwarm", True)
            else:
                image = d["x_adv"][i] if kind == other else d["x"][i]
                maps = d["adv_maps"] if kind == other else d["maps"]
                shown = _overlay(ax, image, maps[layer][i])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel(layer, fontsize=8)
            elif not same and m > 0 and kind == kinds[0]:  # its own layer, under the cell
                ax.set_xlabel(layer, fontsize=7)
            if row == 0:
                pred = d["adv_pred"][i] if kind == other else d["pred"][i]
                label = f"{r.model}" + (f" {kind}" if adversarial else "")
                ax.set_title(f"{label}\npredicted {classes[int(pred)]}" if kind != "difference" else
                             f"{label}\n({other} - clean)", fontsize=7)
    fig.suptitle(f"image {first.images[i]} ({classes[int(first.drawn['labels'][i])]}): "
                 f"{'Grad-CAM' if first.method == 'gradcam' else 'mean activation over channels'}", fontsize=9)
    return save(fig, path, dpi=100)


def plot_channels(result, layer: str, path: Path) -> Path:
    """Every channel of the first image at ``layer``, each on its own colour scale (viridis, its
    minimum to its maximum), tiled into one image; dead channels (zero on every evaluated image)
    framed in red. One image, not an axes per channel: a 512-channel layer draws in a second."""
    import numpy as np
    from matplotlib import colormaps

    acts = result.drawn["channels"][layer].float()
    dead = set(result.drawn["dead"][layer])
    c, h, w = acts.shape
    cols = math.ceil(math.sqrt(c * 1.5))
    rows = math.ceil(c / cols)
    flat = acts.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    colours = colormaps["viridis"](((acts - lo) / (hi - lo).clamp_min(1e-12)).numpy())[..., :3]
    scale = max(1, 16 // h)  # small maps (2x2 at the top of a VGG) drawn as blocks of at least 16 pixels
    colours = colours.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    pad = max(1, h // 10)
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3))
    for k in range(c):
        y, x = (k // cols) * cell_h, (k % cols) * cell_w
        if k in dead:
            mosaic[y:y + cell_h, x:x + cell_w] = (1.0, 0.0, 0.0)
        mosaic[y + pad:y + pad + h, x + pad:x + pad + w] = colours[k]
    fig, ax = subplots(figsize=(max(6.0, 0.9 * cols), 0.9 * rows + 0.5))  # room for the title
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"{result.model} {layer}: {c} channels of image {result.images[0]}; {len(dead)} dead (red) "
                 f"over the evaluated images", fontsize=8)
    return save(fig, path, dpi=100)


__all__ = ["plot_channels", "plot_heatmaps"]
