"""TABLES.md and tables.csv: per spec, the paper's number, recsim's mean +- 95% CI and the delta, rendered
through the shared markdown renderer (recsim.results.markdown_table), with the plots of each spec."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from recsim.reproduce import plots
from recsim.reproduce.cells import Cell, TableRow, _columns, build_rows
from recsim.reproduce.launch import missing_data
from recsim.reproduce.spec import EFFICIENCY, Scale, Spec
from recsim.results import EFFICIENCY_GROUP, markdown_table
from recsim.tables import aggregate, collect, render_markdown

def _fmt(x: float, quality: bool) -> str:
    if quality:
        return f"{x:.4f}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _fmt_paper(value: float | None, quality: bool) -> str:
    return "–" if value is None else _fmt(value, quality)


def _fmt_ours(c: Cell, quality: bool) -> str:
    if c.n_seeds == 0 or math.isnan(c.mean):
        return "–"
    text = _fmt(c.mean, quality)
    if not (math.isnan(c.ci_low) or math.isnan(c.ci_high)):
        text += " ± " + _fmt((c.ci_high - c.ci_low) / 2, quality)
    return text + ("†" if c.n_seeds == 1 else "")


def _fmt_delta(c: Cell, quality: bool) -> str:
    d = c.delta
    return "–" if math.isnan(d) else ("+" if d >= 0 else "−") + _fmt(abs(d), quality)


def _seed_range(seeds: Sequence[int]) -> str:
    return "{" + ",".join(map(str, seeds)) + "}" if len(seeds) > 1 else str(seeds[0])


def _modes(spec: Spec) -> str:
    """The decoder(s) the rows read: the spec's, or each row's where rows differ."""
    modes = sorted({r.eval_mode or spec.eval_mode for r in spec.runs})
    return modes[0] if len(modes) == 1 else "per row (" + ", ".join(modes) + ")"


def render_spec(spec: Spec, scale: Scale, rows: list[TableRow], rel: Path) -> str:
    """One spec's markdown section: header line, the table, notes, plots."""
    multi = len(spec.datasets) > 1
    backbones = sorted({b for r in rows for b in r.facts.get("backbone", [])})
    splits = sorted({f"{r.facts['split']} (stage {r.facts['stage']})" for r in rows if "split" in r.facts})
    cands = sorted({c for r in rows for c in r.facts.get("candidates", [])})
    users = []
    for ds in spec.datasets:
        per_group = {}
        for r in rows:
            if r.dataset == ds:
                for g, n in r.facts.get("n_users", {}).items():
                    per_group.setdefault(g, []).append(n)
        if per_group:
            text = ", ".join(f"{g} {np.mean(v):.0f}" for g, v in per_group.items())
            users.append(f"{ds}: {text}" if multi else text)
    header = [
        f"scale **{scale.name}**",
        f"backbone {', '.join(backbones) or '(no finished run)'}",
        f"seeds {', '.join(map(str, scale.seeds))}",
        f"users per group {'; '.join(users) or '–'} (evaluated, mean over runs and seeds)",
        f"eval_mode {_modes(spec)}" + (f" ({', '.join(cands)} candidates)" if cands else ""),
        f"split {', '.join(splits) or '–'}: the last stage's own",
    ]
    lines = [f"## {spec.title}", "", f"Spec `{spec.path.name}`. Paper numbers: {spec.paper}", "",
             " · ".join(header) + f". The recsim columns are this scale's runs ({rel}/), not the paper's setting.",
             ""]
    if scale.warning:
        lines += [f"> **{scale.warning}**", ""]
    cols = _columns(spec)
    head = ["run"] + (["dataset"] if multi else [])
    align = "l" * len(head) + "r" * (3 * len(cols)) + "l"
    head += [label_part for _, label, _ in cols for label_part in (f"{label} paper", f"{label} recsim", "Δ")]
    footnotes, body = [], []
    for r in rows:
        n_done = len(r.facts["dirs"])
        seeds = _seed_range(scale.seeds)
        source = f"`{r.dataset}/{r.run.source}_s{seeds}` ({n_done}/{len(scale.seeds)} done)"
        if r.run.eval_mode:
            source += f", decoder {r.run.eval_mode}"
        if "error" in r.facts:
            source += f"; ERROR: {r.facts['error']}"
        if not r.facts["dirs"] and (why := missing_data(r.dataset)):
            source += f"; data not present: {why}"
        if r.run.paper_source:
            footnotes.append(f"{r.run.label}: paper numbers from {r.run.paper_source}.")
            source += f"; paper: see note {len(footnotes)}"
        cells = [r.run.label] + ([r.dataset] if multi else [])
        for key, _, quality in cols:
            c = r.cells[key]
            cells += [_fmt_paper(c.paper, quality), _fmt_ours(c, quality), _fmt_delta(c, quality)]
        body.append(cells + [source])
    lines += [markdown_table(head + ["source"], body, align), ""]
    for i, text in enumerate(footnotes, 1):
        lines.append(f"{i}. {text}")
    if footnotes:
        lines.append("")
    if spec.note:
        lines += [f"Protocol notes: {spec.note}", ""]
    if spec.paper_claims:
        lines += ["The paper's other claims for this table (not tabulated): " + "; ".join(spec.paper_claims) + ".", ""]
    return "\n".join(lines)


def long_rows(spec: Spec, scale: Scale, rows: list[TableRow]) -> list[dict]:
    out = []
    for r in rows:
        for key, label, quality in _columns(spec):
            c = r.cells[key]
            group, _, metric = key.partition("/") if quality else (EFFICIENCY_GROUP, "", key)
            out.append(dict(
                scale=scale.name, spec=spec.key, run=r.run.name, label=r.run.label, dataset=r.dataset,
                group=group, metric=metric, unit="" if quality else EFFICIENCY[key][2],
                split=r.facts.get("split", "") if quality else "update stages",
                paper=c.paper, recsim_mean=c.mean, recsim_ci_low=c.ci_low, recsim_ci_high=c.ci_high,
                n_seeds=c.n_seeds, ci_method=c.ci_method, delta=c.delta,
                run_dirs=";".join(str(d) for d in r.facts["dirs"]),
            ))  # fmt: skip
    return out


LEGEND = (
    "Columns: `paper` = the paper's number, copied into `experiments/<spec>.yaml` from"
    " `shared/papers/README.md` §1 (`–`: the paper gives none); `recsim` = this scale's mean ± half-width"
    " of the 95% CI (Student-t over seeds; † = one seed: the run's bootstrap CI over users for quality"
    " metrics, none for cost); `Δ` = recsim − paper. Quality is the last stage's model on that stage's"
    " own split; update time is summed over the update stages and parameter counts are the largest"
    " update, in the paper's units (minutes, millions)."
)


def render(specs: Sequence[Spec], scale: Scale, out: Path, experiments: Path) -> tuple[Path, int]:
    """TABLES.md, tables.csv and the plots under ``<out>/<scale>/``; returns the TABLES.md path and the
    number of rows whose results could not be read (marked ERROR in the table)."""
    folder = Path(out) / scale.name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    parts = [f"# Paper tables reproduced by recsim: scale `{scale.name}`", ""]
    if scale.warning:
        parts += [f"> **⚠ {scale.warning}**", ""]
    parts += [
        f"Generated {stamp} by `python -m recsim.reproduce --scale {scale.name}` from the run directories"
        f" under `{folder}/`. Scale: {scale.description} Overrides: `{' '.join(scale.overrides)}`;"
        f" seeds {', '.join(map(str, scale.seeds))}. Specs: `{experiments}`.", "", LEGEND, "",
    ]  # fmt: skip
    records, finished, errors = [], [], 0
    for spec in specs:
        rows = build_rows(spec, scale, out)
        parts.append(render_spec(spec, scale, rows, folder))
        images = []
        if plots.plot_radar(spec, scale, rows, folder / f"{spec.key}_radar.png"):
            images.append(f"![{spec.key} radar]({spec.key}_radar.png)")
        if plots.plot_cost(spec, scale, rows, folder / f"{spec.key}_cost.png"):
            images.append(f"![{spec.key} quality vs cost]({spec.key}_cost.png)")
        if plots.plot_stage_curve(spec, scale, rows, folder / f"{spec.key}_stages.png"):
            images.append(f"![{spec.key} per stage]({spec.key}_stages.png)")
        if images:
            parts += [" ".join(images), ""]
        records += long_rows(spec, scale, rows)
        errors += sum("error" in r.facts for r in rows)
        finished += [d for r in rows for d in r.facts["dirs"]]
    finished = sorted(set(finished), key=str)
    if finished:  # recsim.tables' own view: every metric and setting, no paper numbers
        try:
            agg = aggregate(collect(finished))
            wanted = dict.fromkeys(m for s in specs for m in [*s.radar_metrics, *s.metrics, *s.efficiency])
            shown = [m for m in wanted if m in set(agg["metric"])] or None
            every = render_markdown(agg, metrics=shown)
            parts += ["## Appendix: these runs in `python -m recsim.tables`' view (last stage, every split)", "",
                      every]
        except (ValueError, FileNotFoundError) as err:
            parts += [f"(recsim.tables view unavailable: {err})", ""]
    md = folder / "TABLES.md"
    md.write_text("\n".join(parts))
    pd.DataFrame(records).to_csv(folder / "tables.csv", index=False)
    return md, errors
