"""The fastablate command line: parse, call the runner, print.

Study commands (train, eval, attack, ...) are made from the study registry: each option
comes from a field of a study's spec or of the shared :class:`~fastablate.engines.core.setup.Setup`,
so nothing about a study is written here. Commands import torch lazily, so
``fastablate --help`` stays fast. Bad input of any kind ends in one line ``Error: ...`` on
stderr and exit status 2.
"""
from __future__ import annotations

import os
import signal
import sys

import click

from fastablate import __version__
from fastablate.commands import StudyCommand
from fastablate.config import ENV_PREFIX
from fastablate.errors import FastablateError, Terminated


def _echo_main(message: str, err: bool = False) -> None:
    """Print from process 0 only (under torchrun, every process runs the command)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(message, err=err)


def _leave_together() -> None:
    """Under torchrun, wait (a while) for the other processes to meet the same bad input, then
    all exit 2 at once (torchrun stops the others as soon as one process ends). Bad input found
    before the process group was joined (an option's value) joins it for this."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    from fastablate.engines.core.distributed import leave

    if leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


class Group(click.Group):
    """Lists study commands from the registry without importing them; prints usage errors and
    FastablateError as one line, exit 2, no traceback (under torchrun: from process 0, and
    every process exits 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.UsageError, FastablateError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            _echo_main(f"Error: {' '.join(msg.split())}", err=True)
            _leave_together()
            sys.exit(2)
        except OSError as e:  # a file that cannot be read or written: unwritable, full disk, gone
            where = f" {e.filename}" if e.filename else ""
            _echo_main(f"Error: cannot read or write{where}: {e.strerror or e}", err=True)
            sys.exit(2)
        except click.Abort as e:
            if isinstance(e.__cause__, Terminated):
                click.echo("Terminated", err=True)
                sys.exit(128 + signal.SIGTERM)
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        if "torch" in sys.modules:
            from fastablate.engines.core.distributed import close

            close()
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx):
        from fastablate.engines import commands

        return sorted(set(super().list_commands(ctx)) | set(commands()) | set(WORKFLOWS))

    def get_command(self, ctx, name):
        from fastablate.engines import commands

        if name in WORKFLOWS:
            return WORKFLOWS[name][0]()
        if name in self.commands or name not in commands():
            return super().get_command(ctx, name)
        return StudyCommand(name, callback=_run)

    def format_commands(self, ctx, formatter):
        from fastablate.engines import commands

        rows = [(n, c.get_short_help_str(60)) for n, c in self.commands.items()]
        rows += [(name, summary) for name, (_, summary) in WORKFLOWS.items()]
        for name, entries in commands().items():
            main = [e for e in entries if e.name == name] or entries[-1:]
            others = [e.name for e in entries if e not in main]
            rows.append((name, main[0].summary + (f" (also: {', '.join(others)})" if others else "")))
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


def _run(command: StudyCommand) -> None:
    """A study command's callback: run the chosen study, print its report."""
    from fastablate.engines.core.runner import run_study

    study, setup, spec = command.choose(click.get_current_context())
    outcome = run_study(study, setup, spec, progress=True)
    _echo_main(outcome.report)
    _echo_main(f"results: {outcome.path}")


@click.group(cls=Group, context_settings={"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastablate")
def cli():
    """Lesion, noise and adversarial robustness studies of ResNets and VGGs."""


@cli.command()
@click.option("--layers", "layers_of", metavar="MODEL", default=None,
              help="List the layers of MODEL (names for features --layers) with their output shapes.")
@click.option("--units", "units_of", metavar="MODEL", default=None,
              help="List the units of MODEL (a registry name, timm:NAME or file.py:factory) as the studies see "
                   "them: name, kind, shapes, parameters.")
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True,
              help="With --layers or --units.")
def models(layers_of, units_of, image_size):
    """List the registry models with parameters and units."""
    from fastablate.engines.core.runtime import table
    from fastablate.models import MODELS, build_model, count_parameters, is_external
    from fastablate.models.registry import PATTERNS
    from fastablate.units import units

    if units_of:
        model = build_model(units_of, None if is_external(units_of) else 10, image_size=image_size)
        view = units(model, (3, image_size, image_size))
        click.echo(table(view.rows()))
        click.echo(f"{model.name}: {len(view.units)} units, {len(view.lesionable())} lesionable")
        return
    if layers_of:
        from fastablate.units.layers import layer_shapes

        model = build_model(layers_of, 10, image_size=image_size)
        kinds = dict(model.net.named_modules())
        click.echo(table([{"layer": n, "type": type(kinds[n]).__name__, "output": "x".join(map(str, shape))}
                          for n, shape in layer_shapes(model, image_size).items()]))
        return
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    rows = []
    for name, spec in MODELS.items():
        with torch.device("meta"):  # shapes and counts only: no memory, no initialization
            m = build_model(name, 10)
        for bn in m.modules():  # shape-preserving, and slow on the meta device: skipped for the shapes
            if isinstance(bn, _BatchNorm):
                bn.forward = torch.nn.Identity()
        view = units(m)
        rows.append({"model": name, "family": spec.family, "params": f"{count_parameters(m) / 1e6:.2f}M",
                     "units": len(view.units), "lesionable": len(view.lesionable()), "description": spec.description})
    click.echo(table(rows))
    for _, pattern in PATTERNS:
        click.echo(f"and by name: {pattern}")


@cli.command()
def datasets():
    """List the registry datasets."""
    from fastablate.data import DATASETS
    from fastablate.engines.core.runtime import table

    click.echo(table([{"dataset": s.name, "needs --data-dir": "yes" if s.needs_root else "no",
                       "description": s.description} for s in DATASETS.values()]))


@cli.group()
def data():
    """Saved adversarial sets: cut one into disjoint parts, say what one holds."""


@data.command("split")
@click.argument("file")
@click.option("--parts", required=True, metavar="N,N,..", help="Examples per part, e.g. 10000,1000.")
@click.option("--out", "outs", required=True, metavar="FILE,FILE,..", help="One file per part.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the order.")
@click.option("--force", is_flag=True, help="Replace output files that exist.")
def data_split(file, parts, outs, seed, force):
    """Cut FILE (attack --save-dataset) into disjoint parts, stratified by class where the counts
    allow: fastablate data split adv-train.pt --parts 10000,1000 --out aug.pt,perturbed-train.pt"""
    from fastablate.data.adversarial import split_file
    from fastablate.engines.core.runtime import table

    rows, left = split_file(file, parts, outs, seed, force)
    click.echo(table(rows))
    if left:
        click.echo(f"{left} examples of {file} are in no part")


@data.command("info")
@click.argument("file")
def data_info(file):
    """What FILE (attack --save-dataset, or a part of one) holds: examples per class, the
    attack and its budget, the model and the source split."""
    from fastablate.data.adversarial import describe, read_set
    from fastablate.engines.core.runtime import table

    rows = describe(read_set(file), file)
    click.echo(table(rows[:-1]))
    click.echo(table([rows[-1]]))


@cli.command()
def info():
    """Versions, compiled kernels of every op (CPU/CUDA), devices, threads."""
    import torch

    from fastablate.ops import kernel_status
    from fastablate.rundir import versions

    for k, v in versions().items():
        if k != "kernels":
            click.echo(f"{k:12s} {v}")
    for op, devices in kernel_status().items():
        click.echo(f"{op:20s} " + "  ".join(f"{d}: {'kernel' if ok else 'reference'}" for d, ok in devices.items()))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    click.echo(f"{'devices':12s} cpu{''.join(f', cuda:{i} ({n})' for i, n in enumerate(gpus))}")
    click.echo(f"{'threads':12s} {torch.get_num_threads()}")


def sweep_command() -> click.Command:
    """sweep: its options from SweepSpec, then the base command after ``--``."""
    from fastablate.commands import SpecCommand
    from fastablate.engines.workflows.sweep import SweepSpec

    grid = click.Option(["--grid"], multiple=True, metavar="OPTION=V,V,..",
                        help="A swept option of the base command and its values (repeatable; separate values with "
                             "; when a value holds commas).")
    return SpecCommand("sweep", [SweepSpec], _sweep, params=[grid, click.Argument(["base"], nargs=-1,
                                                                                   type=click.UNPROCESSED)],
                       context_settings={"ignore_unknown_options": True},
                       short_help="Grids over options of train/eval/attack/...: heatmaps, resumable, Ray.",
                       help="Run a grid over options of any study command, each point a full run, with a table and "
                            "heatmaps of every pair of swept options; resumable; locally or on Ray.\n\n"
                            "fastablate sweep --grid lr=0.05,0.1,0.2 --grid batch-size=128,256 --repeat 2 "
                            "--out runs/sweep -- train --model resnet20 --epochs 5\n\n"
                            "A --config file may hold grid (a list of OPTION=V,V,.. lines) and base (the command and "
                            "its options, as a list); options after -- then extend its base command.")


def _sweep(values: dict, grid, base) -> None:
    from fastablate.engines.workflows.sweep import SweepSpec, grid_axes, run_sweep, summary

    ctx = click.get_current_context()
    configured = (ctx.default_map or {}).get("base")  # a --config's base command
    if configured and ctx.get_parameter_source("base") == click.core.ParameterSource.COMMANDLINE and base and \
            base[0].startswith("-"):
        base = (*map(str, configured), *base)  # options after -- extend the config's command
    if not base or base[0] in WORKFLOWS:
        raise FastablateError("sweep needs a base command after --, e.g. -- train --model resnet20")
    command = StudyCommand(base[0])
    study, setup, spec = command.values(command.make_context(base[0], list(base[1:]), parent=ctx))
    axes = grid_axes(grid, command.field, study)
    out, rows = run_sweep(study.name, setup, spec, axes, SweepSpec(**values.get(SweepSpec, {})), echo=click.echo)
    click.echo(summary(rows, [a.flag for a in axes]))
    click.echo(f"results: {out}")
    failed = [r for r in rows if r["status"] != "complete"]
    if failed:
        click.echo(f"sweep: {len(failed)} of {len(rows)} points failed; first: {failed[0].get('error')}", err=True)
        ctx.exit(1)


def compare_command() -> click.Command:
    """compare: training runs side by side; its options from CompareSpec."""
    from fastablate.commands import SpecCommand
    from fastablate.engines.workflows.compare import CompareSpec

    def run(values: dict, run_dirs) -> None:
        from fastablate.engines.workflows.compare import run_compare, summary

        out, rows = run_compare(run_dirs, CompareSpec(**values.get(CompareSpec, {})))
        click.echo(summary(rows))
        click.echo(f"results: {out}")
    return SpecCommand("compare", [CompareSpec], run, params=[click.Argument(["run_dirs"], nargs=-1)],
                       short_help="Training runs side by side: overlaid curves, final and best metrics, times.",
                       help="Compare finished train runs (RUN_DIR...): loss and accuracy curves of every run "
                            "overlaid, a table of final and best metrics with the epoch of the best and the training "
                            "time, beside the options that differ between the runs.\n\n"
                            "fastablate compare runs/scratch runs/imagenet --names scratch,imagenet")


def robust_command() -> click.Command:
    """robust: the robust-training protocol; its options from Setup and RobustSpec."""
    from fastablate.commands import SpecCommand
    from fastablate.engines.core.setup import Setup
    from fastablate.engines.workflows.robust import RobustSpec

    def run(values: dict) -> None:
        from fastablate.engines.core.runtime import table
        from fastablate.engines.workflows.robust import run_robust

        out, rows = run_robust(Setup(**values.get(Setup, {})), RobustSpec(**values.get(RobustSpec, {})),
                               echo=click.echo)
        click.echo(table(rows))
        click.echo(f"\nreport: {out / 'report.html'}")
    return SpecCommand("robust", [Setup, RobustSpec], run, skip={(Setup, "split"), (Setup, "compare")},
                       short_help="The robust-training protocol: baseline, attacks, disjoint sets, retraining, report.",
                       help="Fine-tune a baseline (a learning-rate x batch-size grid picks it by validation "
                            "accuracy), attack correctly classified training and test images keeping successful "
                            "examples only (optimized noise; sparse pixels for the out-of-distribution set), split "
                            "them into disjoint sets, retrain with the augmentation set appended over a grid of "
                            "initialization, frozen layers, batch size and learning rate, and report the final "
                            "model on five sets beside the baseline. Each step is a run directory inside --out; a "
                            "rerun reuses the finished ones. Default: resnet18 from ImageNet weights.")


def study_command() -> click.Command:
    """study: the whole comparison; its options from Setup and StudySpec."""
    from fastablate.commands import SpecCommand
    from fastablate.engines.core.setup import Setup
    from fastablate.engines.workflows.comparison import StudySpec, run_comparison

    def run(values: dict) -> None:
        from fastablate.engines.core.distributed import is_main

        out, parts = run_comparison(Setup(**values.get(Setup, {})), StudySpec(**values.get(StudySpec, {})),
                                    echo=click.echo)
        if not is_main():  # under torchrun: process 0 wrote the report and says where
            return
        click.echo((out / "report.md").read_text().split("## Models, data, runs")[0].strip())
        click.echo(f"\nreport: {out / 'report.html'}")
    return SpecCommand("study", [Setup, StudySpec], run, skip={(Setup, "model"), (Setup, "split")},
                       short_help="The whole comparison: train, lesion, noise, attacks, paths, features; a report.",
                       help="Train a ResNet and its plain twin (--models), or take --weights and --compare, and run "
                       "every study on them: evaluation, lesion, noise, sparse and optimized-noise attacks, paths, "
                       "features. Each part is a run directory inside --out (a rerun reuses the finished ones); "
                       "report.md and a self-contained report.html give one verdict per finding, computed from "
                       "the numbers. Default: resnet20 vs plain20 on the embedded digits.")


# Commands built on first use (their specs import torch): name -> (builder, one-line summary).
WORKFLOWS = {
    "sweep": (sweep_command, "Grids over options of any study command: heatmaps, resumable, local or Ray"),
    "study": (study_command, "The whole comparison: train, lesion, noise, attacks, paths, features; a report"),
    "compare": (compare_command, "Training runs side by side: overlaid curves, final and best metrics, times"),
    "robust": (robust_command, "The robust-training protocol: baseline, attacks, disjoint sets, retraining, report"),
}


def main() -> None:
    # SIGTERM (kill, timeout, batch schedulers) ends a run as Ctrl-C does: run.json says failed.
    signal.signal(signal.SIGTERM, _terminated)
    cli()


def _terminated(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signum} (SIGTERM)")


if __name__ == "__main__":
    main()
