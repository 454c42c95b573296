"""Clean evaluation: accuracy, loss, per-class accuracy, confusion matrix (the loop:
:mod:`fastablate.engines.studies.evaluation`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fastablate.data import load_saved
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import table
from fastablate.engines.core.spec import NamedFiles, Spec, option
from fastablate.engines.studies.evaluation import EvalResult, evaluate
from fastablate.errors import FastablateError


@dataclass(frozen=True)
class EvaluateSpec(Spec):
    """A clean evaluation; with --eval-sets, also on saved adversarial sets."""

    eval_sets: tuple = option((), "Saved sets (attack --save-dataset, data split) scored beside the dataset, e.g. "
                                  "perturbed-val=pv.pt,holdout=h.pt.", type=NamedFiles(), role="input")

    def validate(self) -> None:
        names = [n for n, _ in self.eval_sets]
        if len(set(names)) != len(names):
            raise FastablateError(f"--eval-sets names a set twice: {', '.join(names)}")


class EvaluateStudy(Study):
    """Evaluate a checkpoint: accuracy, loss, per-class accuracy, confusion matrix."""

    name = "evaluate"
    command = "eval"
    spec_class = EvaluateSpec

    def check(self, models, data, spec):
        for name, path in spec.eval_sets:  # every file read before anything is written
            load_saved(path, f"--eval-sets {name}=", data)

    def run(self, model, data, spec, runtime):
        res = evaluate(model, data, runtime)
        for name, path in spec.eval_sets:
            res.eval_sets[name] = evaluate(model, load_saved(path, f"--eval-sets {name}=", data), runtime,
                                           desc=f"eval {name}")
        return res

    def metrics(self, document: dict) -> dict[str, float]:
        return {**super().metrics(document),
                **{f"{n}_accuracy": e["accuracy"] for n, e in document.get("eval_sets", {}).items()}}

    def report(self, results: Sequence[EvalResult], spec) -> str:
        lines = [table([r for res in results for r in res.rows()])]
        for r in results:
            lines.append(f"{r.model}: accuracy {r.accuracy:.4f} ({r.n} images), loss {r.loss:.4f}")
            lines += [f"{r.model} on {n}: accuracy {e.accuracy:.4f} ({e.n} images), loss {e.loss:.4f}"
                      for n, e in r.eval_sets.items()]
        return "\n".join(lines)
