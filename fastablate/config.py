"""Where option values come from, lowest to highest precedence: a YAML file (``--config``),
environment variables ``FASTABLATE_<COMMAND>_<OPTION>`` (e.g. ``FASTABLATE_TRAIN_EPOCHS=30``),
then flags. Error lines about a value name where it came from.
"""
from __future__ import annotations

import click
from click.core import ParameterSource

from fastablate.errors import FastablateError

ENV_PREFIX = "FASTABLATE"
_CONFIG_KEY = "fastablate.config"
MAX_CONFIG_BYTES = 1 << 20  # a config of options is a few hundred bytes; /dev/zero never ends


def read_yaml(path: str) -> dict:
    """The mapping in a YAML file (a regular file of at most 1 MiB); one error line naming the
    file otherwise."""
    import os
    import stat

    import yaml

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FastablateError(f"--config {path!r}: not a regular file (a device, pipe or folder); give a YAML "
                                  "file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise FastablateError(f"--config {path!r}: larger than 1 MiB; a config file holds option: value lines")
        text = raw.decode("utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise FastablateError(f"--config {path!r}: not UTF-8 text (byte {e.start})") from None
    except (OSError, yaml.YAMLError) as e:
        raise FastablateError(f"--config {path!r}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FastablateError(f"--config {path!r}: expected a mapping of option: value")
    return data


def load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE.yaml: its keys (option names, with - or _) become the command's defaults."""
    if not value:
        return value
    data = read_yaml(value)
    names = {p.name for p in ctx.command.params if p.name != "config"}
    mapped = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(mapped) - names)
    if unknown:
        raise FastablateError(f"--config {value!r}: unknown option(s) {', '.join(unknown)} for "
                              f"'{ctx.command.name}'; valid: {', '.join(sorted(names))}")
    ctx.default_map = {**(ctx.default_map or {}), **mapped}
    ctx.meta[_CONFIG_KEY] = value
    return value


def source_label(ctx: click.Context, name: str) -> str:
    """Where the value of parameter ``name`` came from, for an error line: '' for a flag."""
    source = ctx.get_parameter_source(name)
    if source == ParameterSource.ENVIRONMENT:
        return f" (from {ENV_PREFIX}_{ctx.info_name.upper().replace('-', '_')}_{name.upper()})"
    if source == ParameterSource.DEFAULT_MAP:
        return f" (from --config {ctx.meta.get(_CONFIG_KEY, '')})"
    return ""


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user set parameter ``name`` (flag, environment or config file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source != ParameterSource.DEFAULT
