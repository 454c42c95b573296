"""Per-command configuration dataclasses and the parsing of their values.

Precedence, lowest to highest: a YAML file (``--config``), environment variables
``FASTABLATE_<COMMAND>_<OPTION>`` (e.g. ``FASTABLATE_TRAIN_EPOCHS=30``), command-line
flags. The CLI resolves that precedence; engines take these dataclasses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from fastablate.errors import FastablateError


@dataclass
class CommonConfig:
    model: str = "resnet8"
    weights: Optional[str] = None  # checkpoint to load (ours, or a foreign state_dict)
    dataset: str = "digits"
    data_dir: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None  # examples: a seeded class-balanced subset
    mean: Optional[tuple[float, ...]] = None  # per-channel input normalization
    std: Optional[tuple[float, ...]] = None
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 128  # images
    workers: int = 0  # decoding processes for file-backed datasets; in-memory sets need none
    seed: int = 0
    out: Optional[str] = None
    download: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig(CommonConfig):
    split: str = "train"
    epochs: int = 15
    lr: float = 0.1  # per 128 images; scaled linearly with --batch-size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    resume: bool = False


@dataclass
class EvalConfig(CommonConfig):
    pass


def parse_floats(text: str | None, name: str, count: int | None = None) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); one error line naming the option and value otherwise."""
    if text is None or text == "":
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise FastablateError(f"{name} {text!r} is not a comma-separated list of numbers") from None
    if count is not None and len(values) != count:
        raise FastablateError(f"{name} {text!r} has {len(values)} values, expected {count} (one per channel)")
    return values


def validate(cfg: CommonConfig) -> None:
    """Checks that need no torch: run them before anything is loaded or written."""
    if cfg.batch_size < 1:
        raise FastablateError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise FastablateError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.std is not None and any(s <= 0 for s in cfg.std):
        raise FastablateError(f"--std must be positive, got {','.join(map(str, cfg.std))}")
    if (cfg.mean is None) != (cfg.std is None):
        raise FastablateError("--mean and --std go together: give both or neither")
    if isinstance(cfg, TrainConfig):
        if cfg.epochs < 1:
            raise FastablateError(f"--epochs must be >= 1, got {cfg.epochs}")
        if cfg.lr <= 0:
            raise FastablateError(f"--lr must be positive, got {cfg.lr}")
        if not 0 <= cfg.label_smoothing < 1:
            raise FastablateError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")


__all__ = ["CommonConfig", "EvalConfig", "TrainConfig", "parse_floats", "validate"]
