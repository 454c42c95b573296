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
    lesion: tuple[str, ...] = ()  # lesion plans; empty: a clean evaluation
    k: Optional[str] = None  # k-random: numbers of deleted units, e.g. "1,2,4"
    samples: int = 20  # k-random: sets per k; reorder: orders
    max_memory: Optional[str] = None  # bytes of activations per chunk of variants, e.g. "2G"
    compare: Optional[str] = None  # a second checkpoint run through the same study
    noise_layers: Optional[str] = None  # numbers of random conv layers perturbed per trial, e.g. "1,2,3"
    noise_at: Optional[str] = None  # named conv layers instead
    noise_every: Optional[int] = None  # every n-th conv layer instead
    noise_p: str = "1"  # probabilities that a chosen layer is perturbed
    noise_sigma: Optional[str] = None  # noise std values, absolute or x activation std
    noise_relative: bool = False
    input_noise: Optional[str] = None  # CIFAR-10-C gaussian_noise severities 1..5
    trials: int = 10

    @property
    def noise(self) -> bool:
        return bool(self.noise_sigma or self.input_noise)


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


ATTACKS = ("sparse", "noise", "fgsm", "pgd", "pgd-l2")


@dataclass
class AttackConfig(CommonConfig):
    attack: str = "sparse"
    pixels: Optional[float] = None  # sparse budget as a fraction of H*W pixels
    k: Optional[int] = None  # sparse budget in pixels
    steps: Optional[int] = None  # default: 30 (sparse), 100 (noise), 20 (pgd, pgd-l2)
    restarts: int = 1  # sparse: starts of the pixel score
    step: Optional[float] = None  # default: 1 (sparse), eps / 4 (pgd)
    eps: Optional[float] = None  # default: 8/255 (fgsm, pgd, L-inf), 0.5 (pgd-l2)
    lam: float = 0.01
    lr: float = 0.01
    target: Optional[int] = None
    save_examples: bool = False
    save_dataset: Optional[str] = None


def parse_ints(text: str | None, name: str, minimum: int = 1) -> tuple[int, ...] | None:
    """'1,2,4' -> (1, 2, 4), each >= ``minimum``; one error line naming the option otherwise."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise FastablateError(f"{name} {text!r} is not a comma-separated list of integers") from None
    bad = [v for v in values if v < minimum]
    if bad:
        raise FastablateError(f"{name} {text!r}: {bad[0]} is below {minimum}")
    return values


def parse_size(text: str | None, name: str) -> int | None:
    """'2G', '512M', '1.5GiB', '1000000' -> bytes."""
    if text is None or text == "":
        return None
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "KMGT" else t) * scale
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")) or int(value) < 1:
        raise FastablateError(f"{name} {text!r} is not a positive size such as 2G or 512M")
    return int(value)


LESION_PLANS = ("all-single", "k-random", "reorder", "units:NAME,NAME")


def check_plan(text: str) -> None:
    """The syntax of one --lesion value; unit names are checked against the model later."""
    if text in LESION_PLANS[:3] or (text.startswith("units:") and all(text[len("units:"):].split(","))):
        return
    raise FastablateError(f"--lesion {text!r} is not a plan; choose from: {', '.join(LESION_PLANS)}")


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
    if isinstance(cfg, AttackConfig):
        if cfg.attack not in ATTACKS:
            raise FastablateError(f"unknown attack {cfg.attack!r}; choose from: {', '.join(ATTACKS)}")
        if cfg.pixels is not None and cfg.k is not None:
            raise FastablateError("--pixels and --k both set the pixel budget: give one")
        if cfg.pixels is not None and not 0 < cfg.pixels <= 1:
            raise FastablateError(f"--pixels {cfg.pixels:g} is not a fraction of the image in (0, 1]")
        if cfg.k is not None and cfg.k < 1:
            raise FastablateError(f"--k must be >= 1 pixel, got {cfg.k}")
        for name, value, low in (("--steps", cfg.steps, 1), ("--restarts", cfg.restarts, 1)):
            if value is not None and value < low:
                raise FastablateError(f"{name} must be >= {low}, got {value}")
        for name, value in (("--eps", cfg.eps), ("--lr", cfg.lr), ("--step", cfg.step)):
            if value is not None and not 0 < value < float("inf"):
                raise FastablateError(f"{name} must be positive, got {value:g}")
        if cfg.lam < 0:
            raise FastablateError(f"--lam must be >= 0, got {cfg.lam:g}")
        if cfg.target is not None and cfg.target < 0:
            raise FastablateError(f"--target must be a class index >= 0, got {cfg.target}")
    if isinstance(cfg, EvalConfig):
        for plan in cfg.lesion:
            check_plan(plan)
        parse_ints(cfg.k, "--k")
        parse_size(cfg.max_memory, "--max-memory")
        if cfg.samples < 1:
            raise FastablateError(f"--samples must be >= 1, got {cfg.samples}")
        if cfg.k and "k-random" not in cfg.lesion:
            raise FastablateError(f"--k {cfg.k} applies to --lesion k-random, which is not given")
        _validate_noise(cfg)
        if cfg.lesion and cfg.noise:
            raise FastablateError("--lesion and a noise study (--noise-sigma/--input-noise) are separate runs: "
                                  "give one")
        if cfg.compare and not (cfg.lesion or cfg.noise):
            raise FastablateError("--compare draws a second model on a study's plots: give --lesion or a noise study")


def _validate_noise(cfg: EvalConfig) -> None:
    choices = [f for f, v in (("--noise-layers", cfg.noise_layers), ("--noise-at", cfg.noise_at),
                              ("--noise-every", cfg.noise_every)) if v is not None]
    if len(choices) > 1:
        raise FastablateError(f"{' and '.join(choices)} each choose the perturbed layers: give one")
    if choices and not cfg.noise_sigma:
        raise FastablateError(f"{choices[0]} needs --noise-sigma (the noise std values)")
    if cfg.noise_sigma and not choices:
        raise FastablateError("--noise-sigma needs the layers to perturb: --noise-layers N,.., --noise-at NAME,.. "
                              "or --noise-every N")
    parse_ints(cfg.noise_layers, "--noise-layers")
    if cfg.noise_every is not None and cfg.noise_every < 1:
        raise FastablateError(f"--noise-every must be >= 1, got {cfg.noise_every}")
    if cfg.noise_at is not None and not all(cfg.noise_at.split(",")):
        raise FastablateError(f"--noise-at {cfg.noise_at!r} is not a comma-separated list of layer names")
    for p in parse_floats(cfg.noise_p, "--noise-p") or ():
        if not 0 <= p <= 1:
            raise FastablateError(f"--noise-p {cfg.noise_p!r}: {p:g} is not a probability in [0, 1]")
    for s in parse_floats(cfg.noise_sigma, "--noise-sigma") or ():
        if not 0 <= s < float("inf"):
            raise FastablateError(f"--noise-sigma {cfg.noise_sigma!r}: {s:g} is not a finite std >= 0")
    for s in parse_ints(cfg.input_noise, "--input-noise") or ():
        if s > 5:
            raise FastablateError(f"--input-noise {cfg.input_noise!r}: severity {s} is not in 1..5")
    if cfg.trials < 1:
        raise FastablateError(f"--trials must be >= 1, got {cfg.trials}")


__all__ = ["ATTACKS", "AttackConfig", "CommonConfig", "EvalConfig", "TrainConfig", "check_plan", "parse_floats",
           "parse_ints", "parse_size", "validate"]
