"""Veit, Wilber & Belongie 2016 on converged networks, and the studies' speed on a GPU.

bench/gpu.sh runs it as its last step; alone:

    python bench/gpu_veit.py --out DIR --deadline UNIX_TIME --data cifar10-jpg.tar.gz [--device cuda]
    python bench/gpu_veit.py --out DIR --deadline UNIX_TIME --dry-run      # toy size on the CPU

A pre-activation ResNet-56 (27 residual units) and its plain twin train on the 50,000 CIFAR-10
training images with the recipe of ``fastablate study`` (SGD, one-cycle, lr 0.1 per 128 images,
label smoothing 0.1, weight average 0.99), in bf16 with channels-last activations and the images
held on the device, for as many epochs as the deadline allows (30 at most: the time of one epoch
is measured first). Then, on the 10,000 test images: the lesion study (every unit alone, k random
units, reordered units), Veit's paths (gradient per path length, the effective paths) and the noise
table (n random conv layers, ResNet beside plain); and the speed of training and of each study on
the device against the CPU, and of the lesion executor against one pass per variant.

Writes veit.json (every figure), veit.md (the tables, beside Veit's numbers) and a run directory per
study under DIR/runs; each as soon as it is known, so a run stopped at the deadline keeps the rest.
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import fastablate as fa
from fastablate.data import ImageSet, balanced_subset, batches, build_dataset
from fastablate.engines.core.runtime import Runtime
from fastablate.engines.studies.lesion import build_variants, run_lesion
from fastablate.models import build_model
from fastablate.units import units

EPOCHS = 30  # at most: Veit's converged nets trained far longer; 30 is where a CIFAR ResNet-56 settles
BATCH = 256  # images per step (the learning rate scales with it: 0.1 per 128 images)
RECIPE = dict(lr=0.1, schedule="onecycle", label_smoothing=0.1, ema=0.99, precision="bf16")  # fastablate study's
STUDY_RESERVE_S = 110  # what the studies and the speed comparisons took after training on an H200: 60 s
CPU_IMAGES = 200  # the CPU's share of the speed comparison (paths: 32 images, 5 a second on 16 cores)
VEIT = {  # Veit et al. 2016 (ResNet-110 on CIFAR-10: 54 residual units; their Sec. 4 and 6)
    "error": "6.1% intact; deleting any one unit but a downsampling one does not noticeably change it",
    "plain": "a VGG-style net without shortcuts falls to chance when one layer is deleted",
    "k": "the error rises smoothly with the number of deleted units",
    "paths": "95% of the paths are 19-35 units long; the gradient comes from paths 5-17 units long "
             "(0.45% of the paths)",
}


class Budget:
    """Wall-clock left before the deadline, and what was cut to meet it."""

    def __init__(self, deadline: float):
        self.deadline, self.cuts = deadline, []

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, what: str, seconds: float) -> bool:
        if self.left() >= seconds:
            return True
        self.cuts.append(f"{what}: {self.left():.0f} s left, about {seconds:.0f} s needed")
        print(f"gpu_veit: cut {self.cuts[-1]}", flush=True)
        return False


class Record:
    """veit.json, rewritten after every step."""

    def __init__(self, out: Path, budget: Budget):
        self.out, self.budget, self.doc = out, budget, {}

    def __setitem__(self, key, value):
        self.doc[key] = value
        self.doc["cut"] = self.budget.cuts
        (self.out / "veit.json").write_text(json.dumps(self.doc, indent=1, default=float))

    def __getitem__(self, key):
        return self.doc[key]

    def __contains__(self, key):
        return key in self.doc


def cifar(data: str, device: torch.device, dry: bool) -> tuple[ImageSet, ImageSet]:
    """The CIFAR-10 train and test splits, decoded, their images on ``device``; a toy set dry."""
    if dry:
        train, test = (build_dataset("synthetic", None, s, limit=n) for s, n in (("train", 512), ("test", 256)))
    else:
        root = Path(data)
        if root.is_file():  # the .tar.gz: unpacked once into a temporary folder
            folder = Path(tempfile.mkdtemp(prefix="cifar10-"))
            with tarfile.open(root) as tar:
                tar.extractall(folder, filter="data")
            root = next(p.parent for p in folder.rglob("train") if (p.parent / "test").is_dir())
        train, test = (build_dataset("imagefolder", str(root), s) for s in ("train", "test"))
    return tuple(replace(ds, images=ds.images.to(device)) for ds in (train, test))


def epoch_seconds(name: str, train: ImageSet, test: ImageSet, device: torch.device) -> float:
    """One epoch of ``name`` on ``train`` plus an evaluation of ``test``, from a timed second epoch
    over a part of the data (the first pays for warm-up and kernel choice)."""
    part = train.subset(balanced_subset(train.labels, 24 * BATCH, 0))  # every class: a realistic loss
    res = fa.train(build_model(name), part, test.subset(balanced_subset(test.labels, 512, 0)), epochs=2,
                   batch_size=BATCH, device=str(device), **RECIPE)
    per_image = res.history[1]["seconds"] / (len(part) + min(len(test), 512) / 3)
    return per_image * (len(train) + len(test) / 3)


def lesion_table(doc: dict) -> dict:
    """The error of each single deletion (downsampling units marked), the k-curve and reordering."""
    down = set(doc["downsampling_units"])
    singles = [{"unit": v["units"][0], "error": 1 - v["accuracy"], "downsampling": v["units"][0] in down}
               for v in doc["variants"] if v["plan"] == "all-single"]
    ks: dict[int, list[float]] = {}
    for v in doc["variants"]:
        if v["plan"] == "k-random":
            ks.setdefault(v["k"], []).append(1 - v["accuracy"])
    reorder = [1 - v["accuracy"] for v in doc["variants"] if v["plan"] == "reorder"]
    other = [s["error"] for s in singles if not s["downsampling"]]
    return {"model": doc["model"], "intact_error": 1 - doc["intact"]["accuracy"], "single": singles,
            "single_mean_error_not_downsampling": sum(other) / len(other) if other else None,
            "single_worst_error": max((s["error"] for s in singles), default=None),
            "unlesionable": doc.get("unlesionable", []),
            "k_curve": {k: sum(e) / len(e) for k, e in sorted(ks.items())},
            "reorder_mean_error": sum(reorder) / len(reorder) if reorder else None}


def rate(doc: dict) -> float:
    """Images per second of a study's results (paths: the images its gradients are taken on)."""
    images = doc.get("images_per_sample", doc["n"])
    return images / doc["seconds"] if doc.get("seconds") else float("nan")


def naive_all_single(model, ds: ImageSet, device: torch.device) -> float:
    """Seconds of the loop one writes without the executor: a pass over the images per deleted unit."""
    view = units(model.to(device).eval())
    start = time.perf_counter()
    with torch.no_grad():
        for u in view.units:
            if u.lesionable:
                for x, _ in batches(ds, BATCH, device=device):
                    view.forward(x, lesion=[u.name]).argmax(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="unix time by which everything is written")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default="../shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--dry-run", action="store_true", help="toy models and data on the CPU")
    args = ap.parse_args()
    out, dev, dry = Path(args.out), torch.device(args.device), args.dry_run
    (out / "runs").mkdir(parents=True, exist_ok=True)
    budget = Budget(args.deadline)
    rec = Record(out, budget)
    names = ("preresnet14", "preplain14") if dry else ("preresnet56", "preplain56")
    most = 2 if dry else EPOCHS
    scale = 0.02 if dry else 1.0  # the studies' sizes (samples, trials) at toy size
    torch.manual_seed(0)
    t0 = time.time()
    train, test = cifar(args.data, dev, dry)
    rec["setup"] = {"models": names, "device": str(dev), "gpu": torch.cuda.get_device_name() if dev.type == "cuda"
                    else None, "torch": torch.__version__, "train_images": len(train), "test_images": len(test),
                    "batch": BATCH, "recipe": RECIPE, "data_seconds": round(time.time() - t0, 1)}

    # Training: the epochs that fit, both models alike.
    per_epoch = {n: epoch_seconds(n, train, test, dev) for n in names}
    room = budget.left() - STUDY_RESERVE_S * (0.1 if dry else 1.0)
    epochs = max(1, min(most, int(room / sum(per_epoch.values()))))
    if epochs < most:
        budget.cuts.append(f"training: {epochs} epochs instead of {most} (an epoch of both models takes about "
                           f"{sum(per_epoch.values()):.1f} s)")
    rec["training"] = {"epochs": epochs, "estimated_epoch_seconds": per_epoch}
    models, trained = {}, {}
    for n in names:
        model = build_model(n)
        res = fa.train(model, train, test, epochs=epochs, batch_size=BATCH, device=str(dev), **RECIPE)
        res.save(out / "runs" / f"train-{n}", force=True)
        seconds = sum(h["seconds"] for h in res.history)
        models[n] = model.eval()
        trained[n] = {"test_accuracy": res.final.accuracy, "test_error": 1 - res.final.accuracy, "epochs": epochs,
                      "seconds": round(seconds, 1), "train_images_per_second": len(train) * epochs / seconds}
        rec["trained"] = trained
    resnet, plain = (models[n] for n in names)

    # The studies on the test images, on the device.
    gpu: dict[str, dict] = {}
    samples = max(2, round(10 * scale))
    study_args = {
        "evaluate": dict(),
        "lesion": dict(plans=["all-single", "k-random", "reorder"], k=[1, 2, 4, 8, 12] if not dry else [1, 2],
                       samples=samples, compare=[plain]),
        "paths": dict(samples=samples, images=256 if not dry else 16),
        "noise": dict(layers=[1, 2, 3], sigma=[0.5, 1.0, 2.0], relative=True, trials=max(2, round(5 * scale)),
                      compare=[plain]),
    }
    for study, kw in study_args.items():
        if not budget.allows(f"{study} on the device", 20):
            continue
        res = getattr(fa, study)(resnet, train if study == "paths" else test, device=str(dev), batch_size=BATCH,
                                 **kw)  # paths: gradients on training images, as Veit measured them
        res.save(out / "runs" / study, force=True)
        doc = res.to_dict()
        gpu[study] = {"images": doc.get("images_per_sample", doc["n"]), "seconds": doc["seconds"], "images_per_second": rate(doc)}
        if study == "evaluate":
            rec["evaluate"] = {"accuracy": doc["accuracy"]}
        elif study == "lesion":
            rec["lesion"] = [lesion_table(doc), lesion_table(doc["compare"])]
        elif study == "paths":
            rec["paths"] = {"units": doc["n"], "central_95": doc["central_95"], "effective": doc["effective"]}
        else:
            rec["noise"] = {"clean": {d["model"]: d["clean"]["accuracy"] for d in (doc, doc["compare"])},
                            "grid": {d["model"]: [{k: g[k] for k in ("layers", "sigma", "accuracy_mean", "ci95")}
                                                  for g in d["grid"] if g["kind"] == "activation"]
                                     for d in (doc, doc["compare"])}}
        rec["speed_device"] = gpu

    # The lesion executor against one pass per deleted unit, on the device, each timed after a warm-up.
    if budget.allows("lesion executor against the naive loop", 20):
        part = test.subset(balanced_subset(test.labels, min(len(test), 2000), 0))
        view = units(resnet.to(dev).eval())
        variants = build_variants(view, ["all-single"])

        def executor(ds):
            run_lesion(resnet, ds, variants, Runtime(device=dev, batch_size=BATCH), view=view)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        warm = part.subset(torch.arange(BATCH))
        executor(warm)
        naive_all_single(resnet, warm, dev)
        start = time.perf_counter()
        executor(part)
        ours = time.perf_counter() - start
        naive = naive_all_single(resnet, part, dev)
        rec["executor"] = {"images": len(part), "variants": len(variants), "executor_seconds": ours,
                           "naive_seconds": naive, "speedup": naive / ours}

    # The same studies on the CPU, on fewer images: the ratio of images per second.
    cpu: dict[str, dict] = {}
    if dev.type == "cuda":
        few, train_few = (replace(d, images=d.images.cpu()) for d in (
            test.subset(balanced_subset(test.labels, CPU_IMAGES, 0)),
            train.subset(balanced_subset(train.labels, CPU_IMAGES, 0))))
        for study, kw in study_args.items():
            if not budget.allows(f"{study} on the CPU", 20):
                break
            kw = {**kw, "images": 32} if study == "paths" else kw
            doc = getattr(fa, study)(resnet, train_few if study == "paths" else few, device="cpu",
                                     batch_size=BATCH, **kw).to_dict()
            cpu[study] = {"images": doc.get("images_per_sample", doc["n"]), "seconds": doc["seconds"],
                          "images_per_second": rate(doc)}
            rec["speed_cpu"] = cpu

    rec["seconds"] = round(time.time() - t0, 1)
    (out / "veit.md").write_text(markdown(rec.doc))
    print((out / "veit.md").read_text(), flush=True)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(doc: dict) -> str:
    """The figures of veit.json as the tables of bench/README.md, Veit's beside them."""
    s = doc["setup"]
    lines = [f"## Veit et al. 2016 on converged networks: {' vs '.join(s['models'])}", "",
             f"{s['gpu'] or s['device']}, torch {s['torch']}; {s['train_images']:,} training and {s['test_images']:,} "
             f"test images, batch {s['batch']}, {doc.get('training', {}).get('epochs', '?')} epochs, "
             f"recipe {s['recipe']}.", ""]
    if "trained" in doc:
        lines += ["| model | epochs | test error | training s | training images/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {t['epochs']} | {_pct(t['test_error'])} | {t['seconds']} | "
                  f"{t['train_images_per_second']:,.0f} |" for n, t in doc["trained"].items()]
        lines.append("")
    if "lesion" in doc:
        lines += ["| | " + " | ".join(t["model"] for t in doc["lesion"]) + " | Veit et al. |", "|---|---:|---:|---|"]
        rows = [("intact error", [_pct(t["intact_error"]) for t in doc["lesion"]], VEIT["error"]),
                ("one unit deleted, mean error (not downsampling)",
                 [_pct(t["single_mean_error_not_downsampling"]) for t in doc["lesion"]], VEIT["plain"]),
                ("one unit deleted, worst error", [_pct(t["single_worst_error"]) for t in doc["lesion"]], ""),
                ("reordered units, mean error", [_pct(t["reorder_mean_error"]) for t in doc["lesion"]], "")]
        rows += [(f"{k} random units deleted, mean error", [_pct(t["k_curve"].get(k)) for t in doc["lesion"]],
                  VEIT["k"] if i == 0 else "") for i, k in enumerate(doc["lesion"][0]["k_curve"])]
        lines += [f"| {a} | {' | '.join(b)} | {c} |" for a, b, c in rows]
        lines += ["", "Error with one unit deleted (D: a downsampling unit):", "",
                  "| unit | " + " | ".join(t["model"] for t in doc["lesion"]) + " |", "|---|---:|---:|"]
        plain = {r["unit"]: r for r in doc["lesion"][1]["single"]}
        for r in doc["lesion"][0]["single"]:
            p = plain.get(r["unit"])
            lines.append(f"| {r['unit']}{' (D)' if r['downsampling'] else ''} | {_pct(r['error'])} | "
                         f"{_pct(p['error']) if p else 'not lesionable'} |")
        lines.append("")
    if "paths" in doc:
        p, e = doc["paths"], doc["paths"]["effective"]
        lines += [f"Paths ({p['units']} units): 95% of the paths are {p['central_95']['lo']}-{p['central_95']['hi']} "
                  f"units long; 90% of the gradient comes from paths {e['lo']}-{e['hi']} long "
                  f"({100 * e['paths_fraction']:.2f}% of the paths), mean effective length "
                  f"{e['mean_effective_length']:.1f} against a mean path length of {e['mean_path_length']:.1f}. "
                  f"Veit et al.: {VEIT['paths']}.", ""]
    if "noise" in doc:
        n = doc["noise"]
        lines += ["Noise on n random conv layers (sigma relative to each layer's activation std), accuracy:", "",
                  "| model | clean | " + " | ".join(f"n={g['layers']}, sigma {g['sigma']:g}"
                                                    for g in next(iter(n["grid"].values()))) + " |",
                  "|---|---:|" + "---:|" * len(next(iter(n["grid"].values())))]
        lines += [f"| {m} | {n['clean'][m]:.3f} | " + " | ".join(f"{g['accuracy_mean']:.3f}" for g in grid) + " |"
                  for m, grid in n["grid"].items()]
        lines.append("")
    if "speed_device" in doc:
        cpu = doc.get("speed_cpu", {})
        lines += ["The same study on both (lesion and noise with the plain twin beside):", "",
                  "| study | device images/s | CPU images/s | device / CPU |", "|---|---:|---:|---:|"]
        for k, g in doc["speed_device"].items():
            c = cpu.get(k)
            cpu_rate = f"{c['images_per_second']:,.0f}" if c else "-"
            ratio = f"{g['images_per_second'] / c['images_per_second']:.1f}" if c else "-"
            lines.append(f"| {k} | {g['images_per_second']:,.0f} | {cpu_rate} | {ratio} |")
        lines.append("")
    if "executor" in doc:
        e = doc["executor"]
        lines += [f"Lesion executor, all-single on {e['images']:,} images ({e['variants']} variants): "
                  f"{e['executor_seconds']:.2f} s against {e['naive_seconds']:.2f} s for a pass per variant "
                  f"({e['speedup']:.1f}x).", ""]
    if doc.get("cut"):
        lines += ["Cut to meet the budget: " + "; ".join(doc["cut"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
