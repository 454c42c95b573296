"""The study's report: for each finding a table, its figures and one sentence of verdict
computed from the parts' results.json; report.md beside the parts, and report.html with the
figures embedded (one file to send).

Verdict rules (the first model is the reference, usually the ResNet):
- Lesion (Veit et al. 2016): *holds* when deleting one unit keeps the reference at 90% or
  more of its accuracy on average while every other model keeps 50% or less; *holds in part*
  when the reference keeps at least 10 points more of its accuracy than every other model;
  else *does not hold*.
- Noise: *holds* when, for every number n of perturbed layers, the reference loses less
  accuracy (mean over the sigma grid) than every other model; *holds in part* when it does
  for some n; else *does not hold*.
- Attacks: the fraction of correctly classified images the sparse attack fools at its pixel
  budget, per model (a measurement, no threshold).
- Paths: *holds* when the effective paths (the shortest range of lengths holding 90% of the
  gradient) are at most half of all paths and shorter on average than the paths themselves
  (n/2); *holds in part* when their mean length is at most 0.9 of n/2; else *does not hold*.
"""
from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastablate.files import atomic_write_text


@dataclass
class Finding:
    title: str
    verdict: str  # one sentence
    status: str  # holds | holds in part | does not hold | measured
    table: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _models(doc: dict) -> list[dict]:
    """The first model's part of a results.json and its --compare models'."""
    extra = doc.get("compare")
    return [doc] + ([] if extra is None else extra if isinstance(extra, list) else [extra])


def lesion_finding(doc: dict, figures: Path, chance: float) -> Finding:
    rows = []
    for m in _models(doc):
        intact = m["intact"]["accuracy"]
        singles = [v["accuracy"] for v in m["variants"] if v["plan"] == "all-single"]
        mean = sum(singles) / len(singles) if singles else float("nan")
        ks = {}
        for v in m["variants"]:
            if v["plan"] == "k-random":
                ks.setdefault(v["k"], []).append(v["accuracy"])
        rows.append({"model": m["model"], "intact": intact, "one unit deleted (mean)": mean,
                     "worst": min(singles) if singles else None, "retained": mean / intact if intact else 0.0,
                     "lesionable units": len(singles),
                     "k=2 (mean)": sum(ks[2]) / len(ks[2]) if 2 in ks else None})
    ref, others = rows[0], rows[1:]
    describe = (f"deleting one unit leaves {ref['model']} at {ref['one unit deleted (mean)']:.3f} on average (worst "
                f"{ref['worst']:.3f}; intact {ref['intact']:.3f}, {ref['retained']:.0%} retained)")
    describe += "".join(f", while {o['model']} falls to {o['one unit deleted (mean)']:.3f} ({o['retained']:.0%} of its "
                        f"{o['intact']:.3f})" for o in others)
    if not others:
        status = "measured"
    elif ref["retained"] >= 0.9 and all(o["retained"] <= 0.5 for o in others):
        status = "holds"
    elif all(ref["retained"] >= o["retained"] + 0.1 for o in others):
        status = "holds in part"
    else:
        status = "does not hold"
    verdict = {"holds": "Holds", "holds in part": "Holds in part", "does not hold": "Does not hold",
               "measured": "Measured"}[status] + f": {describe} (chance is {chance:.2f})."
    figs = [figures / n for n in ("lesion-single.png", "lesion-k-random.png", "lesion-reorder.png")]
    return Finding("Lesion: one model or an ensemble? (Veit et al. 2016)", verdict, status, rows, figs)


def noise_finding(doc: dict, figures: Path) -> Finding:
    rows, drops = [], {}
    for m in _models(doc):
        clean = m["clean"]["accuracy"]
        by_n: dict = {}
        for g in m["grid"]:
            if g["kind"] == "activation":
                by_n.setdefault(g["layers"], []).append(clean - g["accuracy_mean"])
                rows.append({"model": m["model"], "n": g["layers"], "p": g["p"], "sigma": g["sigma"], "clean": clean,
                             "accuracy": g["accuracy_mean"],
                             "ci95": f"{g['ci95'][0]:.3f}-{g['ci95'][1]:.3f}" if g["ci95"] else ""})
        drops[m["model"]] = {n: sum(v) / len(v) for n, v in by_n.items()}
    names = list(drops)
    ref, others = names[0], names[1:]
    ns = sorted(drops[ref], key=lambda n: (isinstance(n, str), n))
    less = [n for n in ns if all(drops[ref][n] < drops[o].get(n, float("inf")) for o in others)]
    status = ("measured" if not others else "holds" if len(less) == len(ns) else
              "holds in part" if less else "does not hold")
    losses = "; ".join(f"{name} loses " + " / ".join(f"{100 * drops[name][n]:.1f}" for n in ns) + " points"
                       for name in names)
    head = {"holds": "Holds", "holds in part": f"Holds for n = {', '.join(map(str, less))} only",
            "does not hold": "Does not hold", "measured": "Measured"}[status]
    verdict = (f"{head}: with noise on n = {' / '.join(map(str, ns))} conv layers (mean over the sigma grid), "
               f"{losses}.")
    figs = [figures / "noise-activation.png", figures / "noise-input.png"]
    return Finding("Noise: how much Gaussian noise in the conv layers does each model survive?", verdict, status,
                   rows, figs)


def attack_finding(sparse: dict | None, dense: dict | None, figures: Path) -> Finding:
    rows = []
    for m in _models(sparse) if sparse else []:
        rows.append({"model": m["model"], "attack": f"sparse, {m['k']} pixels", "attacked": m["attacked"],
                     "fooled": m["success_rate"], "robust accuracy": m["robust_accuracy"],
                     "s/image": m["seconds_per_image"]})
    for m in _models(dense) if dense else []:
        rows.append({"model": m["model"], "attack": "optimized noise", "attacked": m["attacked"],
                     "fooled": m["success_rate"], "robust accuracy": m["robust_accuracy"],
                     "mean L2": m["mean_l2"], "s/image": m["seconds_per_image"]})
    parts = []
    if sparse:
        k = sparse["k"]
        parts.append(f"at {k} pixels the sparse attack fools " + ", ".join(
            f"{m['success_rate']:.2f} of {m['model']}'s {m['attacked']} correctly classified images"
            for m in _models(sparse)))
    if dense:
        parts.append("the optimized-noise attack fools " + ", ".join(
            f"{m['success_rate']:.2f} of {m['model']}'s (mean L2 {m['mean_l2']:.3f})" if m["mean_l2"] is not None
            else f"{m['success_rate']:.2f} of {m['model']}'s" for m in _models(dense)))
    verdict = "Measured: " + "; ".join(parts) + "." if parts else "No attack was run."
    return Finding("Attacks: what falls to a few pixels, and to optimized noise?", verdict, "measured", rows,
                   [figures / "examples.png"] if sparse else [])


def paths_finding(doc: dict, figures: Path) -> Finding:
    rows = []
    for m in _models(doc):
        e = m["effective"]
        rows.append({"model": m["model"], "residual units n": m["n"], "effective lengths": f"{e['lo']}-{e['hi']}",
                     "gradient share": e["share"], "share of all paths": e["paths_fraction"],
                     "mean path length": e["mean_path_length"], "mean effective length": e["mean_effective_length"]})
    few = all(r["share of all paths"] <= 0.5 and r["mean effective length"] < r["mean path length"] for r in rows)
    shorter = all(r["mean effective length"] <= 0.9 * r["mean path length"] for r in rows)
    status = "holds" if few else "holds in part" if shorter else "does not hold"
    text = "; ".join(f"{r['model']}: effective paths {r['effective lengths']} units long, holding "
                     f"{r['gradient share']:.0%} of the gradient but {r['share of all paths']:.2%} of the 2^"
                     f"{r['residual units n']} paths (mean effective length {r['mean effective length']:.1f} against "
                     f"{r['mean path length']:.1f})" for r in rows)
    return Finding("Paths: which path lengths carry the gradient?", f"{status.capitalize()}: {text}.", status, rows,
                   [figures / "paths.png"])


def features_finding(doc: dict, figures: Path) -> Finding:
    rows = []
    for m in _models(doc):
        for layer, s in m["stats"].items():
            rows.append({"model": m["model"], "layer": layer, "mean": s["mean"], "dead channels":
                         f"{s['dead_channels']}/{s['channels']}", "zero fraction": s["zero_fraction"],
                         "adversarial change": m.get("adversarial_relative_change", {}).get(layer)})
    dead = {m["model"]: sum(s["dead_channels"] for s in m["stats"].values()) for m in _models(doc)}
    verdict = "Measured: dead channels (zero on every evaluated image) " + ", ".join(
        f"{k}: {v}" for k, v in dead.items()) + "."
    from fastablate.engines.core.runtime import slug

    figs = sorted(figures.glob("heatmaps-*.png"))[:2] + [figures / f"channels-{slug(doc['layers'][-1])}.png"]
    return Finding("Feature maps: where do the layers look?", verdict, "measured", rows, figs)


def findings(out: Path, parts: dict) -> list[Finding]:
    """Every finding whose part ran, from its results.json."""
    def doc(name):
        p = parts.get(name)
        return p.document if p is not None else None

    chance = 1 / len(doc("eval")["classes"]) if doc("eval") else 0.1
    out_list = []
    if doc("lesion"):
        out_list.append(lesion_finding(doc("lesion"), out / "lesion" / "plots", chance))
    if doc("noise"):
        out_list.append(noise_finding(doc("noise"), out / "noise" / "plots"))
    if doc("attack-sparse") or doc("attack-noise"):
        out_list.append(attack_finding(doc("attack-sparse"), doc("attack-noise"), out / "attack-sparse" / "plots"))
    if doc("paths"):
        out_list.append(paths_finding(doc("paths"), out / "paths" / "plots"))
    if doc("features"):
        out_list.append(features_finding(doc("features"), out / "features" / "plots"))
    for f in out_list:
        f.figures = [p for p in f.figures if p.is_file()]
    return out_list


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return "" if v is None else str(v)


def _columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in order of first appearance."""
    return list(dict.fromkeys(k for r in rows for k in r))


def md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _overview(setup, spec, parts: dict, checkpoints: list[tuple[str | None, str]]) -> tuple[list[dict], list[dict]]:
    from fastablate.models.checkpoint import read_checkpoint
    from fastablate.rundir import versions

    models = []
    for arch, c in checkpoints:
        ck = read_checkpoint(c)
        meta = ck.get("meta") or {}
        models.append({"checkpoint": c, "model": ck.get("arch") or arch,
                       "test accuracy at training": meta.get("test_accuracy"), "epochs": meta.get("epoch")})
    runs = [{"part": n, "run": str(p.path), "seconds": round(p.seconds, 1), "reused": p.reused}
            for n, p in parts.items()]
    info = {"dataset": setup.dataset, "data-dir": setup.data_dir, "seed": setup.seed,
            "studied images": spec.eval_limit or "all", **versions()}
    return models, runs + [{"part": k, "run": v} for k, v in info.items()]


def write_reports(out: Path, setup, spec, parts: dict, checkpoints: list[tuple[str | None, str]]) -> list[Path]:
    """report.md (figures linked) and report.html (figures embedded) in ``out``; ``checkpoints``:
    (model, file) of each studied model (the model named for a foreign file, else None)."""
    found = findings(out, parts)
    models, runs = _overview(setup, spec, parts, checkpoints)
    title = f"fastablate study: {', '.join(m['model'] or '?' for m in models)} on {setup.dataset}"
    intro = ("Each finding: a table, its figures, and a verdict computed from the numbers in the parts' "
             "results.json (rules in fastablate/engines/workflows/report.py).")
    return write_document(out, title, intro, found, [models, runs])


def write_document(out: Path, title: str, intro: str, found: list[Finding], tables: list[list[dict]]) -> list[Path]:
    """report.md and report.html in ``out``: the title, the intro, each finding (verdict, table,
    figures), then "Models, data, runs" with ``tables``."""
    when = time.strftime("%Y-%m-%d %H:%M")
    md = [f"# {title}", "", f"Generated {when}. {intro}", ""]
    for f in found:
        md += [f"## {f.title}", "", f"**Verdict ({f.status}).** {f.verdict}", "", md_table(f.table), ""]
        md += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in f.figures] + [""]
    md += ["## Models, data, runs", ""] + [line for t in tables for line in (md_table(t), "")]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(title, found, tables, when))
    return [out / "report.md", out / "report.html"]


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.verdict{padding:.6em .9em;border-left:5px solid #888;background:#fafafa}.holds{border-color:#2a9d3a}
.holds-in-part{border-color:#d49a00}.does-not-hold{border-color:#c62828}.measured{border-color:#1565c0}
img{max-width:100%;margin:.4em 0;border:1px solid #eee}h2{margin-top:1.6em}"""


def html_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html(title: str, found: list[Finding], tables: list[list[dict]], when: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>Generated {when}.</p>"]
    for f in found:
        parts += [f"<h2>{html.escape(f.title)}</h2>",
                  f"<p class='verdict {f.status.replace(' ', '-')}'><b>Verdict ({html.escape(f.status)}).</b> "
                  f"{html.escape(f.verdict)}</p>", html_table(f.table)] + [img_tag(p) for p in f.figures]
    parts += ["<h2>Models, data, runs</h2>", *map(html_table, tables), "</body></html>"]
    return "\n".join(parts)


__all__ = ["Finding", "findings", "write_reports"]
