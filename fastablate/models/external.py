"""Models from outside the registry: timm's, and a user's own factory.

- ``timm:NAME`` (``timm:vit_tiny_patch16_224,patch_size=4``: keyword arguments of
  ``timm.create_model`` after the name) builds a timm model with random weights; ``img_size``
  follows ``--image-size`` where the model takes one. timm is the optional extra
  ``fastablate[timm]``.
- ``path/to/file.py:factory`` or ``package.module:factory`` calls ``factory``, passing
  ``num_classes`` and ``image_size`` only where its signature takes them. Without
  ``num_classes`` the class count comes from the model's output.

Checkpoints record the spec (a file by its absolute path), so ``--weights`` finds the model
again; their units are discovered (:mod:`fastablate.units.discovery`).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from fastablate.errors import FastablateError, first_line
from fastablate.models.registry import ModelSpec, is_external, register_model_pattern
from fastablate.models.transfer import TIMM



def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _timm(name: str) -> ModelSpec:
    arch, *pairs = name[len(TIMM):].split(",")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip().isidentifier():
            raise FastablateError(f"{pair!r} is not KEY=VALUE (timm:NAME,KEY=VALUE,..)")
        kwargs[key.strip()] = _value(value.strip())
    try:
        import timm
    except ImportError:
        raise FastablateError("timm is not installed; pip install 'fastablate[timm]'") from None
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch[:6]}*")[:8]
        raise FastablateError(f"timm has no model {arch!r}" +
                              (f"; similar: {', '.join(near)}" if near else ""))

    def build(num_classes: int | None, image_size: int) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        try:
            try:
                return timm.create_model(arch, pretrained=False, **{"img_size": image_size, **extra, **kwargs})
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
                return timm.create_model(arch, pretrained=False, **extra, **kwargs)
        except Exception as e:
            raise FastablateError(f"--model {name}: timm.create_model raised {type(e).__name__}: "
                                  f"{first_line(e)}") from None
    return ModelSpec(name, "timm", build, f"timm {arch}" + (f" with {kwargs}" if kwargs else ""))


def _module(where: str):
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FastablateError(f"the file {where} does not exist")
        unique = "fastablate_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        # As `python path/to/nets.py` runs it: its folder importable (a blocks.py beside it), for the import only.
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # an argparse script imported as a module exits
            del sys.modules[unique]
            raise FastablateError(f"importing {where} raised {type(e).__name__}: "
                                  f"{first_line(e)}") from None
        finally:
            sys.path.remove(folder)
        return module
    try:
        return importlib.import_module(where)
    except (Exception, SystemExit) as e:
        raise FastablateError(f"cannot import {where}: {type(e).__name__}: "
                              f"{first_line(e)}") from None


def _factory(name: str) -> ModelSpec:
    where, _, attr = name.rpartition(":")
    if not where or not attr.isidentifier() or not (where.endswith(".py") or all(
            p.isidentifier() for p in where.split("."))):
        raise FastablateError("expected timm:NAME, path/to/file.py:FACTORY or package.module:FACTORY")
    if where.endswith(".py"):
        where = str(Path(where).resolve())
        name = f"{where}:{attr}"  # the spec a checkpoint records
    module = _module(where)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise FastablateError(f"{where} has no callable {attr!r}; it defines: "
                              f"{', '.join(found) or 'nothing callable'}")
    takes = _takes(factory)

    def build(num_classes: int | None, image_size: int) -> nn.Module:
        kwargs = {}
        if "num_classes" in takes and num_classes is not None:
            kwargs["num_classes"] = num_classes
        if "image_size" in takes:
            kwargs["image_size"] = image_size
        try:
            net = factory(**kwargs)
        except (Exception, SystemExit) as e:  # a factory that parses sys.argv may exit
            raise FastablateError(f"--model {name}: {attr}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
                                  f"raised {type(e).__name__}: {first_line(e)}") from None
        if not isinstance(net, nn.Module):
            raise FastablateError(f"--model {name}: {attr}() returned {type(net).__name__}, not a torch.nn.Module")
        return net
    return ModelSpec(name, "user", build, f"{attr} from {where}")


def _takes(fn: Callable) -> set[str]:
    """The keyword arguments of (num_classes, image_size) that ``fn`` accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"num_classes", "image_size"}
    return {k for k in ("num_classes", "image_size") if k in params and params[k].kind is not params[k].POSITIONAL_ONLY}


def resolve(name: str) -> ModelSpec | None:
    if not is_external(name):
        return None
    return _timm(name) if name.startswith(TIMM) else _factory(name)


register_model_pattern(resolve, "timm:NAME[,KEY=VALUE..] (timm's models), path/to/file.py:FACTORY or "
                                "package.module:FACTORY (your own)")
