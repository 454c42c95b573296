"""The fastablate command line: parse, call the runner, print.

Study commands (train, eval, attack, ...) are made from the study registry: each option
comes from a field of a study's spec or of the shared :class:`~fastablate.engines.common.Setup`,
so nothing about a study is written here. Commands import torch lazily, so
``fastablate --help`` stays fast. Bad input of any kind ends in one line ``Error: ...`` on
stderr and exit status 2.
"""
from __future__ import annotations

import inspect
import sys

import click

from fastablate import __version__
from fastablate.config import ENV_PREFIX, given, load_config, source_label
from fastablate.errors import FastablateError


class Group(click.Group):
    """Lists study commands from the registry without importing them; prints usage errors and
    FastablateError as one line, exit 2, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.UsageError, FastablateError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"Error: {' '.join(msg.split())}", err=True)
            sys.exit(2)
        except OSError as e:  # a file that cannot be read or written: unwritable, full disk, gone
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"Error: cannot read or write{where}: {e.strerror or e}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx):
        from fastablate.engines import commands

        return sorted(set(super().list_commands(ctx)) | set(commands()))

    def get_command(self, ctx, name):
        from fastablate.engines import commands

        if name in self.commands or name not in commands():
            return super().get_command(ctx, name)
        return study_command(name)

    def format_commands(self, ctx, formatter):
        from fastablate.engines import commands

        rows = [(n, c.get_short_help_str(60)) for n, c in self.commands.items()]
        for name, entries in commands().items():
            main = [e for e in entries if e.name == name] or entries[-1:]
            others = [e.name for e in entries if e not in main]
            rows.append((name, main[0].summary + (f" (also: {', '.join(others)})" if others else "")))
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


def _click_option(opt, default) -> click.Option:
    """A click option for a spec field: its raw value is read and checked by the spec's value type."""
    from fastablate.engines.spec import Flag

    shown = "" if default in (None, (), False) else f" [default: {opt.type.show(default)}]"
    decls = [opt.flag, opt.key]
    if isinstance(opt.type, Flag):
        return click.Option(decls, is_flag=True, default=False, help=opt.help)
    return click.Option(decls, type=click.UNPROCESSED, default=() if opt.multiple else None, multiple=opt.multiple,
                        metavar=opt.metavar or opt.type.metavar, help=opt.help + shown)


def study_command(command: str) -> click.Command:
    """The click command of ``command``: the shared options and every option of its studies."""
    from fastablate.engines import command_studies
    from fastablate.engines.common import Setup
    from fastablate.engines.spec import spec_options

    studies = command_studies(command)
    excluded = set.intersection(*(set(s.setup_excludes) for s in studies))
    owners = [Setup] + [s.spec_class for s in studies]
    fields: dict[str, tuple[type, str, object]] = {}  # parameter name -> (spec class, field, Option)
    params: list[click.Parameter] = []
    for cls in owners:
        for name, opt, default in spec_options(cls):
            if not opt.cli or (cls is Setup and name in excluded):
                continue
            if opt.key in fields:
                raise RuntimeError(f"{command}: option {opt.flag} is declared twice ({fields[opt.key][0].__name__}, "
                                   f"{cls.__name__})")
            fields[opt.key] = (cls, name, opt)
            params.append(_click_option(opt, default))
    params.append(click.Option(["--config"], type=click.Path(dir_okay=False), callback=load_config, is_eager=True,
                               expose_value=False, help="YAML file of option values (keys: option names)."))
    helps = []
    for s in studies[-1:] + studies[:-1]:  # the default study first
        doc = inspect.cleandoc(s.__doc__ or s.name)
        helps.append(f"With {', '.join(s.spec_class.flag(t) for t in s.triggers)}: {doc}" if s.triggers else doc)

    def callback(**_):
        _run(click.get_current_context(), studies, fields)
    return click.Command(command, params=params, callback=callback, help="\n\n".join(helps))


def _select(studies: list, fields: dict, keys: list[str]):
    """The study the given options choose: one whose trigger options are given, else the default."""
    def flags(s):
        return [s.spec_class.flag(t) for t in s.triggers]
    given_fields = {(fields[k][0], fields[k][1]) for k in keys}
    chosen = [s for s in studies if any((s.spec_class, t) in given_fields for t in s.triggers)]
    if len(chosen) > 1:
        raise FastablateError(f"{' and '.join(flags(s)[0] for s in chosen)} choose separate studies "
                              f"({', '.join(s.name for s in chosen)}): give one")
    if chosen:
        return chosen[0]
    default = [s for s in studies if not s.triggers]
    if not default:
        raise FastablateError(f"choose a study: {'; '.join(', '.join(flags(s)) for s in studies)}")
    return default[0]


def _run(ctx: click.Context, studies: list, fields: dict) -> None:
    from fastablate.engines.common import Setup
    from fastablate.engines.runner import run_study
    from fastablate.engines.spec import parse_value

    keys = [k for k in fields if given(ctx, k)]
    study = _select(studies, fields, keys)
    values: dict[type, dict] = {Setup: {}, study.spec_class: {}}
    for key in keys:
        cls, name, opt = fields[key]
        if cls not in values:
            other = next(s for s in studies if s.spec_class is cls)
            trig = ", ".join(other.spec_class.flag(t) for t in other.triggers)
            raise FastablateError(f"{opt.flag}{source_label(ctx, key)} applies to the {other.name} study"
                                  f"{f' ({trig})' if trig else ''}, which is not given")
        values[cls][name] = parse_value(opt, ctx.params[key], source_label(ctx, key))
    outcome = run_study(study, Setup(**values[Setup]), study.spec_class(**values[study.spec_class]), progress=True)
    click.echo(outcome.report)
    click.echo(f"results: {outcome.path}")


@click.group(cls=Group, context_settings={"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastablate")
def cli():
    """Lesion, noise and adversarial robustness studies of ResNets and VGGs."""


@cli.command()
@click.option("--layers", "layers_of", metavar="MODEL", default=None,
              help="List the layers of MODEL (names for features --layers) with their output shapes.")
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True, help="With --layers.")
def models(layers_of, image_size):
    """List the registry models with parameters and units."""
    from fastablate.engines.protocol import table
    from fastablate.models import MODELS, build_model, count_parameters
    from fastablate.units import units

    if layers_of:
        from fastablate.engines.features import layer_shapes

        model = build_model(layers_of, 10, image_size=image_size)
        kinds = dict(model.net.named_modules())
        click.echo(table([{"layer": n, "type": type(kinds[n]).__name__, "output": "x".join(map(str, shape))}
                          for n, shape in layer_shapes(model, image_size).items()]))
        return
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
    from fastablate.engines.protocol import table

    click.echo(table([{"dataset": s.name, "needs --data-dir": "yes" if s.needs_root else "no",
                       "description": s.description} for s in DATASETS.values()]))


@cli.command()
def info():
    """Versions, compiled kernels of every op (CPU/CUDA), devices, threads."""
    import torch

    from fastablate.ops import kernel_status
    from fastablate.results import versions

    for k, v in versions().items():
        if k != "kernels":
            click.echo(f"{k:12s} {v}")
    for op, devices in kernel_status().items():
        click.echo(f"{op:20s} " + "  ".join(f"{d}: {'kernel' if ok else 'reference'}" for d, ok in devices.items()))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    click.echo(f"{'devices':12s} cpu{''.join(f', cuda:{i} ({n})' for i, n in enumerate(gpus))}")
    click.echo(f"{'threads':12s} {torch.get_num_threads()}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
