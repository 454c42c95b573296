"""The fastablate command line: parse, build a config, call an engine, write and print.

Commands import torch lazily, so ``fastablate --help`` stays fast. Bad input of any kind
ends in one line ``Error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from fastablate import __version__
from fastablate.config import ATTACKS, AttackConfig, CommonConfig, EvalConfig, TrainConfig, parse_floats, validate
from fastablate.errors import FastablateError


class Group(click.Group):
    """Prints usage errors and FastablateError as one line, exit 2, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.UsageError, FastablateError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"Error: {msg}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE.yaml: its keys become the command's defaults (flags and env still win)."""
    if not value:
        return value
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FastablateError(f"--config {value!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FastablateError(f"--config {value!r}: expected a mapping of option: value")
    names = {p.name for p in ctx.command.params}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FastablateError(f"--config {value!r}: unknown option(s) {', '.join(unknown)} for "
                              f"'{ctx.command.name}'; valid: {', '.join(sorted(names - {'config'}))}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def common_options(f):
    """Options every model/data command shares."""
    opts = [
        click.option("--model", default=None, help="Registry model name (fastablate models)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint: ours, or a foreign state_dict (then --model, --mean/--std)."),
        click.option("--dataset", default="digits", show_default=True, help="Registry dataset (fastablate datasets)."),
        click.option("--data-dir", default=None, help="Root of the dataset on disk."),
        click.option("--split", type=click.Choice(["train", "test"]), default=None, help="Split to use."),
        click.option("--limit", type=int, default=None, help="Seeded class-balanced subset of N examples."),
        click.option("--mean", default=None, help="Input normalization mean per channel, e.g. 0.49,0.48,0.45."),
        click.option("--std", default=None, help="Input normalization std per channel."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Images."),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Loader processes for file-backed datasets."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Output directory [default: runs/<command>-<timestamp>]."),
        click.option("--download", is_flag=True, help="Let torchvision download CIFAR when absent."),
        click.option("--config", type=click.Path(dir_okay=False, exists=True), callback=_load_config, is_eager=True,
                     expose_value=False, help="YAML file of option defaults."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _config(cls, params: dict) -> CommonConfig:
    params = dict(params)
    params["mean"] = parse_floats(params.get("mean"), "--mean")
    params["std"] = parse_floats(params.get("std"), "--std")
    if params.get("split") is None:
        params.pop("split", None)
    cfg = cls(**params)
    validate(cfg)
    return cfg


def table(rows: list[dict]) -> str:
    """A plain fixed-width table."""
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "FASTABLATE", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastablate")
def cli():
    """Lesion, noise and adversarial robustness studies of ResNets and VGGs."""


@cli.command()
def models():
    """List the registry models with parameters and units."""
    from fastablate.models import MODELS, build_model, count_parameters
    from fastablate.units import units

    rows = []
    for name, spec in MODELS.items():
        m = build_model(name, 10)
        view = units(m)
        rows.append({"model": name, "family": spec.family, "params": f"{count_parameters(m) / 1e6:.2f}M",
                     "units": len(view.units), "lesionable": len(view.lesionable()), "description": spec.description})
    click.echo(table(rows))


@cli.command()
def datasets():
    """List the registry datasets."""
    from fastablate.data import DATASETS

    click.echo(table([{"dataset": s.name, "needs --data-dir": "yes" if s.needs_root else "no",
                       "description": s.description} for s in DATASETS.values()]))


@cli.command()
def info():
    """Versions, compiled kernels, devices, threads."""
    import torch

    from fastablate import _ext
    from fastablate.results import versions

    for k, v in versions().items():
        click.echo(f"{k:12s} {v}")
    click.echo(f"{'cpu kernels':12s} {'loaded' if _ext.has_kernel(torch.device('cpu')) else 'not loaded'}")
    click.echo(f"{'cuda kernels':12s} {'loaded' if _ext.has_kernel(torch.device('cuda')) else 'not loaded'}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    click.echo(f"{'devices':12s} cpu{''.join(f', cuda:{i} ({n})' for i, n in enumerate(gpus))}")
    click.echo(f"{'threads':12s} {torch.get_num_threads()}")


def _load_checkpoint(command: str, cfg: CommonConfig):
    """(device, dataset, model on the device) of a command that needs --weights."""
    if not cfg.weights:
        raise FastablateError(f"{command} needs --weights CHECKPOINT")
    from fastablate.engines.common import load_data, load_or_build_model, resolve_device

    device = resolve_device(cfg.device)
    ds = load_data(cfg)
    model = load_or_build_model(cfg, ds).to(device)
    cfg.model = model.arch
    return device, ds, model


def _open_run(command: str, cfg: CommonConfig, device, resume: bool = False):
    from fastablate.results import RunDir, default_out

    return RunDir(cfg.out or default_out(command), command, cfg.to_dict(), device=str(device),
                  seed=cfg.seed).start(resume=resume)


@cli.command()
@common_options
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True, help="Learning rate per 128 images.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
def train(**params):
    """Train a model (default: resnet8 on the embedded digits) and evaluate it each epoch.

    --limit applies to both splits. --weights initializes from a checkpoint.
    """
    cfg = _config(TrainConfig, params)
    if cfg.resume and not cfg.out:
        raise FastablateError("--resume needs --out DIR of the run to continue")
    from fastablate.engines.common import load_data, load_or_build_model, resolve_device
    from fastablate.engines.train import load_resume_state, plot_history, train as train_engine

    device = resolve_device(cfg.device)
    train_set = load_data(cfg, "train")
    test_set = load_data(cfg, "test", image_size=train_set.image_size)
    model = load_or_build_model(cfg, train_set, default_arch="resnet8")
    cfg.model = model.arch
    state = load_resume_state(Path(cfg.out), model.arch) if cfg.resume else None
    with _open_run("train", cfg, device, resume=cfg.resume) as run:
        res = train_engine(cfg, model, train_set, test_set, run, device, state)
        run.timings["train_s"] = round(res.seconds, 3)
        results = {"accuracy": res.final.accuracy, "loss": res.final.loss, "epochs": len(res.history),
                   "checkpoint": str(res.checkpoint), "test": res.final.to_dict(), "history": res.history}
        run.write_results(results, res.history)
        plot_history(res.history, run.plot_path("training"))
    click.echo(table(res.final.rows()))
    click.echo(f"\n{model.arch} on {train_set.name}: test accuracy {res.final.accuracy:.4f} "
               f"({res.final.n} images), loss {res.final.loss:.4f}")
    click.echo(f"checkpoint: {res.checkpoint}\nresults: {run.path}")


@cli.command("eval")
@common_options
@click.option("--lesion", multiple=True, metavar="PLAN",
              help="Lesion study (repeatable): all-single | k-random | reorder | units:NAME,NAME.")
@click.option("--k", default=None, help="k-random: numbers of deleted units, e.g. 1,2,4 [default: 1..all].")
@click.option("--samples", type=int, default=20, show_default=True,
              help="k-random: random sets per k; reorder: orders.")
@click.option("--max-memory", default=None,
              help="Activations per chunk of lesion variants, e.g. 2G [default: 1/4 of free RAM, 1/2 of free GPU].")
@click.option("--noise-layers", default=None,
              help="Noise: numbers of random conv layers perturbed per trial, e.g. 1,2,3.")
@click.option("--noise-at", default=None, help="Noise: named conv layers instead, e.g. layer1.0.conv1,layer2.1.conv2.")
@click.option("--noise-every", type=int, default=None, help="Noise: every n-th conv layer instead.")
@click.option("--noise-p", default="1", show_default=True,
              help="Noise: probabilities that a chosen layer is perturbed.")
@click.option("--noise-sigma", default=None, help="Noise: std values, e.g. 0.1,0.5,1.0.")
@click.option("--noise-relative", is_flag=True, help="Noise: sigma times each layer's activation std.")
@click.option("--input-noise", default=None,
              help="Noise on the images: CIFAR-10-C gaussian_noise severities, e.g. 1,3,5.")
@click.option("--trials", type=int, default=10, show_default=True, help="Noise: trials per grid point.")
@click.option("--compare", type=click.Path(dir_okay=False), default=None,
              help="A second checkpoint run through the same study and drawn on the same plots.")
def eval_(**params):
    """Evaluate a checkpoint: accuracy, loss, per-class accuracy, confusion matrix.

    With --lesion, a lesion study (Veit et al. 2016): units deleted or reordered at test
    time, every variant evaluated on the same images. With --noise-sigma, Gaussian noise on
    the outputs of conv layers; with --input-noise, on the images.
    """
    params["lesion"] = tuple(params["lesion"])
    cfg = _config(EvalConfig, params)
    device, ds, model = _load_checkpoint("eval", cfg)
    if cfg.lesion:
        return _lesion(cfg, model, ds, device)
    if cfg.noise:
        return _noise(cfg, model, ds, device)
    from fastablate.engines.evaluate import evaluate

    with _open_run("eval", cfg, device) as run:
        res = evaluate(model, ds, batch_size=cfg.batch_size, device=device, show_progress=True, workers=cfg.workers)
        run.timings["eval_s"] = round(res.seconds, 3)
        run.write_results(res.to_dict(), res.rows())
        _plot_confusion(res, run.plot_path("confusion"))
    click.echo(table(res.rows()))
    click.echo(f"\n{model.arch} on {ds.name}/{ds.split}: accuracy {res.accuracy:.4f} ({res.n} images), "
               f"loss {res.loss:.4f}\nresults: {run.path}")


def _lesion(cfg: EvalConfig, model, ds, device) -> None:
    """eval --lesion: build every model's variants (all bad input fails here), then run and write."""
    from fastablate.config import parse_ints, parse_size
    from fastablate.engines.lesion import build_variants, plot_lesion, run_lesion, summary
    from fastablate.units import units

    ks = parse_ints(cfg.k, "--k")
    studies = []
    for name, m in _study_models(cfg, model, ds, device):
        view = units(m, (3, ds.image_size, ds.image_size))
        studies.append((name, m, view, build_variants(view, cfg.lesion, ks=ks, samples=cfg.samples, seed=cfg.seed,
                                                        model_name=name)))
    with _open_run("eval", cfg, device) as run:
        results = []
        for name, m, view, variants in studies:
            results.append(run_lesion(m, ds, variants, view=view, batch_size=cfg.batch_size, device=device,
                                      max_memory=parse_size(cfg.max_memory, "--max-memory"), show_progress=True,
                                      workers=cfg.workers, model_name=name))
            run.timings[f"lesion_{name}_s"] = round(results[-1].seconds, 3)
        _write_study(run, results, {"plans": list(cfg.lesion)}, plot_lesion)
    for r in results:
        click.echo(table(summary(r)))
        if r.unlesionable:
            click.echo("not lesionable: " + "; ".join(f"{u['unit']} ({u['reason']})" for u in r.unlesionable))
        click.echo(f"{r.model}: {len(r.variants)} variants on {r.n} images of {ds.name}/{ds.split} in "
                   f"{r.seconds:.1f}s ({r.unit_evaluations / r.naive_unit_evaluations:.2f} of the naive loop's "
                   "unit evaluations)\n")
    click.echo(f"results: {run.path}")


@cli.command()
@common_options
@click.option("--attack", type=click.Choice(ATTACKS), default="sparse", show_default=True)
@click.option("--pixels", type=float, default=None,
              help="sparse: budget as a fraction of the H*W pixels, e.g. 0.005 (5 of 32x32) [default: 0.005].")
@click.option("--k", type=int, default=None, help="sparse: budget in pixels (instead of --pixels).")
@click.option("--steps", type=int, default=None,
              help="Gradient steps: per restart (sparse) [default: 30], in all (noise [100], pgd, pgd-l2 [20]).")
@click.option("--restarts", type=int, default=1, show_default=True,
              help="sparse: starts of the pixel score per image (later ones random).")
@click.option("--step", type=float, default=None,
              help="Step size [default: 1 (sparse: to the corners of [0, 1]), eps/4 (pgd, pgd-l2)].")
@click.option("--eps", type=float, default=None,
              help="fgsm, pgd: L-inf radius [default: 8/255]; pgd-l2: L2 radius [default: 0.5].")
@click.option("--lam", type=float, default=0.01, show_default=True, help="noise: weight of the squared L2 norm.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="noise: Adam learning rate.")
@click.option("--target", type=int, default=None, help="Targeted attack towards this class index.")
@click.option("--save-examples", is_flag=True, help="Write adversarial.pt and plots/examples.png.")
@click.option("--save-dataset", type=click.Path(dir_okay=False), default=None,
              help="Write the split with adversarial images (uint8) to this file, for adversarial augmentation.")
def attack(**params):
    """Attack a checkpoint: sparse pixels (L0), optimized noise (L2), FGSM or PGD.

    Only images the model classifies correctly are attacked; success_rate is the fraction of
    them it fools.
    """
    cfg = _config(AttackConfig, params)
    device, ds, model = _load_checkpoint("attack", cfg)
    import torch

    from fastablate.engines.attacks import AttackSpec, run_attack, save_grid
    from fastablate.models.checkpoint import atomic_save

    pixels, fraction = ds.image_size * ds.image_size, cfg.pixels or 0.005
    k = cfg.k if cfg.k is not None else round(fraction * pixels)
    if cfg.attack == "sparse" and not 1 <= k <= pixels:
        raise FastablateError(f"--pixels {fraction:g} rounds to {k} pixels of {ds.image_size}x{ds.image_size} images;"
                              " give a larger fraction or --k" if cfg.k is None else
                              f"--k {k} is more than the {pixels} pixels of an image")
    if cfg.target is not None and cfg.target >= ds.num_classes:
        raise FastablateError(f"--target {cfg.target} is not a class of {ds.name} (0..{ds.num_classes - 1})")
    if cfg.target is not None and bool((ds.labels == cfg.target).all()):
        raise FastablateError(f"--target {cfg.target} equals the label of every image: nothing to attack")
    eps = cfg.eps or (0.5 if cfg.attack == "pgd-l2" else 8 / 255)
    steps = cfg.steps or {"sparse": 30, "noise": 100}.get(cfg.attack, 20)
    spec = AttackSpec(attack=cfg.attack, k=k, steps=steps, restarts=cfg.restarts,
                      step=cfg.step or (1.0 if cfg.attack == "sparse" else eps / 4), eps=eps, lam=cfg.lam,
                      lr=cfg.lr, target=cfg.target, seed=cfg.seed)
    with _open_run("attack", cfg, device) as run:
        keep = cfg.save_examples or bool(cfg.save_dataset)
        res, ex = run_attack(model, ds, spec, batch_size=cfg.batch_size, device=device, workers=cfg.workers,
                             show_progress=True, model_name=model.arch, keep=keep)
        run.timings["attack_s"] = round(res.seconds_per_image * res.attacked, 3)
        out = {**res.to_dict(), "k": k if cfg.attack == "sparse" else None, "spec": spec.__dict__}
        if cfg.save_examples:
            atomic_save({key: ex[key] for key in ("x", "x_adv", "y", "pred_adv", "attacked", "success")},
                        run.path / "adversarial.pt")
            save_grid(ex, run.plot_path("examples"))
        if cfg.save_dataset:
            atomic_save({"images": ex["x_adv"].mul(255).round().to(torch.uint8), "labels": ex["y"],
                         "success": ex["success"], "attacked": ex["attacked"], "classes": list(ds.classes),
                         "attack": spec.__dict__, "dataset": ds.name, "split": ds.split}, cfg.save_dataset)
        run.write_results(out, [res.to_dict()])
    click.echo(table([{k_: v for k_, v in res.to_dict().items() if k_ != "model"}]))
    budget = f" at {k} pixels" if cfg.attack == "sparse" else ""
    click.echo(f"\n{model.arch} on {ds.name}/{ds.split}: {cfg.attack}{budget} fooled {res.success_rate:.4f} of "
               f"{res.attacked} correctly classified images; robust accuracy {res.robust_accuracy:.4f} "
               f"(clean {res.clean_accuracy:.4f})\nresults: {run.path}")


def _write_study(run, results: list, extra: dict, plot) -> None:
    """results.json: the first model's study, ``extra``, and the --compare model's under "compare";
    results.csv: the rows of both; then the plots."""
    out = {**extra, **results[0].to_dict()}
    if len(results) > 1:
        out["compare"] = results[1].to_dict()
    run.write_results(out, [row for r in results for row in r.rows()])
    plot(results, run.plot_path)


def _study_models(cfg: EvalConfig, model, ds, device) -> list:
    """[(name, model)]: the model, and the --compare checkpoint's."""
    from dataclasses import replace

    from fastablate.engines.common import load_or_build_model

    models = [(model.arch, model)]
    if cfg.compare:
        other = load_or_build_model(replace(cfg, weights=cfg.compare, model=None), ds).to(device)
        name = other.arch if other.arch != model.arch else f"{other.arch} ({Path(cfg.compare).name})"
        models.append((name, other))
    return models


def _noise(cfg: EvalConfig, model, ds, device) -> None:
    """eval --noise-sigma / --input-noise: the grid for each model, then write and print."""
    from fastablate.config import parse_ints
    from fastablate.engines.noise import NoiseSpec, comparison_table, conv_layers, plot_noise, resolve_layers, run_noise

    spec = NoiseSpec(layers=parse_ints(cfg.noise_layers, "--noise-layers") or (),
                     at=tuple(cfg.noise_at.split(",")) if cfg.noise_at else (), every=cfg.noise_every,
                     p=parse_floats(cfg.noise_p, "--noise-p") or (1.0,),
                     sigma=parse_floats(cfg.noise_sigma, "--noise-sigma") or (),
                     relative=cfg.noise_relative, input_severities=parse_ints(cfg.input_noise, "--input-noise") or (),
                     trials=cfg.trials, seed=cfg.seed)
    models = _study_models(cfg, model, ds, device)
    for name, m in models:  # bad layer choices fail before anything is written
        if spec.sigma:
            resolve_layers(spec, [n for n, _ in conv_layers(m)], name)
    with _open_run("eval", cfg, device) as run:
        results = []
        for name, m in models:
            results.append(run_noise(m, ds, spec, batch_size=cfg.batch_size, device=device, workers=cfg.workers,
                                     show_progress=True, model_name=name))
            run.timings[f"noise_{name}_s"] = round(results[-1].seconds, 3)
        _write_study(run, results, {"table": comparison_table(results)}, plot_noise)
    click.echo(table([{k: r[k] for k in ("model", "kind", "layers", "p", "sigma", "severity", "accuracy_mean",
                                          "accuracy_std", "ci95_low", "ci95_high")} for res in results
                      for r in res.rows()]))
    if spec.sigma:
        click.echo("\n" + table(comparison_table(results)))
    for r in results:
        click.echo(f"{r.model}: clean accuracy {r.clean['accuracy']:.4f} on {r.n} images of {ds.name}/{ds.split}; "
                   f"{len(r.grid)} grid points x {spec.trials} trials in {r.seconds:.1f}s")
    click.echo(f"results: {run.path}")


def _plot_confusion(res, path: Path) -> None:
    from fastablate.plots import pyplot, save

    k = len(res.classes)
    fig, ax = pyplot().subplots(figsize=(1.2 + 0.45 * k, 1 + 0.45 * k))
    ax.imshow(res.confusion, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"accuracy {res.accuracy:.4f}")
    ax.set_xticklabels(res.classes, rotation=90)
    ax.set_yticklabels(res.classes)
    save(fig, path)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
