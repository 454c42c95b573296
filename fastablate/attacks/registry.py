"""One record per attack: its name (the CLI's ``--attack``), its function and class, and what it
takes. The options an attack takes and their defaults are read from its function's signature, so
"``--steps`` applies to ``--attack pgd``" and every default are written once, there."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from fastablate.attacks.base import Attack, AttackOutput
from fastablate.attacks.ensemble import SparseEnsemble, sparse_ensemble
from fastablate.attacks.gradient import FGSM, PGD, PGDL2, fgsm, pgd, pgd_l2
from fastablate.attacks.noise import Noise, noise
from fastablate.attacks.sparse import Sparse, sparse
from fastablate.attacks.sparse_rs import SparseRS, sparse_rs

REQUIRED = inspect.Parameter.empty  # an option without a default (a sparse budget, k)


@dataclass(frozen=True)
class AttackRecord:
    name: str
    function: Callable[..., AttackOutput]
    cls: type[Attack]
    summary: str
    parts: tuple[str, ...] = ()  # an ensemble: the attacks it runs in turn (fooled_by indexes them)

    @property
    def options(self) -> dict[str, Any]:
        """The options the attack takes (keyword-only, but ``target`` and ``generator``) and their
        defaults (:data:`REQUIRED` for none)."""
        return {n: p.default for n, p in inspect.signature(self.function).parameters.items()
                if p.kind is p.KEYWORD_ONLY and n not in ("target", "generator")}

    @property
    def sparse(self) -> bool:
        """Whether it takes a pixel budget ``k``."""
        return "k" in self.options


ATTACKS: dict[str, AttackRecord] = {r.name: r for r in (
    AttackRecord("sparse", sparse, Sparse, "white-box L0: gradient-guided pixels, then a guided random search"),
    AttackRecord("sparse-rs", sparse_rs, SparseRS, "black-box L0: Sparse-RS (Croce et al. 2022)"),
    AttackRecord("sparse-ensemble", sparse_ensemble, SparseEnsemble, "sparse, then sparse-rs on what it leaves",
                 ("sparse", "sparse-rs")),
    AttackRecord("noise", noise, Noise, "optimized noise: Adam on -log p(wrong) + lam ||delta||^2"),
    AttackRecord("fgsm", fgsm, FGSM, "one L-inf step (Goodfellow et al. 2015)"),
    AttackRecord("pgd", pgd, PGD, "L-inf PGD with a random start (Madry et al. 2018)"),
    AttackRecord("pgd-l2", pgd_l2, PGDL2, "L2 PGD with a random start"),
)}


def takers(option: str) -> tuple[str, ...]:
    """The attacks that take ``option``."""
    return tuple(name for name, r in ATTACKS.items() if option in r.options)
