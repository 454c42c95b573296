"""Training studies: train any registry model on any registry dataset, from scratch or from
ImageNet weights or a checkpoint, with frozen parts, an MLP/dropout head, batched
augmentations, adversarial batches (saved or made on the fly) and extra evaluation sets.

Defaults follow the CIFAR recipe of He et al. 2016 adapted to a cosine schedule
(Loshchilov & Hutter 2017): lr 0.1 per 128 images, momentum 0.9, weight decay 5e-4, random
crops and flips. The loop is :mod:`fastablate.engines.studies.train_loop`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor

from fastablate.data import ImageSet, load_saved, resized, to_unit
from fastablate.attacks import ATTACKS
from fastablate.data.augment import check_strengths, label, output_size, parse_augment
from fastablate.engines.core.attack_options import AttackOptions, ResolvedAttack
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import table
from fastablate.engines.core.setup import check_fits, load_data, seed_everything
from fastablate.engines.core.spec import (Choice, Float, Int, List, NamedFiles, Spec, Text, Value, applies, one_of,
                                          option, prefixed)
from fastablate.engines.studies.train_loop import MODEL_FILE, STATE_FILE, TrainResult, train
from fastablate.errors import FastablateError
from fastablate.models import build_model, get_spec, save_checkpoint
from fastablate.models.checkpoint import FORMAT, checkpoint_arch, read_checkpoint
from fastablate.models.transfer import freeze, init_from_checkpoint, init_imagenet, parse_head
from fastablate.rundir import VOLATILE, jsonable, write_csv

DEFAULT_MODEL = "resnet8"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ADV_OPTIONS = ("pixels", "k", "queries", "steps", "restarts", "step", "eps", "lam", "lr")


class Parsed(Value):
    """Text that ``parser`` reads (its ValueError is the problem)."""

    def __init__(self, parser, metavar: str):
        self.parser, self.metavar = parser, metavar

    def problem(self, value):
        try:
            self.parser(value)
        except ValueError as e:
            return str(e)
        return None


INITS = ("none", "imagenet")


class Init(Value):
    metavar = "none|imagenet|FILE"

    def parse(self, raw):
        return str(raw).strip()

    def problem(self, value):
        if value in INITS or Path(value).is_file():
            return None
        return "is neither none, imagenet nor a checkpoint file"

    def files(self, value) -> list[str]:
        return [] if value in INITS else [value]


class Augment(Parsed):
    def __init__(self):
        super().__init__(parse_augment, "NAME[:S][@P],..")

    def parse(self, raw):
        return ",".join(n + (":" + ",".join(f"{v:g}" for v in s) if s else "") + (f"@{p:g}" if p is not None else "")
                        for n, s, p in parse_augment(raw))


@dataclass(frozen=True)
class _Recipe(Spec):
    epochs: int = option(15, "Epochs.", type=Int(min=1, max=100_000))
    optimizer: str = option("sgd", "Optimizer.", type=Choice("sgd", "adam", "adamw"))
    lr: float = option(0.1, "Peak learning rate per 128 images, scaled linearly with --batch-size (see "
                            "--lr-scaling) [default: 0.1 for sgd, 0.001 for adam and adamw].",
                       type=Float(0, 100, min_open=True))
    lr_scaling: str = option("linear", "linear: --lr is per 128 images and scales with the global batch; none: "
                                       "--lr is the rate as given, whatever the batch.", type=Choice("linear", "none"))
    momentum: float = option(0.9, "SGD momentum (Nesterov when > 0).", type=Float(0, 1, max_open=True))
    betas: Optional[tuple[float, ...]] = option(None, "adam/adamw: the two betas [default: 0.9,0.999].",
                                                type=List(Float(0, 1, max_open=True)))
    weight_decay: float = option(5e-4, "Weight decay (not on BatchNorm and biases; decoupled for adamw).",
                                 type=Float(0, 1))
    label_smoothing: float = option(0.0, "Label smoothing.", type=Float(0, 1, max_open=True))
    schedule: str = option("cosine", "Learning-rate schedule.", type=Choice("cosine", "onecycle"))
    warmup: float = option(0.2, "onecycle: fraction of the steps over which the rate rises.",
                           type=Float(0, 1, min_open=True, max_open=True))
    ema: float = option(0.0, "Decay per step of an average of the weights, which is evaluated and saved "
                             "(0: off; e.g. 0.999).", type=Float(0, 1, max_open=True))
    tta: bool = option(False, "Also evaluate on the mean prediction of each image and its flip (test_tta).")
    precision: str = option("fp32", "Arithmetic of the forward and backward passes: fp32, or autocast to bf16 or "
                                    "fp16 (fp16 with a gradient scaler); weights and optimizer stay float32.",
                            type=Choice("fp32", "bf16", "fp16"))
    memory_format: str = option("channels-last", "Memory layout of images and activations (channels-last is "
                                                 "faster on CPUs).", type=Choice("channels-last", "contiguous"))
    augment: Optional[str] = option(None, "Augmentations, e.g. crop,flip,rotation:15,cutout:8 [default: crop,flip; "
                                          "crop for digits].", type=Augment())
    val_fraction: float = option(0.0, "Hold out this fraction of the training split, seeded and class-balanced, "
                                      "evaluated every epoch; the test split is then evaluated at the end only.",
                                 type=Float(0, 1, max_open=True))
    keep: str = option("last", "The weights model.pt keeps: the last epoch's, or the best by validation accuracy "
                               "(test accuracy without --val-fraction).", type=Choice("last", "best"))
    stem: Optional[str] = option(None, "Stem of the torchvision ResNets and VGGs: cifar (3x3 conv, no max-pool; a "
                                       "one-linear VGG head) or imagenet (torchvision's, so every ImageNet weight is "
                                       "used) [default: cifar up to 64 px].", type=Choice("cifar", "imagenet"))
    init: str = option("none", "Initialization: fresh (none), torchvision's ImageNet weights from the torch hub "
                               "cache (imagenet), or a checkpoint FILE (as --weights; so one sweep axis can hold "
                               "both, e.g. --grid init=imagenet,runs/base/model.pt).", type=Init(), role="input")
    freeze: Optional[str] = option(None, "Frozen parts: unit or module names (stem, layer1, head, ...) or N, the "
                                         "first N top-level children.", type=Text("NAMES|N"))
    head: str = option("linear", "Head: linear; mlp:W,.. (linear:W,relu per width, then linear to the classes, "
                                 "with --dropout after each relu); or the layers as written, e.g. "
                                 "linear:128,relu,dropout:0.3,linear.", type=Parsed(parse_head, "SPEC"))
    dropout: float = option(0.0, "Dropout probability: before a linear head, after each relu of mlp:, or after "
                                 "the --dropout-after modules.", type=Float(0, 1, max_open=True))
    dropout_after: Optional[str] = option(None, "Where --dropout goes: head and body modules by name, e.g. "
                                                "layer3,layer4 [default: head].", type=Text("NAMES"))
    stochastic_depth: float = option(1.0, "Stochastic depth (Huang et al. 2016): survival probability of the last "
                                          "residual unit, 1 at the first, linear between; units dropped per batch, "
                                          "scaled at test time (1: off; CIFAR ResNets).",
                                     type=Float(0, 1, min_open=True))
    adv_data: Optional[str] = option(None, "A saved adversarial set (attack --save-dataset) mixed into training.",
                                     type=Text("FILE"), role="input")
    adv_train: Optional[str] = option(None, "Make adversarial images on the fly with this attack and the "
                                            "current model.", type=Choice(*ATTACKS))
    adv_ratio: float = option(0.5, "--adv-mode replace, --adv-train: fraction of each batch that is adversarial.",
                              type=Float(0, 1, min_open=True))
    adv_mode: str = option("replace", "--adv-data: replace --adv-ratio of each batch with its examples, or append "
                                      "them to the training set (each seen once an epoch, as the training images "
                                      "are).", type=Choice("replace", "append"))


# --adv-pixels, --adv-steps, ...: the attack's own options, declared once in AttackOptions.
_Adversarial = make_dataclass("_Adversarial", prefixed(AttackOptions, "adv", ADV_OPTIONS, "--adv-train: "),
                              bases=(_Recipe,), frozen=True)


@dataclass(frozen=True)
class TrainSpec(_Adversarial):
    sync_bn: bool = option(False, "Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) "
                                  "instead of each process's.")
    eval_sets: tuple = option((), "Extra evaluation sets evaluated after every epoch, e.g. "
                                  "perturbed=adv-test.pt,holdout=h.pt (attack --save-dataset files).",
                              type=NamedFiles(), role="input")
    resume: bool = option(False, "Continue the run in --out from its last epoch.")

    def validate(self) -> None:
        applies(self, "warmup", self.schedule == "onecycle", "--schedule onecycle")
        applies(self, "momentum", self.optimizer == "sgd", "--optimizer sgd")
        applies(self, "betas", self.optimizer != "sgd", "--optimizer adam or adamw")
        if self.betas is not None and len(self.betas) != 2:
            raise FastablateError(f"--betas {','.join(f'{b:g}' for b in self.betas)}: give two betas, e.g. 0.9,0.999")
        if self.dropout > 0 and "head" in self.dropout_places() and self.head not in ("linear",) and \
                not self.head.startswith("mlp:"):
            raise FastablateError(f"--dropout applies to the linear and mlp: heads; --head {self.head} says where "
                                  "its dropout goes (dropout:P in it)")
        one_of(self, ("adv_data", "adv_train"), "make the adversarial part of a batch")
        applies(self, "adv_ratio", bool(self.adv_data or self.adv_train),
                "--adv-data or --adv-train, neither of which is given")
        applies(self, "adv_mode", bool(self.adv_data), "--adv-data, which is not given")
        applies(self, "adv_ratio", self.adv_mode == "replace", "--adv-mode replace")
        applies(self, [f"adv_{n}" for n in ADV_OPTIONS], bool(self.adv_train), "--adv-train, which is not given")
        self.attack_spec()
        names = [n for n, _ in self.eval_sets]
        if {"train", "val", "test", "test_tta"} & set(names):
            raise FastablateError("--eval-sets: train, val, test and test_tta are taken; name the sets otherwise")

    def dropout_places(self) -> tuple[str, ...]:
        """--dropout-after as names (default: the head)."""
        return tuple(n.strip() for n in self.dropout_after.split(",")) if self.dropout_after else ("head",)

    def base_lr(self) -> float:
        """--lr, or the optimizer's default when not given."""
        return self.lr if "lr" in self.given() or self.optimizer == "sgd" else 1e-3

    def attack_spec(self, image_size: int | None = None) -> AttackOptions | ResolvedAttack | None:
        """The --adv-train attack with its --adv-* options (errors name those options), resolved
        for images of ``image_size`` when given."""
        if not self.adv_train:
            return None
        try:
            attack = AttackOptions(attack=self.adv_train, **{n: getattr(self, f"adv_{n}") for n in ADV_OPTIONS
                                                             if f"adv_{n}" in self.given()})
            return attack if image_size is None else attack.resolved(image_size)
        except FastablateError as e:  # name the options as train has them
            flags = "|".join(["attack", *(AttackOptions.flag(n).lstrip("-") for n in ADV_OPTIONS)])
            raise FastablateError(re.sub(rf"--({flags})\b", lambda m: "--adv-train" if m.group(1) == "attack"
                                         else f"--adv-{m.group(1)}", str(e))) from None


@dataclass
class TrainData:
    train: ImageSet
    test: ImageSet
    augment: list[tuple]  # resolved --augment: (name, strength, p)
    eval_sets: dict[str, ImageSet] = field(default_factory=dict)
    adv: ImageSet | None = None  # --adv-data
    adv_spec: ResolvedAttack | None = None  # --adv-train, resolved for the training images
    fingerprint: dict = field(default_factory=dict)  # everything that shapes the run (see fingerprint())
    resume: dict | None = None  # the state in last.pt, with --resume
    preview: dict[str, Tensor] = field(default_factory=dict)  # augmentation -> a few augmented images

    val: ImageSet | None = None  # --val-fraction
    samples: dict = field(default_factory=dict)  # class name -> a few of its training images (plots/samples.png)

    def __len__(self) -> int:
        return len(self.train)

    @property
    def image_size(self) -> int:
        """The side of the images the model trains on (after the augmentations)."""
        return output_size(self.augment, self.train.image_size)


# Shared options that do not change what a training computes: those of no run, and the
# evaluation studies' split and --compare.
_NOT_FINGERPRINTED = (*VOLATILE, "split", "compare")


def fingerprint(setup, spec: TrainSpec, train_set: ImageSet, test_set: ImageSet) -> dict:
    """What --resume checks: every option that shapes the run (model, data, optimizer, seed,
    schedule, processes) and the data it found (classes, sizes, the labels' digest)."""
    from fastablate.engines.core.distributed import world

    labels = hashlib.blake2b(train_set.labels.numpy().tobytes() + test_set.labels.numpy().tobytes(),
                             digest_size=8).hexdigest()
    return jsonable({**{k: v for k, v in setup.to_dict().items() if k not in _NOT_FINGERPRINTED},
                     **{k: v for k, v in spec.to_dict().items() if k != "resume"},
                     "data_dir": str(Path(setup.data_dir).resolve()) if setup.data_dir else None,
                     "classes": list(train_set.classes), "image_size": train_set.image_size,
                     "images": [len(train_set), len(test_set)], "labels": labels, "world_size": world()})


def load_resume_state(out: Path) -> dict:
    """The training state in ``out/last.pt``."""
    import torch

    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise FastablateError(f"--resume: no {STATE_FILE} in {str(out)!r}; nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise FastablateError(f"--resume: cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(state, dict) or not {"epoch", "state_dict", "optimizer", "history"} <= set(state):
        raise FastablateError(f"--resume: {path} is not a fastablate training state")
    return state


def _preview(ds: ImageSet, augments: list[tuple], seed: int, count: int = 6) -> dict[str, Tensor]:
    import torch

    from fastablate.data.augment import augment

    x = ds.floats(torch.arange(min(count, len(ds)))).cpu()  # for the figures, wherever the images are held
    out = {"original": x}
    for item in augments:
        out[label(item)] = augment(x, [(*item[:2], 1.0)], torch.Generator().manual_seed(seed))
    return out


def _samples(ds: ImageSet, seed: int, classes: int = 10, per_class: int = 8) -> dict[str, Tensor]:
    """Up to ``per_class`` training images of each of the first ``classes`` classes, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for c, name in list(enumerate(ds.classes))[:classes]:
        idx = (ds.labels == c).nonzero().flatten()
        if idx.numel():
            out[name] = ds.floats(idx[torch.randperm(idx.numel(), generator=g)[:per_class]].sort().values).cpu()
    return out


def appended(ds: ImageSet, extra: ImageSet) -> ImageSet:
    """``ds`` with the images of ``extra`` (same classes and size) after its own."""
    import torch

    if ds.images is None:
        raise FastablateError(f"--adv-mode append: the training images of {ds.name} are decoded per batch (more than "
                              "FASTABLATE_MEMORY_LIMIT); raise the limit or use --adv-mode replace")
    if ds.images.shape[-2:] != extra.images.shape[-2:]:
        raise FastablateError(f"--adv-mode append: {extra.name} holds {extra.images.shape[-1]} px images, the training "
                              f"images are stored at {ds.images.shape[-1]} px (--image-size resizes them per batch); "
                              "use --adv-mode replace")
    images = extra.images if extra.images.dtype == ds.images.dtype else to_unit(extra.images)
    return replace(ds, images=torch.cat([ds.images, images]), labels=torch.cat([ds.labels, extra.labels]))


def hold_out(ds: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation): ``fraction`` of each class (rounded, at least one image) held out,
    chosen by a permutation seeded with ``seed``; a class left with no training image is an error."""
    import torch

    g = torch.Generator().manual_seed(seed)
    val = []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        k = max(1, round(fraction * idx.numel()))
        if k >= idx.numel():
            raise FastablateError(f"--val-fraction {fraction:g} leaves class {ds.classes[c]!r} no training image "
                                  f"(it has {idx.numel()}); give a smaller fraction or more images")
        val.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    held = torch.zeros(len(ds), dtype=torch.bool)
    held[torch.cat(val)] = True
    return ds.subset((~held).nonzero().flatten()), replace(ds.subset(held.nonzero().flatten()), split="val")


class TrainStudy(Study):
    """Train a model (default: resnet8 on the embedded digits) and evaluate it after every
    epoch: from scratch, from ImageNet weights (--init) or a checkpoint (--weights), with frozen
    parts, an MLP/dropout head, augmentations, adversarial batches and extra evaluation sets.
    --limit applies to both splits."""

    name = "train"
    command = "train"
    spec_class = TrainSpec
    setup_excludes = ("split", "compare")

    def load_data(self, setup, spec: TrainSpec, runtime) -> TrainData:
        if spec.resume and not setup.out:
            raise FastablateError("--resume needs --out DIR of the run to continue")
        train_set = load_data(setup, "train")
        test_set = load_data(setup, "test", image_size=train_set.image_size, classes=train_set.classes,
                             classes_of="the train split")
        return self.data_from(train_set, test_set, spec, setup.seed, fingerprint(setup, spec, train_set, test_set),
                              load_resume_state(Path(setup.out)) if spec.resume else None)

    def data_from(self, train_set: ImageSet, test_set: ImageSet, spec: TrainSpec, seed: int,
                  fingerprint: dict | None = None, resume: dict | None = None) -> TrainData:
        """The training's data from its two splits (from the CLI's dataset or a library call's data)."""
        augments = check_strengths(parse_augment(spec.augment or ("crop,flip" if train_set.flip else "crop")),
                                   train_set.image_size)
        eval_sets = {n: load_saved(p, f"--eval-sets {n}=", train_set) for n, p in spec.eval_sets}
        adv = load_saved(spec.adv_data, "--adv-data ", train_set) if spec.adv_data else None
        val = None
        if spec.val_fraction > 0:
            train_set, val = hold_out(train_set, spec.val_fraction, seed)
        if adv is not None and spec.adv_mode == "append":  # the protocol's: more training images
            train_set, adv = appended(train_set, adv), None
        size = output_size(augments, train_set.image_size)
        if size != train_set.image_size:  # --augment resizes: what is evaluated is made that size too
            test_set, val = resized(test_set, size), val and resized(val, size)
            eval_sets = {n: resized(d, size) for n, d in eval_sets.items()}
        return TrainData(train_set, test_set, augments, eval_sets, adv, spec.attack_spec(size), fingerprint or {},
                         resume, _preview(train_set, augments, seed), val, _samples(train_set, seed))

    def load_models(self, setup, spec: TrainSpec, data: TrainData, runtime):
        ds = data.train
        if spec.init != "none" and setup.weights:
            raise FastablateError(f"--init {spec.init} and --weights both initialize the model: give one")
        weights = setup.weights or (spec.init if spec.init not in INITS else None)
        ckpt = read_checkpoint(weights) if weights else None
        arch = checkpoint_arch(ckpt, weights, setup.model) if ckpt else setup.model
        if ckpt is not None and arch is None:
            raise FastablateError(f"checkpoint {weights!r} is a bare state_dict: name its model with --model")
        arch = arch or DEFAULT_MODEL
        mean, std = setup.mean, setup.std
        if mean is None and spec.init == "imagenet":
            mean, std = IMAGENET_STATS
        elif mean is None and ckpt is not None and ckpt["format"] == FORMAT:
            mean, std = ckpt["mean"], ckpt["std"]
        seed_everything(setup.seed)  # the same seed gives the same initial weights
        model = build_model(arch, ds.num_classes, image_size=data.image_size, mean=mean or ds.mean,
                            std=std or ds.std, head=spec.head, dropout=spec.dropout,
                            stochastic_depth=spec.stochastic_depth,
                            stem=spec.stem or (ckpt.get("stem") if ckpt and get_spec(arch).stems else None),
                            dropout_after=spec.dropout_places())
        model.classes = list(ds.classes)
        model.init = "none"
        if ckpt is not None:
            init_from_checkpoint(model, ckpt, weights)
            model.init = f"checkpoint {weights}"
        if spec.init == "imagenet":
            model.init = f"imagenet {init_imagenet(model)}"
        model.frozen = freeze(model, spec.freeze) if spec.freeze else []
        check_fits(model, ds)
        return [model]

    def check(self, models, data: TrainData, spec):
        from fastablate.engines.core.distributed import world

        if not any(p.requires_grad for p in models[0].parameters()):  # frozen before it came (--freeze says so)
            raise FastablateError(f"every parameter of {models[0].name} is frozen (requires_grad False): nothing to "
                                  "train")
        if spec.sync_bn and world() == 1:
            raise FastablateError("--sync-bn applies under torchrun (more than one process)")
        if data.resume is None:
            return
        old = data.resume.get("fingerprint")
        if old is None:
            raise FastablateError("--resume: the run's last.pt records no fingerprint of its options; start a fresh "
                                  "run")
        diff = [k for k in sorted(set(old) | set(data.fingerprint)) if old.get(k) != data.fingerprint.get(k)]
        if diff:
            shown = "; ".join(f"{k} was {old.get(k)!r}, now {data.fingerprint.get(k)!r}" for k in diff[:3])
            raise FastablateError(f"--resume: this is not the run in --out, which it would continue ({shown}); "
                                  "resume with the run's own options, or start a fresh run")

    def run_info(self, models, data: TrainData, spec) -> dict:
        m = models[0]
        frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
        return {"init": m.init, "frozen": m.frozen, "frozen_parameters": frozen,
                "trainable_parameters": sum(p.numel() for p in m.parameters()) - frozen,
                "augment": [label(a) for a in data.augment]}

    def metrics(self, document: dict) -> dict[str, float]:
        last = document["history"][-1] if document.get("history") else {}
        return {"accuracy": document["accuracy"], "loss": document["loss"],
                **{k: last[k] for k in ("train_accuracy", "train_loss") if k in last},
                **{f"{n}_accuracy": e["accuracy"] for n, e in document.get("eval_sets", {}).items()}}

    def resumes(self, spec: TrainSpec) -> bool:
        return spec.resume

    def run(self, model, data, spec, runtime):
        return train(model, data, spec, runtime)

    def write_artifacts(self, results, spec, runtime):
        """model.pt and metrics.csv of a training run without a run directory (from Python)."""
        r = results[0]
        if r.checkpoint is None and r.trained is not None:
            r.checkpoint = runtime.artifact(MODEL_FILE)
            save_checkpoint(r.trained, r.checkpoint, {"dataset": r.dataset, "epoch": len(r.history),
                                                      "test_accuracy": r.final.accuracy, "test_loss": r.final.loss,
                                                      "seed": runtime.seed, "world_size": 1,
                                                      "precision": spec.precision})
            write_csv(runtime.artifact("metrics.csv"), r.history)

    def report(self, results: Sequence[TrainResult], spec) -> str:
        r = results[0]
        lines = [table(r.final.rows()), ""]
        lines += [f"{r.model}: test accuracy {r.final.accuracy:.4f} ({r.final.n} images), loss {r.final.loss:.4f}"]
        lines += [f"{n}: accuracy {e.accuracy:.4f} ({e.n} images)" for n, e in r.eval_sets.items()]
        return "\n".join(lines + [f"checkpoint: {r.checkpoint}"])


__all__ = ["TrainData", "TrainResult", "TrainSpec", "TrainStudy", "fingerprint", "load_resume_state", "train"]
