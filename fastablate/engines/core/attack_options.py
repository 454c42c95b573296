"""An attack's options as the commands take them (``attack``, ``train --adv-*``, ``study``,
``robust``): declared once here, checked against the attacks library's records (what each
attack takes, and its defaults, are read from its function), and resolved once into the
arguments of the attack's function (:class:`ResolvedAttack`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from fastablate.attacks import ATTACKS, check_budget, takers
from fastablate.engines.core.spec import Choice, Float, Int, Spec, one_of, option
from fastablate.errors import FastablateError

DEFAULT_PIXELS = 0.005  # sparse budget: a fraction of the H*W pixels (5 of 32x32)
SPARSE = takers("k")


def _defaults(name: str) -> str:
    """The defaults of option ``name`` of each attack that takes it, for a help text."""
    by: dict[Any, list[str]] = {}
    for a in takers(name):
        by.setdefault(ATTACKS[a].options[name], []).append(a)
    return ", ".join(f"{'eps/4' if d is None else f'{d:g}'} ({', '.join(a)})" for d, a in by.items())


@dataclass(frozen=True)
class AttackOptions(Spec):
    """The attack and its options; a None is the attack's default (:meth:`resolved` fills it in)."""

    attack: str = option("sparse", "The attack.", type=Choice(*ATTACKS))
    pixels: Optional[float] = option(None, f"sparse attacks: budget as a fraction of the H*W pixels, e.g. 0.005 "
                                           f"(5 of 32x32) [default: {DEFAULT_PIXELS}].",
                                     type=Float(0, 1, min_open=True))
    k: Optional[int] = option(None, "sparse attacks: budget in pixels (instead of --pixels).", type=Int(min=1))
    queries: Optional[int] = option(None, "Forward passes per image of the random search: sparse-rs, "
                                          "sparse-ensemble's sparse-rs, sparse's finish for the images the "
                                          f"gradient steps leave (0: none) [default: {_defaults('queries')}].",
                                    type=Int(min=0, max=10_000_000))
    steps: Optional[int] = option(None, "Gradient steps: per restart (sparse, sparse-ensemble), in all (noise, "
                                        f"pgd, pgd-l2) [default: {_defaults('steps')}].",
                                  type=Int(min=1, max=1_000_000))
    restarts: int = option(ATTACKS["sparse"].options["restarts"], "sparse, sparse-ensemble: starts of the pixel "
                           "score per image (later ones random).", type=Int(min=1, max=10_000))
    step: Optional[float] = option(None, f"Step size [default: {_defaults('step')}; 1 takes a pixel to a corner "
                                         "of [0, 1]].", type=Float(0, 1e6, min_open=True))
    eps: Optional[float] = option(None, f"fgsm, pgd: L-inf radius; pgd-l2: L2 radius [default: "
                                        f"{_defaults('eps')}].", type=Float(0, 1e6, min_open=True))
    lam: float = option(ATTACKS["noise"].options["lam"], "noise: weight of the squared L2 norm.", type=Float(0, 1e6))
    lr: float = option(ATTACKS["noise"].options["lr"], "noise: Adam learning rate.",
                       type=Float(0, 1e3, min_open=True))
    target: Optional[int] = option(None, "Targeted attack towards this class index.", type=Int(min=0))

    def validate(self) -> None:
        one_of(self, ("pixels", "k"), "set the pixel budget")
        if self.attack in takers("queries") and self.attack != "sparse" and self.queries == 0:
            raise FastablateError(f"--queries 0: the random search of {self.attack} needs at least 1 query per "
                                  "image (sparse takes 0: gradient steps only)")
        for name in self.given():
            attacks = applies_to(name)
            if attacks is not None and self.attack not in attacks:
                raise FastablateError(f"{self.flag(name)} does not apply to --attack {self.attack} (it is for "
                                      f"{', '.join(attacks)})")

    def budget(self, image_size: int) -> int:
        """The sparse budget in pixels of an image_size x image_size image."""
        return self.k if self.k is not None else round((self.pixels or DEFAULT_PIXELS) * image_size * image_size)

    def check_budget(self, image_size: int) -> None:
        """The sparse budget fits the images, in the flags' words (the rule: the library's)."""
        if self.attack not in SPARSE:
            return
        k = self.budget(image_size)
        try:
            check_budget(self.attack, k, image_size, image_size)
        except FastablateError as e:
            given = f"--k {k}" if self.k is not None else \
                f"--pixels {self.pixels or DEFAULT_PIXELS:g} rounds to {k} pixels of {image_size}x{image_size} images"
            raise FastablateError(f"{given}: {e}; give {'a larger fraction or --k' if self.k is None else 'fewer'}") \
                from None

    def resolved(self, image_size: int) -> "ResolvedAttack":
        """Every default of the attack filled in: its budget, steps, eps, step and queries."""
        self.check_budget(image_size)
        takes = ATTACKS[self.attack].options
        values = {n: getattr(self, n) for n in ("queries", "steps", "restarts", "step", "eps", "lam", "lr")}
        for n in ("queries", "steps", "step", "eps"):
            if n in takes and values[n] is None:
                values[n] = takes[n]
        if "step" in takes and values["step"] is None:  # pgd: a quarter of the radius
            values["step"] = values["eps"] / 4
        return ResolvedAttack(attack=self.attack, k=self.budget(image_size) if self.attack in SPARSE else None,
                              target=self.target, **values)


def applies_to(name: str) -> tuple[str, ...] | None:
    """The attacks option ``name`` means something to (None: every one)."""
    if name == "pixels":
        return SPARSE
    return takers(name) if name in ("k", "queries", "steps", "restarts", "step", "eps", "lam", "lr") else None


@dataclass(frozen=True)
class ResolvedAttack:
    """An attack with every option decided: what results.json records as ``spec`` and what its
    function is called with."""

    attack: str
    k: int | None
    queries: int | None
    steps: int | None
    restarts: int
    step: float | None
    eps: float | None
    lam: float
    lr: float
    target: int | None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the attack's function."""
        return {n: getattr(self, n) for n in ATTACKS[self.attack].options}

    def run(self, model, x, y, target=None, generator=None):
        """The attack on ``x``, ``y`` (an :class:`~fastablate.attacks.AttackOutput`)."""
        return ATTACKS[self.attack].function(model, x, y, target=target, generator=generator, **self.options())

    def record(self, seed: int) -> dict:
        """results.json's ``spec``."""
        return {**asdict(self), "seed": seed}
