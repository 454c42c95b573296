"""Unit discovery: the unit view of a model no adapter describes.

The model is traced with ``torch.fx`` (in eval mode). Its main stream is the chain of nodes
every path from the input to the output passes through (the dominators of the output). A
residual unit is an addition on that stream of two values that both depend on the input,
``shortcut(x) + f(x)``, optionally followed by an activation, whose end is a clean cut: no
other value computed before it is used after it. What lies between two units (a
downsampling layer of ConvNeXt, say) belongs to the next unit's shortcut and branch both,
so deleting a unit keeps the stream: ``post(shortcut(x))``. A ViT block gives two units,
attention and MLP. Where tracing fails, the module it failed in is kept whole (a leaf) and
the trace is tried again, up to the model itself.
"""
from __future__ import annotations

import inspect
import operator
import weakref
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from fastablate.errors import FastablateError, first_line
from fastablate.modes import eval_mode
from fastablate.units.parts import BlockParts, ModelParts

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu}
_ACTS = {F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish, F.leaky_relu, F.elu}
_ACT_MODULES = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)
_MAX_RETRIES = 64

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Unsplittable(Exception):
    pass


class _Tracer(fx.Tracer):
    """fx's tracer that keeps the modules named in ``opaque`` whole and remembers the
    innermost module a trace failed in."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque, self.stack, self.failed = opaque, [], None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(net: nn.Module) -> fx.GraphModule:
    """``net`` traced in eval mode; modules that cannot be traced are kept as leaves."""
    opaque: set[str] = set()
    params = list(inspect.signature(net.forward).parameters.values())[1:]  # options after the input keep
    concrete = {p.name: p.default for p in params                           # their defaults
                if p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    with eval_mode(net):
        for _ in range(_MAX_RETRIES):
            tracer = _Tracer(opaque)
            try:
                graph = tracer.trace(net, concrete_args=concrete or None)
            except Exception as e:
                if not tracer.failed or tracer.failed in opaque:
                    reason = first_line(e) or type(e).__name__
                    raise FastablateError(f"cannot trace {type(net).__name__} with torch.fx: {reason}") from None
                opaque.add(tracer.failed)
                continue
            return fx.GraphModule(tracer.root, graph, type(net).__name__)
    raise FastablateError(f"cannot trace {type(net).__name__} with torch.fx: more than {_MAX_RETRIES} modules fail")


class _Graph:
    """The traced graph's order, input-dependent nodes and dominators."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        inputs = [n for n in self.nodes if n.op == "placeholder"]  # the image batch, then options held at
        self.x = inputs[0]                                              # their defaults
        result = next(n for n in self.nodes if n.op == "output").args[0]
        self.dep = {self.x}
        for n in self.nodes:
            if n.op != "output" and any(a in self.dep for a in n.all_input_nodes):
                self.dep.add(n)
        if not isinstance(result, fx.Node) or result not in self.dep:
            raise FastablateError(f"{gm._get_name()}: forward must return one tensor (the logits) computed from its "
                                  f"input; it returns {type(result).__name__}")
        self.result = result
        self.idom: dict[fx.Node, fx.Node | None] = {self.x: None}
        for n in self.nodes:
            if n in self.dep and n is not self.x:
                preds = [a for a in n.all_input_nodes if a in self.dep]
                d = preds[0]
                for p in preds[1:]:
                    d = self._common(d, p)
                self.idom[n] = d
        # the latest position a value computed before each node is used at: a clean cut at n
        # is one where nothing before n (but n) is used after it
        last = {n: max((self.order[u] for u in n.users), default=self.order[n]) for n in self.dep}
        self.crossing, running = {}, -1
        for n in self.nodes:
            self.crossing[n] = running
            if n in self.dep:
                running = max(running, last[n])

    def _common(self, a: fx.Node, b: fx.Node) -> fx.Node:
        while a is not b:
            if self.order[a] > self.order[b]:
                a = self.idom[a]
            else:
                b = self.idom[b]
        return a

    def stream(self) -> list[fx.Node]:
        """The main stream: every node all paths from the input to the output pass through."""
        out, n = [], self.result
        while n is not None:
            out.append(n)
            n = self.idom[n]
        return out[::-1]

    def passes(self, n: fx.Node, entry: fx.Node) -> bool:
        """``n`` is ``entry`` passed on unchanged (through ``nn.Identity`` modules)."""
        while n is not entry and n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Identity):
            n = n.args[0]
        return n is entry

    def clean(self, n: fx.Node) -> bool:
        return self.crossing[n] <= self.order[n]

    def extract(self, entry: fx.Node, exit: fx.Node) -> fx.GraphModule:
        """The computation of ``exit`` from ``entry`` as its own module (sharing the model's
        submodules and parameters)."""
        needed, stack = set(), [exit]
        while stack:
            n = stack.pop()
            if n is entry or n in needed:
                continue
            if n in self.dep and self.order[n] < self.order[entry]:
                raise _Unsplittable(n.name)
            needed.add(n)
            stack.extend(n.all_input_nodes)
        g = fx.Graph()
        env = {entry: g.placeholder("x")}
        for n in sorted(needed, key=self.order.__getitem__):
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(env[exit])
        return fx.GraphModule(self.gm, g, "Segment")

    def modules_between(self, entry: fx.Node, exit: fx.Node) -> list[str]:
        """Qualified names of the modules and parameters used from ``entry`` (excluded) to ``exit``."""
        seen, stack, names = set(), [exit], []
        while stack:
            n = stack.pop()
            if n is entry or n in seen or (n in self.dep and self.order[n] <= self.order[entry]):
                continue
            seen.add(n)
            if n.op in ("call_module", "get_attr"):
                names.append(n.target)
            stack.extend(n.all_input_nodes)
        return names


def _is_add(n: fx.Node) -> bool:
    adds = (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))
    return adds and n.kwargs.get("alpha", 1) == 1


def _activation(g: _Graph, n: fx.Node) -> str | None:
    """"relu", "other" or None: what kind of activation ``n`` is."""
    if n.op == "call_module":
        m = g.gm.get_submodule(n.target)
        return "relu" if isinstance(m, nn.ReLU) else "other" if isinstance(m, _ACT_MODULES) else None
    if n.op == "call_function":
        return "relu" if n.target in _RELUS else "other" if n.target in _ACTS else None
    if n.op == "call_method":
        return "relu" if n.target in ("relu", "relu_") else None
    return None


def _params(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _prefix(names: list[str]) -> str:
    if not names:
        return ""
    split = [n.split(".") for n in names]
    common = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _name(g: _Graph, names: list[str], prefix: str) -> str:
    """The child of ``prefix`` holding most parameters among ``names``."""
    weight: dict[str, int] = {}
    depth = len(prefix.split(".")) if prefix else 0
    modules, tensors = dict(g.gm.named_modules()), dict(g.gm.named_parameters())
    for n in names:
        parts = n.split(".")
        if len(parts) > depth:
            size = _params(modules[n]) if n in modules else tensors[n].numel() if n in tensors else 0
            weight[parts[depth]] = weight.get(parts[depth], 0) + size
    child = max(weight, key=weight.get) if weight else ""
    return f"{prefix}.{child}" if prefix and child else prefix or child


def discover(net: nn.Module) -> ModelParts:
    """The stem, residual units and head of ``net``, found in its traced graph (cached per
    model, device, dtype and set of submodules)."""
    p = next(net.parameters(), None)  # moved, cast or rebuilt since: discovered again
    key = (p.device, p.dtype) if p is not None else None, tuple(id(m) for m in net.modules())
    hit = _CACHE.get(net)
    if hit is not None and hit[0] == key:
        return hit[1]
    parts = _discover(net)
    _CACHE[net] = (key, parts)
    return parts


def _discover(net: nn.Module) -> ModelParts:
    gm = trace(net)
    g = _Graph(gm)
    stream = g.stream()
    units: list[tuple[fx.Node, fx.Node]] = []  # (the addition, the unit's end: the addition or its activation)
    for n in stream:
        if not _is_add(n) or len(n.all_input_nodes) != 2 or not all(a in g.dep for a in n.all_input_nodes):
            continue
        end = n
        if len(n.users) == 1:
            user = next(iter(n.users))
            if user in stream and _activation(g, user) and g.clean(user):
                end = user
        if g.clean(end):
            units.append((n, end))
    if not units:
        seen = [t for t in dict.fromkeys(x.target for x in g.nodes if x.op == "call_module")]
        shown = ", ".join(seen[:12]) + (f" (+{len(seen) - 12} more)" if len(seen) > 12 else "")
        raise FastablateError(f"no residual units found in {type(net).__name__}: no addition x + f(x) on its main "
                              f"stream ends a clean cut; the modules seen: {shown or 'none'}")
    first = g.idom[units[0][0]]
    while first is not g.x and not g.clean(first):
        first = g.idom[first]
    try:
        return _split(g, first, units)
    except _Unsplittable as e:
        raise FastablateError(f"cannot split {type(net).__name__} into units: the value {e} is used across "
                              "a unit's boundary") from None


def _split(g: _Graph, first: fx.Node, units: list[tuple[fx.Node, fx.Node]]) -> ModelParts:
    blocks, parts, names = [], [], []
    entry = first
    for add, end in units:
        a, b = add.all_input_nodes
        branches = [(x, nn.Identity() if g.passes(x, entry) else g.extract(entry, x)) for x in (a, b)]
        # the shortcut: the input itself, else the branch with fewer parameters (then the one computed first)
        branches.sort(key=lambda t: (not g.passes(t[0], entry), _params(t[1]), g.order[t[0]]))
        (sc_node, shortcut), (res_node, residual) = branches
        kind = _activation(g, end) if end is not add else None
        post: Callable | None = g.extract(add, end) if kind == "other" else None
        blocks.append(g.extract(entry, end))
        parts.append(BlockParts(residual, shortcut, relu=kind == "relu", post=post))
        own = [n for n in g.modules_between(entry, res_node) if n not in set(g.modules_between(entry, sc_node))]
        names.append(_prefix(own))
        entry = end
    names = _unique(g, names, units, [p.residual for p in parts])
    return ModelParts(g.extract(g.x, first) if first is not g.x else nn.Identity(), list(zip(names, blocks)),
                      g.extract(entry, g.result), block_parts=parts)


def _unique(g: _Graph, names: list[str], units, residuals) -> list[str]:
    """Unit names: the modules the branch alone uses have a common prefix; where two units
    share one (a ViT block's attention and MLP), the child holding most parameters is added."""
    out = []
    for i, name in enumerate(names):
        if names.count(name) > 1 and name:
            used = [n.target for n in residuals[i].graph.nodes if n.op in ("call_module", "get_attr")]
            name = _name(g, [n for n in used if n.startswith(name + ".")], name)
        out.append(name or f"unit{i + 1}")
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        if out.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            out[i] = f"{name}#{seen[name]}"
    return out
