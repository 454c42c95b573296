"""The figures of the attack study: an attack update by update, and fooled images beside their
originals."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastablate.plots import save, subplots


def plot_trajectory(traj: dict, attack: str, path: Path, columns: int = 8) -> Path:
    """Per image two rows: the image at evenly spaced updates of the attack (the last column
    what it returns), with the model's class, and the size of the perturbation per pixel, on one
    scale for the whole attack (its maximum in the row's label)."""
    frames, pred, classes = traj["frames"], traj["pred"], traj["classes"]
    t = frames.shape[0]
    cols = sorted(set(torch.linspace(0, t - 1, min(columns, t)).round().long().tolist()))
    n = frames.shape[1]
    change = (frames - frames[:1]).abs().mean(2)  # (T + 1, n, H, W): per pixel, over channels
    scale = change.flatten(2).amax(2).amax(0).clamp_min(1e-12)  # per image, over the whole attack
    fig, axes = subplots(2 * n, len(cols), figsize=(1.5 * len(cols) + 1, 3.0 * n), squeeze=False)
    for i in range(n):
        for c, step in enumerate(cols):
            img, d = frames[step, i], change[step, i] / scale[i]
            wrong = int(pred[step, i]) != int(traj["y"][i])
            top, bottom = axes[2 * i][c], axes[2 * i + 1][c]
            top.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            top.set_title(f"{'final' if step == t - 1 else f'update {step}'}\n{classes[int(pred[step, i])]}",
                          fontsize=7, color="tab:red" if wrong else "black")
            bottom.imshow(d.numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * i][0].set_ylabel(f"image {int(traj['index'][i])}\n({classes[int(traj['y'][i])]})", fontsize=7)
        axes[2 * i + 1][0].set_ylabel(f"|perturbation|\n(max {float(scale[i]):.3g})", fontsize=7)
    fig.suptitle(f"{attack} attack, update by update (red: the model is fooled; the perturbation on one scale "
                 "per image)", fontsize=9)
    return save(fig, path, dpi=100)


def save_grid(examples: dict, path: Path, count: int = 8) -> Path:
    """PNG: one row per fooled image: original | adversarial | difference amplified to full range."""
    from torchvision.utils import save_image

    idx = examples["success"].nonzero().squeeze(1)[:count]
    if idx.numel() == 0:
        idx = torch.arange(min(count, examples["x"].shape[0]))
    x, adv = examples["x"][idx], examples["x_adv"][idx]
    d = (adv - x).abs()
    d = d / d.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    rows = torch.stack([x, adv, d], 1).flatten(0, 1)
    scale = max(1, 96 // rows.shape[-1])  # small images enlarged, pixel for pixel, so single pixels show
    save_image(F.interpolate(rows, scale_factor=scale, mode="nearest"), path, nrow=3, padding=2, pad_value=1.0)
    return path

