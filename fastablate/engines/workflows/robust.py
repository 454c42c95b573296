"""``fastablate robust``: the robust-training protocol as one run (Lin & Nyiam 2023).

1. **baseline**: fine-tune the model (default an ImageNet-initialized ResNet-18) with a
   validation split; a learning-rate x batch-size grid (a sweep) picks the baseline by
   validation accuracy.
2. **attacks** on correctly classified images, keeping successful examples only
   (``attack --successes``): the optimized-noise attack on the training split
   (``--train-successes``; the protocol's 11,000, default 1,100) and on the test split, which is
   the protocol's validation set (``--val-successes``; 2,000, default 200); the sparse
   0.5%-pixel attack on the test split (``--ood-successes``; 500, default 50) for the
   out-of-distribution set. Each records its trajectory.
3. **sets**: disjoint, class-stratified parts (``data split``): the training examples into
   the augmentation set and "perturbed train" (``--perturbed`` of them; 1,000, default 100), the
   validation examples into "perturbed validation" and the hold-out (half each).
4. **retrain**: a sweep with the augmentation set appended to the training data, over the
   initialization (the baseline checkpoint and ImageNet), the frozen children, the batch
   size and the learning rate; every point scores the five sets each epoch. The final model
   is the point with the best mean of original-validation and perturbed-validation accuracy.
5. **report**: the five-set table of the baseline and the final model (original validation,
   perturbed train, perturbed validation, hold-out, out-of-distribution), the sweep's plots,
   the attacks' trajectories and the feature maps of both models on an original image and
   its perturbed twin; report.md and report.html.

Every step is a run directory under ``--out``; a rerun reuses the finished ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from fastablate.engines.core.attack_options import DEFAULT_PIXELS, AttackOptions
from fastablate.engines.core.setup import Setup
from fastablate.engines.core.spec import Float, Int, List, Spec, Text, option, option_of
from fastablate.engines.studies.train import Init
from fastablate.engines.workflows.comparison import Part, run_part
from fastablate.engines.workflows.report import Finding, write_document
from fastablate.engines.workflows.sweep import Axis, SweepSpec, run_sweep
from fastablate.errors import FastablateError
from fastablate.rundir import RunDir, default_out, read_run

SETS = ("perturbed-train", "perturbed-val", "holdout", "ood")
RETRAIN_AXES = ("init", "freeze", "lr", "batch-size")


@dataclass(frozen=True)
class RobustSpec(Spec):
    init: str = option("imagenet", "The baseline's initialization: imagenet (the torch hub cache), none, or a "
                                   "checkpoint FILE.", type=Init())
    stem: Optional[str] = option(None, "Stem of torchvision ResNets/VGGs (train --stem).", type=Text("cifar|imagenet"))
    epochs: int = option(3, "Baseline epochs.", type=Int(min=1, max=100_000))
    lrs: tuple[float, ...] = option((0.01,), "Baseline grid: learning rates (as given, whatever the batch).",
                                    type=List(Float(0, 100, min_open=True)))
    batch_sizes: tuple[int, ...] = option((128,), "Baseline grid: batch sizes.", type=List(Int(min=1)))
    val_fraction: float = option(0.1, "Validation split of the training images that picks the baseline.",
                                 type=Float(0, 1, min_open=True, max_open=True))
    train_successes: int = option(1_100, "Noise-attack examples from the training split (the augmentation set "
                                         "plus --perturbed; the protocol: 11000).", type=Int(min=2))
    val_successes: int = option(200, "Noise-attack examples from the test split (perturbed validation and the "
                                     "hold-out, half each; the protocol: 2000).", type=Int(min=2))
    ood_successes: int = option(50, "Sparse-attack examples from the test split (out of distribution; the "
                                    "protocol: 500).", type=Int(min=1))
    perturbed: int = option(100, "Training-split examples kept out of the augmentation set to score (the "
                                 "protocol: 1000).", type=Int(min=1))
    pixels: float = option_of(AttackOptions, "pixels", DEFAULT_PIXELS, "The out-of-distribution attack's budget as "
                                                                       "a fraction of the pixels (attack --pixels).")
    retrain_epochs: int = option(3, "Epochs of each retraining point.", type=Int(min=1, max=100_000))
    retrain_inits: tuple[str, ...] = option(("baseline", "imagenet"), "Retraining grid: initializations "
                                            "(baseline: the baseline checkpoint; imagenet; none).",
                                            type=List(Text()))
    retrain_freeze: tuple[int, ...] = option((0,), "Retraining grid: frozen top-level children (0: none).",
                                             type=List(Int(min=0)))
    retrain_lrs: tuple[float, ...] = option((0.01,), "Retraining grid: learning rates.",
                                            type=List(Float(0, 100, min_open=True)))
    retrain_batch_sizes: tuple[int, ...] = option((128,), "Retraining grid: batch sizes.", type=List(Int(min=1)))

    def validate(self) -> None:
        if self.perturbed >= self.train_successes:
            raise FastablateError(f"--perturbed {self.perturbed} leaves no augmentation examples of the "
                                  f"--train-successes {self.train_successes}")
        bad = [i for i in self.retrain_inits if i not in ("baseline", "imagenet", "none")]
        if bad:
            raise FastablateError(f"--retrain-inits {bad[0]!r}: choose from baseline, imagenet, none")


def check_steps(setup: Setup, spec: RobustSpec, model: str) -> None:
    """What a later step would refuse, refused before the first one runs: the data (one image of
    each split read), enough images for each attack's successes, ImageNet weights where asked."""
    from fastablate.data import list_dataset
    from fastablate.engines.core.setup import load_data
    from fastablate.models.transfer import imagenet_weights

    images = {}
    for split in ("train", "test"):
        load_data(replace(setup, limit=1), split)
        images[split] = len(list_dataset(setup.dataset, setup.data_dir, split))  # the attacks draw from all of it
    for flag, wanted, split in (("--train-successes", spec.train_successes, "train"),
                                ("--val-successes", spec.val_successes, "test"),
                                ("--ood-successes", spec.ood_successes, "test")):
        if wanted > images[split]:
            raise FastablateError(f"{flag} {wanted}: the {split} split of {setup.dataset} holds {images[split]} "
                                  "images, so at most that many can be fooled")
    if spec.init == "imagenet" or "imagenet" in spec.retrain_inits:
        try:
            imagenet_weights(model)
        except FastablateError as e:
            flag = "--init" if spec.init == "imagenet" else "--retrain-inits"
            raise FastablateError(str(e).replace("--init imagenet", f"{flag} imagenet", 1)) from None


def _attack(name: str, setup: Setup, out: Path, split: str, spec, echo) -> Part:
    return run_part(Part(name, "attack"), replace(setup, split=split, out=str(out / name)), spec, echo)


def _best(rows: list[dict], score) -> dict:
    done = [r for r in rows if r["status"] == "complete"]
    if not done:
        raise FastablateError(f"every point failed; first: {rows[0].get('error')}")
    return max(done, key=score)


def run_robust(setup: Setup, spec: RobustSpec, echo=print) -> tuple[Path, dict]:
    """Steps 1-5 of the module; returns the output folder and the five-set table."""
    out = Path(setup.out or default_out("robust"))
    model = setup.model or "resnet18"
    check_steps(setup, spec, model)
    config = {"setup": setup.to_dict(), "robust": spec.to_dict()}
    resume = (read_run(out) or {}).get("command") == "robust"
    with RunDir(out, "robust", config, device=setup.device, seed=setup.seed).start(resume=resume,
                                                                                 force=setup.force) as run:
        steps = Steps(out, replace(setup, out=None, force=True, compare=()), model, spec, echo)
        baseline = steps.baseline()
        steps.attacks(baseline)
        eval_sets = steps.sets()
        final_row, final = steps.retrain(baseline, eval_sets)
        table = steps.five_sets(baseline, final, eval_sets)
        _report(out, setup, spec, table, final_row)
        run.write_json("results.json", {"baseline": str(baseline), "final": str(final), "final_point": final_row,
                                        "five_sets": table, "report": ["report.md", "report.html"]})
    return out, table


@dataclass
class Steps:
    """The protocol's steps, each a run directory (or a sweep of them) inside ``out``. Each step
    names the model of every checkpoint it reads: a checkpoint never names code to run."""

    out: Path
    base: Setup  # the shared options of every step
    model: str
    spec: RobustSpec
    echo: object

    def sweep(self, folder: str, train: dict, axes: list[Axis]) -> list[dict]:
        _, rows = run_sweep("train", {**self.base.to_dict(), "model": self.model, "out": None}, train, axes,
                            SweepSpec(out=str(self.out / folder), cpus_per_point=None), echo=self.echo)
        return rows

    def baseline(self) -> Path:
        """1. A grid over learning rate and batch size, the best point by validation accuracy."""
        spec = self.spec
        self.echo("robust: baseline")
        rows = self.sweep("baseline", {"epochs": spec.epochs, "init": spec.init, "stem": spec.stem,
                                       "val_fraction": spec.val_fraction, "keep": "best", "lr_scaling": "none"},
                          [Axis("spec", "lr", "--lr", spec.lrs),
                           Axis("setup", "batch_size", "--batch-size", spec.batch_sizes)])
        return self.out / "baseline" / "points" / _best(rows, lambda r: r["val_accuracy"])["key"] / "model.pt"

    def attacks(self, baseline: Path) -> None:
        """2. Successful examples only, each attack with its trajectory."""
        from fastablate.engines.studies.attacks import AttackSpec

        spec, out = self.spec, self.out
        attacked = replace(self.base, weights=str(baseline), model=self.model, limit=None)
        noise = AttackSpec(attack="noise", save_trajectory=True)
        _attack("attack-train", attacked, out, "train", replace(noise, successes=spec.train_successes,
                                                                  save_dataset=str(out / "adv-train.pt")), self.echo)
        _attack("attack-val", attacked, out, "test", replace(noise, successes=spec.val_successes, save_examples=True,
                                                             save_dataset=str(out / "adv-val.pt")), self.echo)
        _attack("attack-ood", attacked, out, "test", AttackSpec(attack="sparse", pixels=spec.pixels, queries=300,
                                                                successes=spec.ood_successes, save_trajectory=True,
                                                                save_dataset=str(out / "adv-ood.pt")), self.echo)

    def sets(self) -> tuple[tuple[str, str], ...]:
        """3. The disjoint, stratified sets; returns the evaluation sets as (name, file)."""
        from fastablate.data.adversarial import read_set, split_set
        from fastablate.files import atomic_save

        spec, out, seed = self.spec, self.out, self.base.seed
        sets = out / "sets"
        sets.mkdir(exist_ok=True)
        adv_train, adv_val = read_set(str(out / "adv-train.pt")), read_set(str(out / "adv-val.pt"))
        n_train, n_val = len(adv_train["labels"]), len(adv_val["labels"])
        ood = read_set(str(out / "adv-ood.pt"))
        if n_train <= spec.perturbed or n_val < 2 or not len(ood["labels"]):
            raise FastablateError(f"robust: the attacks made {n_train} training, {n_val} validation and "
                                  f"{len(ood['labels'])} out-of-distribution examples; the sets need more than "
                                  f"--perturbed {spec.perturbed}, 2 and 1 (more images, a stronger attack or a "
                                  "better baseline)")
        pieces = [*zip(split_set(adv_train, [n_train - spec.perturbed, spec.perturbed], seed),
                       ("augment", "perturbed-train")),
                  *zip(split_set(adv_val, [n_val // 2, n_val - n_val // 2], seed), ("perturbed-val", "holdout")),
                  (ood, "ood")]
        for piece, name in pieces:
            atomic_save(piece, sets / f"{name}.pt")
        return tuple((n, str(sets / f"{n}.pt")) for n in SETS)

    def retrain(self, baseline: Path, eval_sets) -> tuple[dict, Path]:
        """4. Retraining with the augmentation set appended, over the grid; the final point is the
        best by the mean of clean and perturbed validation accuracy."""
        spec = self.spec
        inits = tuple(str(baseline) if i == "baseline" else i for i in spec.retrain_inits)
        self.echo("robust: retraining")
        rows = self.sweep("retrain", {"epochs": spec.retrain_epochs, "stem": spec.stem,
                                      "adv_data": str(self.out / "sets" / "augment.pt"), "adv_mode": "append",
                                      "eval_sets": eval_sets, "lr_scaling": "none"},
                          [Axis("spec", "init", "--init", inits),
                           Axis("spec", "freeze", "--freeze", tuple(str(f) if f else None for f in spec.retrain_freeze)),
                           Axis("spec", "lr", "--lr", spec.retrain_lrs),
                           Axis("setup", "batch_size", "--batch-size", spec.retrain_batch_sizes)])
        final_row = _best(rows, lambda r: (r["accuracy"] + r["perturbed-val_accuracy"]) / 2)
        return final_row, self.out / "retrain" / "points" / final_row["key"] / "model.pt"

    def five_sets(self, baseline: Path, final: Path, eval_sets) -> list[dict]:
        """5. The five sets before and after, and the feature maps."""
        from fastablate.engines.studies.evaluate import EvaluateSpec
        from fastablate.engines.studies.features import FeaturesSpec

        base, out, model = self.base, self.out, self.model
        evals = {who: run_part(Part(f"eval-{who}", "evaluate"), replace(base, weights=str(ckpt), model=model,
                                                                        out=str(out / f"eval-{who}"), limit=None),
                               EvaluateSpec(eval_sets=eval_sets), self.echo).document
                 for who, ckpt in (("baseline", baseline), ("final", final))}
        run_part(Part("features", "features"), replace(base, weights=str(baseline), model=model, limit=None,
                                                       compare=(f"{model}={final}",), out=str(out / "features")),
                 FeaturesSpec(images=1, examples=str(out / "attack-val" / "adversarial.pt")), self.echo)
        return _five_sets(evals)


def _five_sets(evals: dict) -> list[dict]:
    rows = []
    for who, doc in evals.items():
        row = {"model": who, "original validation": doc["accuracy"]}
        row.update({n: doc["eval_sets"][n]["accuracy"] for n in SETS})
        rows.append(row)
    return rows


def _report(out: Path, setup: Setup, spec: RobustSpec, table: list[dict], final_row: dict) -> None:
    before, after = table
    gains = {n: after[n] - before[n] for n in before if n != "model"}
    verdict = ("after retraining with the adversarial examples appended, accuracy changes by "
               + ", ".join(f"{g:+.3f} on {n}" for n, g in gains.items()))
    wanted = ("accuracy", "perturbed-val_accuracy", "holdout_accuracy", "ood_accuracy")
    sweep_plots = [p for m in wanted for kind in ("bar", "line", "lines")
                   for p in sorted((out / "retrain" / "plots").glob(f"{kind}-{m}-*.png"))] or \
        sorted((out / "retrain" / "plots").glob("heatmap-accuracy-*.png"))
    found = [Finding("The five sets, before and after", verdict, "measured", table),
             Finding("Retraining: accuracy per hyperparameter",
                     "the final model is the point " + ", ".join(f"{k}={final_row[k]}" for k in RETRAIN_AXES) +
                     " (the best mean of original-validation and perturbed-validation accuracy)", "measured",
                     [{k: final_row.get(k) for k in (*RETRAIN_AXES, "accuracy", "perturbed-val_accuracy")}],
                     sweep_plots[:12]),
             Finding("The attacks, update by update", "the optimized-noise attack (top) and the sparse pixel attack "
                     "(bottom) on four correctly classified images", "measured", [],
                     [p for p in (out / "attack-val" / "plots" / "trajectory.png",
                                  out / "attack-ood" / "plots" / "trajectory.png") if p.is_file()]),
             Finding("Feature maps: baseline vs final, original vs perturbed", "the same image and its perturbed "
                     "twin through both models", "measured", [],
                     sorted((out / "features" / "plots").glob("*.png"))[:4])]
    runs = [{"step": p.name, "run": str(p)} for p in sorted(out.iterdir()) if p.is_dir()]
    write_document(out, f"fastablate robust: {setup.model or 'resnet18'} on {setup.dataset}",
                   "The robust-training protocol: baseline, attacks, disjoint sets, retraining, five sets.",
                   found, [runs])


__all__ = ["RobustSpec", "run_robust"]
