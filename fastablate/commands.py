"""Study commands made from the specs: every option of a study command is a field of the
shared :class:`~fastablate.engines.core.setup.Setup` or of one of its studies' specs, read and
checked by that field's value type, wherever the value comes from (flag, environment,
``--config``). Nothing imports torch until a command is built.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import click

from fastablate.config import given, load_config, source_label
from fastablate.errors import FastablateError


def click_option(opt, default) -> click.Option:
    """A click option for a spec field: its raw value is read and checked by the spec's value type."""
    from fastablate.engines.core.spec import Flag

    shown = "" if default in (None, (), False) else f" [default: {opt.type.show(default)}]"
    decls = [opt.flag, opt.key]
    if isinstance(opt.type, Flag):
        return click.Option(decls, is_flag=True, default=False, help=opt.help)
    if opt.flag_value is not None:  # the flag alone stands for flag_value
        return click.Option(decls, type=click.UNPROCESSED, default=None, is_flag=False, flag_value=opt.flag_value,
                            metavar=f"[{opt.metavar or opt.type.metavar}]", help=opt.help + shown)
    return click.Option(decls, type=click.UNPROCESSED, default=() if opt.multiple else None, multiple=opt.multiple,
                        metavar=opt.metavar or opt.type.metavar, help=opt.help + shown)


def spec_fields(specs, skip=(), defaults=None) -> tuple[dict[str, tuple[type, str, Any]], list[click.Parameter]]:
    """(parameter name -> (spec class, field, Option), click options) of the option fields of
    ``specs`` (``skip``: (spec class, field) pairs left out; ``defaults``: (spec class, field) ->
    the default a command's help shows instead of the field's)."""
    from fastablate.engines.core.spec import spec_options

    fields: dict[str, tuple[type, str, Any]] = {}
    params: list[click.Parameter] = []
    for cls in specs:
        for name, opt, default in spec_options(cls):
            if not opt.cli or (cls, name) in skip:
                continue
            if opt.key in fields:
                raise RuntimeError(f"option {opt.flag} is declared twice ({fields[opt.key][0].__name__}, "
                                   f"{cls.__name__})")
            fields[opt.key] = (cls, name, opt)
            params.append(click_option(opt, (defaults or {}).get((cls, name), default)))
    return fields, params


def spec_values(ctx: click.Context, fields: dict, keys) -> dict[type, dict]:
    """Spec class -> {field: value} of the given parameters ``keys``, each read and checked."""
    from fastablate.engines.core.spec import parse_value

    values: dict[type, dict] = {}
    for key in keys:
        cls, name, opt = fields[key]
        values.setdefault(cls, {})[name] = parse_value(opt, ctx.params[key], source_label(ctx, key))
    return values


class SpecCommand(click.Command):
    """A command whose options are the fields of ``specs`` (and ``--config``); ``run(values)``
    gets spec class -> {field: value} of the options given."""

    def __init__(self, name: str, specs, run: Callable[[dict], Any], *, skip=(), params=(), **kw):
        self.fields, options = spec_fields(specs, skip)
        options.append(click.Option(["--config"], type=click.Path(dir_okay=False), callback=load_config,
                                    is_eager=True, expose_value=False,
                                    help="YAML file of option values (keys: option names)."))
        self._run = run
        super().__init__(name, params=[*params, *options], callback=self._call, **kw)

    def _call(self, **raw):
        ctx = click.get_current_context()
        return self._run(spec_values(ctx, self.fields, [k for k in self.fields if given(ctx, k)]), **{
            k: v for k, v in raw.items() if k not in self.fields})


class StudyCommand(click.Command):
    """``command``'s options: the shared ones and every option of its studies.

    ``callback(command)`` runs with the parsed context current; :meth:`choose` turns the
    given options into (study, Setup, spec).
    """

    def __init__(self, command: str, callback: Callable[["StudyCommand"], Any] | None = None):
        from fastablate.engines import command_studies
        from fastablate.engines.core.setup import Setup

        self.studies = command_studies(command)
        excluded = set.intersection(*(set(s.setup_excludes) for s in self.studies))
        shared_defaults = [s.setup_defaults for s in self.studies]
        defaults = {(Setup, k): v for k, v in shared_defaults[0].items() if all(d.get(k) == v for d in shared_defaults)}
        self.fields, params = spec_fields([Setup] + [s.spec_class for s in self.studies],
                                          skip={(Setup, n) for n in excluded}, defaults=defaults)
        params.append(click.Option(["--config"], type=click.Path(dir_okay=False), callback=load_config, is_eager=True,
                                   expose_value=False, help="YAML file of option values (keys: option names)."))
        helps = []
        for s in self.studies[-1:] + self.studies[:-1]:  # the default study first
            doc = inspect.cleandoc(s.__doc__ or s.name)
            helps.append(f"With {', '.join(s.spec_class.flag(t) for t in s.triggers)}: {doc}" if s.triggers else doc)
        super().__init__(command, params=params, help="\n\n".join(helps),
                         callback=(lambda **_: callback(self)) if callback else None)

    def field(self, key: str):
        """(spec class, field, Option) of an option named ``key`` (``batch-size`` or ``batch_size``)."""
        found = self.fields.get(key.lstrip("-").replace("-", "_"))
        if found is None:
            raise FastablateError(f"{self.name} has no option {key!r}; options: "
                                  f"{', '.join(o.flag for _, _, o in self.fields.values())}")
        return found

    def select(self, keys: list[str]):
        """The study the given options choose: one whose trigger options are given, else the default."""
        def flags(s):
            return [s.spec_class.flag(t) for t in s.triggers]
        given_fields = {self.fields[k][:2] for k in keys}
        chosen = [s for s in self.studies if any((s.spec_class, t) in given_fields for t in s.triggers)]
        if len(chosen) > 1:
            raise FastablateError(f"{' and '.join(flags(s)[0] for s in chosen)} choose separate studies "
                                  f"({', '.join(s.name for s in chosen)}): give one")
        if chosen:
            return chosen[0]
        default = [s for s in self.studies if not s.triggers]
        if not default:
            raise FastablateError(f"choose a study: {'; '.join(', '.join(flags(s)) for s in self.studies)}")
        return default[0]

    def values(self, ctx: click.Context) -> tuple[Any, dict, dict]:
        """(study, Setup values, spec values) of the options given in ``ctx``, each read and
        checked; an option of a study that was not chosen is an error."""
        from fastablate.engines.core.setup import Setup

        keys = [k for k in self.fields if given(ctx, k)]
        study = self.select(keys)
        for key in keys:
            cls, _, opt = self.fields[key]
            if cls not in (Setup, study.spec_class):
                other = next(s for s in self.studies if s.spec_class is cls)
                trig = ", ".join(other.spec_class.flag(t) for t in other.triggers)
                raise FastablateError(f"{opt.flag}{source_label(ctx, key)} applies to the {other.name} study"
                                      f"{f' ({trig})' if trig else ''}, which is not given")
        values = spec_values(ctx, self.fields, keys)
        return study, {**study.setup_defaults, **values.get(Setup, {})}, values.get(study.spec_class, {})

    def choose(self, ctx: click.Context):
        """(study, Setup, spec) of the options given in ``ctx``."""
        from fastablate.engines.core.setup import Setup

        study, setup, spec = self.values(ctx)
        return study, Setup(**setup), study.spec_class(**spec)
