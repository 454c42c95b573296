"""The runner: one study on a model, or on a model and its ``--compare`` models over the
same images, from the shared options to a finished run directory.

Order of work: every check first (options, data, models, the study's own checks), so bad
input fails before anything is written; then the run directory (``run.json`` first), the
study on each model, the plots, and ``results.csv``/``results.json`` last: a run that
fails midway never presents a result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fastablate.engines.core import distributed as dist
from fastablate.engines.core.protocol import Result, Study
from fastablate.engines.core.runtime import model_name, slug
from fastablate.engines.core.setup import Setup
from fastablate.engines.core.spec import Spec
from fastablate.errors import FastablateError
from fastablate.files import fingerprint
from fastablate.rundir import RunDir, default_out


@dataclass
class Outcome:
    path: Path  # the run directory
    results: list[Result]  # one per model, the --compare models after the first
    document: dict  # what results.json holds
    report: str  # what the terminal shows


def run_config(study: Study, setup: Setup, spec: Spec) -> dict:
    """What run.json records as a run's config: the study, the shared options it takes and its
    own (a finished run with the same config is the same run)."""
    return {"study": study.name, **{k: v for k, v in setup.to_dict().items() if k not in study.setup_excludes},
            **spec.to_dict()}


def run_inputs(setup: Setup, spec: Spec) -> dict[str, str]:
    """The fingerprint of every file and folder a run reads ("--weights PATH": fingerprint), which
    run.json records: a rerun reuses a finished run only when they are unchanged
    (:func:`fastablate.files.fingerprint`)."""
    pairs = setup.paths("input") + spec.paths("input") + ([("--data-dir", setup.data_dir)] if setup.data_dir else [])
    return {f"{flag} {path}": fingerprint(path) for flag, path in pairs}


def run_study(study: Study, setup: Setup, spec: Spec, *, progress: bool = False) -> Outcome:
    """Run ``study`` as the CLI does and write its run directory (``setup.out``, default
    ``runs/<command>-<timestamp>``)."""
    if study.setup_excludes:
        given = [Setup.flag(n) for n in setup.given() if n in study.setup_excludes]
        if given:
            raise FastablateError(f"{given[0]} does not apply to {study.command}")
    inputs = setup.paths("input") + spec.paths("input")
    for oflag, output in setup.paths("output") + spec.paths("output"):
        for iflag, inp in inputs:
            if Path(output).resolve() == Path(inp).resolve():
                raise FastablateError(f"{oflag} {output} is the {iflag} input; choose another file (inputs are "
                                      "never overwritten)")
    rank, world, device = dist.init(setup.device)
    runtime = setup.runtime(progress and rank == 0)
    if device is not None:
        runtime = runtime.with_(device=device)
    data = study.load_data(setup, spec, runtime)
    if world > 1 and len(data) < world:
        raise FastablateError(f"torchrun runs {world} processes but {getattr(data, 'name', 'the data')} has "
                              f"{len(data)} images: use at most {len(data)} processes")
    models = study.load_models(setup, spec, data, runtime)
    study.check(models, data, spec)
    config = run_config(study, setup, spec)
    tracker = setup.tracker() if rank == 0 else None  # an unreachable tracking store fails before any file
    out = Path(dist.broadcast(str(setup.out or default_out(study.command))))  # one folder, named by process 0
    run = RunDir(out, study.command, config, device=str(runtime.device), seed=setup.seed,
                 info={**study.run_info(models, data, spec), **({"world_size": world} if world > 1 else {}),
                       "inputs": run_inputs(setup, spec)})
    start_on_main(run, resume=study.resumes(spec), force=setup.force, inputs=inputs)
    if tracker:
        tracker.start(out, out.name, config)
    try:
        results = execute(study, models, data, spec, runtime.with_(out=out, tracker=tracker or None), run.timings)
        document = write_outputs(run, study, results, spec, runtime.with_(out=out)) if rank == 0 else \
            study.document(results, spec)
    except BaseException as e:
        if rank == 0:
            run.finish(error=f"{type(e).__name__}: {e}")
            if tracker:
                tracker.finish(status="FAILED")
        raise
    if rank == 0:
        run.finish()
        if tracker:
            tracker.finish(study.metrics(document))
    return Outcome(run.path, results, document, study.report(results, spec))


def start_on_main(run: RunDir, **options) -> None:
    """``run.start(**options)`` on process 0, the one that writes; a refusal there stops every
    process (process 0 with the error itself)."""
    refused, error = None, None
    if dist.is_main():
        try:
            run.start(**options)
        except Exception as e:
            refused, error = str(e), e
    refused = dist.broadcast(refused)
    if refused:
        raise error if error is not None else FastablateError(refused)


def execute(study: Study, models, data: Any, spec: Spec, runtime, timings: dict | None = None) -> list[Result]:
    """``study`` on each model over the same data: its results, in order. Writes nothing but
    what the study writes as it goes into ``runtime.out`` (a training's checkpoints), when set.
    The one computation behind the CLI and the library functions."""
    results: list[Any] = []
    for i, model in enumerate(models):
        name = model_name(model)
        t0 = time.perf_counter()
        results.append(study.run(model, data, spec, runtime.with_(suffix="" if i == 0 else f"-{slug(name)}",
                                                                   model_index=i)))
        if timings is not None:
            timings[f"{study.name}_{name}_s"] = round(time.perf_counter() - t0, 3)
    return results


def write_outputs(run: RunDir, study: Study, results: Sequence[Result], spec: Spec, runtime) -> dict:
    """What a finished run keeps in its (started) directory: the study's files, the plots,
    results.csv and results.json last; run.json gains the results' warnings and a training's
    kept epoch. Returns the results.json document."""
    document = study.document(results, spec)
    warnings = [w for r in results for w in getattr(r, "warnings", ())]
    if warnings:  # what a user should know about the numbers, beside them
        run.info["warnings"] = warnings
    if getattr(results[0], "kept", None):  # which epoch model.pt holds
        run.info["kept"] = results[0].kept
    study.write_artifacts(results, spec, runtime.with_(out=run.path))
    results[0].plot(run.plot_dir(), *results[1:])
    run.write_results(document, [row for r in results for row in r.rows()])
    return document
