"""Plots per spec: a radar of quality (one polygon per run) and quality vs update cost. matplotlib is
imported only when a plot is drawn (Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from recsim.reproduce.cells import Cell, TableRow
from recsim.reproduce.spec import Scale, Spec

def plot_radar(spec: Spec, scale: Scale, rows: list[TableRow], path: Path) -> bool:
    """One polygon per run (x dataset) over the axes group x metric; False when there is nothing to draw."""
    metrics = spec.radar_metrics or spec.metrics
    axes = [f"{g}/{m}" for g in spec.groups for m in metrics]
    polys = []
    for r in rows:
        values = [r.cells.get(a, Cell()).mean for a in axes]
        if all(not math.isnan(v) for v in values):
            label = f"{r.run.label} ({r.dataset})" if len(spec.datasets) > 1 else r.run.label
            polys.append((label, values))
    if len(axes) < 3 or not polys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    closed = np.append(angles, angles[0])
    fig, ax = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"projection": "polar"})
    for label, values in polys:
        ax.plot(closed, values + values[:1], marker="o", linewidth=1.5, label=label)
        ax.fill(closed, values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([a.replace("/", " ") for a in axes])
    top = max(max(v) for _, v in polys)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    ax.set_title(f"{spec.key}: recsim, scale {scale.name}\n(mean over seeds {', '.join(map(str, scale.seeds))})",
                 fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_cost(spec: Spec, scale: Scale, rows: list[TableRow], path: Path) -> bool:
    """Quality (U_A, the spec's first metric) vs total update time, one labelled point per run; the
    paper's points in a second panel when the paper gives both figures."""
    if "update_seconds" not in spec.efficiency:
        return False
    group = "U_A" if "U_A" in spec.groups else spec.groups[0]
    qkey = f"{group}/{spec.metrics[0]}"
    ours, paper = [], []
    for r in rows:
        label = f"{r.run.label} ({r.dataset})" if len(spec.datasets) > 1 else r.run.label
        q, t = r.cells.get(qkey, Cell()), r.cells["update_seconds"]
        if not (math.isnan(q.mean) or math.isnan(t.mean)):
            ours.append((label, t.mean, q))
        if q.paper is not None and t.paper is not None:
            paper.append((label, t.paper, q.paper))
    if not ours:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if paper else 1
    fig, axs = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axs[0][0]
    for label, x, q in ours:
        err = None if math.isnan(q.ci_low) else [[q.mean - q.ci_low], [q.ci_high - q.mean]]
        ax.errorbar([x], [q.mean], yerr=err, fmt="o", capsize=3)
        ax.annotate(label, (x, q.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("update time (min, all update rounds)")
    ax.set_ylabel(f"{group} {spec.metrics[0]}")
    ax.set_title(f"recsim, scale {scale.name}", fontsize=10)
    if paper:
        ax2 = axs[0][1]
        for label, x, y in paper:
            ax2.plot([x], [y], "s", color="tab:gray")
            ax2.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax2.set_xlabel("update time (min)")
        ax2.set_ylabel(f"{group} {spec.metrics[0]}")
        ax2.set_title("the paper's numbers", fontsize=10)
    fig.suptitle(f"{spec.key}: quality vs update cost", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def stage_curve_points(spec: Spec, row: TableRow) -> dict[int, list[float]]:
    """{stage: [value per seed]} of `spec.stage_curve` for group "all": each stage's model on that stage's own
    split (protocol.json's eval_split; the R matrix's diagonal)."""
    import json

    import pandas as pd

    points: dict[int, list[float]] = {}
    for d in row.facts["dirs"]:
        own = {int(s["index"]): s["eval_split"] for s in json.loads((d / "protocol.json").read_text())["stages"]}
        df = pd.read_csv(d / "results.csv")
        mode = row.run.eval_mode or spec.eval_mode
        sel = df[(df.eval_mode == mode) & (df.group == "all") & (df.metric == spec.stage_curve)]
        for stage, split in own.items():
            hit = sel[(pd.to_numeric(sel.stage) == stage) & (sel.split.astype(str) == split)]
            if len(hit):
                points.setdefault(stage, []).append(float(hit.value.iloc[0]))
    return points


def plot_stage_curve(spec: Spec, scale: Scale, rows: list[TableRow], path: Path) -> bool:
    """`spec.stage_curve` per stage, one line per run (x dataset), mean over seeds with min-max bars."""
    if not spec.stage_curve:
        return False
    lines = []
    for r in rows:
        pts = stage_curve_points(spec, r) if r.facts["dirs"] else {}
        if pts:
            label = f"{r.run.label} ({r.dataset})" if len(spec.datasets) > 1 else r.run.label
            lines.append((label, sorted(pts.items())))
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in lines:
        x = [s for s, _ in pts]
        mean = [float(np.mean(v)) for _, v in pts]
        err = [[m - min(v) for m, (_, v) in zip(mean, pts)], [max(v) - m for m, (_, v) in zip(mean, pts)]]
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("stage (each stage's model on its own split)")
    ax.set_ylabel(f"{spec.stage_curve} (all users, {spec.eval_mode})")
    ax.set_xticks(sorted({s for _, pts in lines for s, _ in pts}))
    ax.set_title(f"{spec.key}: recsim, scale {scale.name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
