"""Results tables from run output directories: mean and 95% CI over seeds.

    python -m recsim.tables DIR [DIR ...] [--out PREFIX] [--metrics NDCG@3,HR@1,...]
                            [--stage last|all|N] [--group-by method,backbone,...]
                            [--baseline METHOD] [--n-boot 1000]

Each DIR is one run's output directory or any folder above many (a multirun sweep): every
``results.csv`` below it is read, unless no ``DONE`` marker sits beside it (an unfinished or crashed
job; it is skipped and named on stderr). Tables are built from these files alone -- no W&B, no
re-evaluation -- so a sweep can be tabulated while it is still running.

``results.csv`` has one row per stage x group x metric (the schema is :mod:`recsim.results`) plus
``cfg.*`` columns holding swept config values. Efficiency rows use group ``-`` (trainable_params, ...).

Aggregation (:func:`aggregate`): rows are merged over seeds when every other column agrees, so any
setting that differs -- a ``cfg.*`` value, the backbone, the protocol -- keeps results apart. The
interval is mean +- t_{0.975, n-1} * sd / sqrt(n) over the n seeds (Student's t from scipy: with 3-5
seeds the normal 1.96 would understate the interval by 20-60%). With one seed there is no spread over seeds, so
the run's own percentile-bootstrap CI over users is shown instead and marked: it is narrower than a
seed interval would be, because it ignores training noise.

Outputs: ``PREFIX.csv`` (long format, every stage and metric: keys, mean, ci_low, ci_high, n_seeds,
ci_method, ...) and ``PREFIX.md`` (one markdown table per dataset x protocol x eval_mode; printed to
stdout too). ``--stage``, ``--metrics`` and ``--group-by`` shape the markdown only.

Paired differences (``--baseline METHOD``, :func:`paired_differences`): which gaps are resolvable. Seed
intervals over 2-3 seeds are wide; two methods evaluated on the same users and candidates can be told
apart far more sharply by differencing per user. For each run, the baseline run of the same seed and
setting (:data:`PAIR_KEYS` plus every cfg.* value that is not a method's) is found, both runs' per-user
ranks (``stages/NN_name/ranks.npz``, :func:`recsim.results.load_ranks`) are turned into per-user metric
values, and the mean of method - baseline gets a paired percentile-bootstrap 95% CI over users
(:func:`recsim.eval.metrics.bootstrap_ci`; the same resamples for every metric). A difference is marked
resolvable when its CI excludes 0. Several seeds: the users of all seeds are pooled into one sample
(users x seeds rows), which is said above each table; this CI describes user sampling, not training
noise (the seed interval of the main table does). Written to ``PREFIX_paired.csv`` and below the main
tables in ``PREFIX.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from recsim.eval.metrics import bootstrap_ci, per_user_metrics
from recsim.results import (
    EFFICIENCY_GROUP,
    RANKS_FILE,
    REQUIRED_COLUMNS,
    ResultsFileError,  # noqa: F401  (re-exported: recsim.tables.ResultsFileError)
    load_ranks,
    markdown_table,
    read_results,
)

# columns of a results.csv (plus the run dir) that are measurements, not identity
RAW_VALUE_COLUMNS = ("seed", "value", "ci_low", "ci_high", "n_users", "run_dir")
# columns aggregate() adds; everything else in its output is a key
AGG_VALUE_COLUMNS = ("mean", "ci_low", "ci_high", "sd", "n_seeds", "ci_method", "seeds", "n_users")
TABLE_KEYS = ("dataset", "protocol", "eval_mode")  # one markdown table per combination
DEFAULT_ROW_KEYS = ("method", "backbone")  # always shown; any other key that varies is added
CI_SEEDS = "t over seeds"
CI_BOOTSTRAP = "bootstrap over users (1 seed)"



class NoResultsError(FileNotFoundError):
    """No finished run (results.csv with a DONE marker) under the given directories."""


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}, the two-sided 95% Student-t quantile (scipy.stats.t.ppf), for df >= 1."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(stats.t.ppf(0.975, df))


# ---------------------------------------------------------------------------------------- collect


def _run_dir(results_dir: Path, root: Path) -> Path:
    """The run a results.csv belongs to: the nearest directory at or above it (within ``root``)
    holding a config.yaml or a .hydra folder, which every run writes first; else its own directory.

    The runner also keeps per-stage copies (``<run>/stages/NN_name/results.csv`` with their own DONE)
    as resume state. Those belong to ``<run>``: reading them as runs would count a finished run
    twice, and would pass off the finished stages of a crashed run as a result.
    """
    for candidate in [results_dir, *results_dir.parents]:
        if (candidate / "config.yaml").exists() or (candidate / ".hydra").is_dir():
            return candidate
        if candidate == root:
            break
    return results_dir


def find_results(dirs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories under ``dirs``, each found once, sorted by path.

    A run is finished when its directory holds both results.csv and DONE. A DIR may also be a
    results.csv file itself.
    """
    runs: dict[Path, Path] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        if root.is_file():
            runs.setdefault(root.parent.resolve(), root.parent)
            continue
        for path in root.rglob("results.csv"):
            run = _run_dir(path.parent, root)
            runs.setdefault(run.resolve(), run)
    ordered = sorted(runs.values(), key=str)
    done = [r for r in ordered if (r / "DONE").exists() and (r / "results.csv").exists()]
    return done, [r for r in ordered if r not in done]


def collect(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every finished run's results.csv under ``dirs``, concatenated (one row per result).

    See :func:`find_results` for what counts as a run. Runs without a DONE marker are skipped and listed
    on stderr. Raises :class:`NoResultsError` when nothing finished is found and
    :class:`ResultsFileError` for a malformed file.
    """
    dirs = list(dirs)
    finished, unfinished = find_results(dirs)
    for run in unfinished:
        why = "no DONE file: unfinished or failed" if (run / "results.csv").exists() else "no results.csv"
        print(f"recsim.tables: skipping {run} ({why})", file=sys.stderr)
    if not finished:
        raise NoResultsError(
            f"no finished runs (results.csv with a DONE file beside it) under {[str(d) for d in dirs]}"
            + (f"; {len(unfinished)} unfinished skipped" if unfinished else "")
        )
    # runs of different sweeps may carry different cfg.* columns: absent ones become NaN
    frames = [read_results(run / "results.csv") for run in finished]
    return pd.concat(frames, ignore_index=True, sort=False)


# -------------------------------------------------------------------------------------- aggregate


def _keys(df: pd.DataFrame, value_columns: Sequence[str]) -> list[str]:
    """Key columns: the schema's in schema order, then other columns, then cfg.* (as they appear)."""
    keys = [c for c in df.columns if c not in value_columns]
    extra = [c for c in keys if c not in REQUIRED_COLUMNS]
    return (
        [c for c in REQUIRED_COLUMNS if c in keys]
        + [c for c in extra if not c.startswith("cfg.")]
        + [c for c in extra if c.startswith("cfg.")]
    )


def _fmt_key(value) -> str:
    """A key value for display: NaN -> '', 3.0 -> '3'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _warn_duplicate_seeds(df: pd.DataFrame, keys: list[str]) -> None:
    dup = df[df.duplicated(keys + ["seed"], keep=False)]
    if dup.empty:
        return
    runs = sorted(dup["run_dir"].unique()) if "run_dir" in dup else []
    print(
        f"recsim.tables: {len(dup)} rows repeat a (setting, seed) pair, e.g. in {runs[:4]}; each seed"
        " counts once (its repeats are averaged). If those runs differ in a setting, the runner must"
        " record it in a cfg.* column.",
        file=sys.stderr,
    )


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI over seeds for each combination of every non-value column.

    Keys = every column except seed, value, ci_low, ci_high, n_users and run_dir. A seed that occurs
    twice for the same keys (a rerun) counts once, with its repeats averaged, and a warning. NaN values
    are left out (n_seeds counts the seeds with a value). Adds: mean, ci_low, ci_high, sd (over seeds),
    n_seeds, ci_method (:data:`CI_SEEDS`, or :data:`CI_BOOTSTRAP` for one seed: the run's own CI over
    users), seeds (e.g. "1;2;3") and n_users (mean over seeds).
    """
    missing = [c for c in ("seed", "value", "ci_low", "ci_high", "metric", "group") if c not in df]
    if missing:
        raise ValueError(f"aggregate() needs columns {missing}")
    keys = _keys(df, RAW_VALUE_COLUMNS)
    df = df.copy()
    if "n_users" not in df:
        df["n_users"] = np.nan
    df.loc[df["value"].isna(), ["ci_low", "ci_high"]] = np.nan  # a CI without a value is not used
    _warn_duplicate_seeds(df, keys)

    per_seed = (
        df.groupby(keys + ["seed"], dropna=False, sort=False)[["value", "ci_low", "ci_high", "n_users"]]
        .mean()
        .reset_index()
    )
    grouped = per_seed.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(
        mean=("value", "mean"),
        sd=("value", "std"),
        n_seeds=("value", "count"),
        boot_low=("ci_low", "first"),  # first non-NaN: with one valued seed, that seed's CI
        boot_high=("ci_high", "first"),
        n_users=("n_users", "mean"),
    ).reset_index()
    valued = per_seed[per_seed["value"].notna()]
    seeds = valued.groupby(keys, dropna=False, sort=False)["seed"].agg(
        lambda s: ";".join(_fmt_key(x) for x in sorted(s.unique()))
    )
    out = out.merge(seeds.rename("seeds").reset_index(), on=keys, how="left")
    out["seeds"] = out["seeds"].fillna("")

    n = out["n_seeds"].to_numpy()
    t = np.array([t_quantile_975(int(k) - 1) if k >= 2 else np.nan for k in n])
    half = t * out["sd"].to_numpy() / np.sqrt(np.maximum(n, 1))  # [rows]
    single = n == 1
    out["ci_low"] = np.where(single, out["boot_low"], out["mean"] - half)
    out["ci_high"] = np.where(single, out["boot_high"], out["mean"] + half)
    has_boot = single & out["boot_low"].notna().to_numpy()
    out["ci_method"] = np.where(has_boot, CI_BOOTSTRAP, np.where(n >= 2, CI_SEEDS, ""))
    return out[keys + list(AGG_VALUE_COLUMNS)]


# ------------------------------------------------------------------------------------ select/render


def select_stage(agg: pd.DataFrame, stage: str | int = "last") -> pd.DataFrame:
    """Rows of one stage: ``"all"``, an int N, or ``"last"`` = each setting's final stage.

    A setting is every key except stage, stage_name, split, group and metric, so runs with fewer
    stages still show their final model. Rows without a stage number (NaN) belong to no stage and
    are always kept.
    """
    if stage == "all":
        return agg
    stages = pd.to_numeric(agg["stage"], errors="coerce")
    if stage == "last":
        setting = [
            c for c in _keys(agg, AGG_VALUE_COLUMNS)
            if c not in ("stage", "stage_name", "split", "group", "metric")
        ]  # fmt: skip
        last = stages.groupby([agg[c] for c in setting], dropna=False).transform("max")
        return agg[(stages == last) | stages.isna()]
    chosen = agg[(stages == int(stage)) | stages.isna()]
    if not (pd.to_numeric(chosen["stage"], errors="coerce") == int(stage)).any():
        raise ValueError(f"no results for stage {stage}; stages present: {sorted(stages.dropna().unique())}")
    return chosen


def _number_format(mean: float, metric: str, efficiency: bool) -> str:
    """4 decimals for quality metrics; counts and large efficiency figures as grouped integers."""
    if not efficiency:
        return ".4f"
    if metric.endswith("params") or abs(mean) >= 100:
        return ",.0f"
    return ".2f"


def _format_cell(row: dict, efficiency: bool) -> str:
    """'0.4213 ± 0.0123' (± = half the CI's width); '†' marks a single seed."""
    mean = row["mean"]
    if pd.isna(mean):
        return "-"
    fmt = _number_format(mean, str(row["metric"]), efficiency)
    text = format(mean, fmt)
    low, high = row["ci_low"], row["ci_high"]
    if pd.notna(low) and pd.notna(high):
        text += " ± " + format((high - low) / 2, fmt)
    return text + ("†" if row["n_seeds"] == 1 else "")


def _sort_key(values: tuple) -> tuple:
    """Numbers numerically, then strings, then blanks -- for any mix of key types."""
    out = []
    for v in values:
        if v == "":
            out.append((2, 0.0, ""))
        else:
            try:
                out.append((0, float(v), ""))
            except ValueError:
                out.append((1, 0.0, v))
    return tuple(out)


def _in_order(values: Iterable, preferred: Sequence | None = None) -> list:
    """Distinct values in ``preferred`` order first, then in order of appearance."""
    seen = list(dict.fromkeys(values))
    head = [v for v in (preferred or ()) if v in seen]
    return head + [v for v in seen if v not in head]


def _unspecific(value) -> bool:
    """'-' or blank in an efficiency row: not tied to that key (eval_mode of an update, a run total)."""
    return _fmt_key(value) in ("", "-")


def _restates(basis: pd.DataFrame, col: str) -> bool:
    """A cfg.X override that only repeats column X (``cfg.method=ewc`` beside method ``ewc``)."""
    plain = col[4:]
    return (
        col.startswith("cfg.")
        and plain in basis
        and bool((basis[col].map(_fmt_key) == basis[plain].map(_fmt_key)).all())
    )


def _row_keys(basis: pd.DataFrame, leading: list[str], candidates: list[str]) -> list[str]:
    """``leading`` plus every candidate that varies within the table (restating cfg.X aside)."""
    varying = [c for c in candidates if basis[c].nunique(dropna=False) > 1 and not _restates(basis, c)]
    return list(leading) + varying


def _constant_notes(basis: pd.DataFrame, columns: list[str]) -> list[str]:
    """'name: value' for each column with one non-blank value in the table (stage with its name)."""
    notes = []
    for col in columns:
        values = basis[col].map(_fmt_key).unique()
        if len(values) != 1 or values[0] == "" or col == "stage_name" or _restates(basis, col):
            continue
        text = f"{col}: {values[0]}"
        if col == "stage" and "stage_name" in columns:
            names = basis["stage_name"].map(_fmt_key).unique()
            text += f" ({names[0]})" if len(names) == 1 and names[0] else ""
        notes.append(text)
    return notes


def _render_table(quality, efficiency, heading: str, row_keys: list[str], notes: list[str], metrics) -> str:
    """One markdown table: rows = settings, columns = [split /] group metric, then efficiency."""
    notes = list(notes)
    # the split: in the column label if a row holds several, a row key if it varies between rows
    split_in_label = False
    if "split" not in row_keys and len(quality):
        per_row = quality.groupby(row_keys, dropna=False)["split"].nunique(dropna=False).max()
        if per_row > 1:
            split_in_label = True
        elif quality["split"].nunique(dropna=False) > 1:
            row_keys = row_keys + ["split"]
        else:
            notes += _constant_notes(quality, ["split"])

    cells: dict[tuple, dict[str, str]] = {}
    seeds: dict[tuple, set] = {}
    labels = []
    for row in quality.to_dict("records"):
        key = tuple(_fmt_key(row[c]) for c in row_keys)
        label = f"{row['group']} {row['metric']}"
        if split_in_label:
            label = f"{_fmt_key(row['split'])} / {label}"
        if label in cells.setdefault(key, {}):
            raise ValueError(f"two results for {dict(zip(row_keys, key))}, column {label!r}")
        cells[key][label] = _format_cell(row, efficiency=False)
        seeds.setdefault(key, set()).add(int(row["n_seeds"]))
        labels.append((row["split"] if split_in_label else "", row["group"], row["metric"]))
    # column order: split and group as they appear, metrics in the order asked for
    split_order = _in_order(s for s, _, _ in labels)
    group_order = _in_order(g for _, g, _ in labels)
    metric_order = _in_order((m for _, _, m in labels), metrics)
    ordered = sorted(
        set(labels), key=lambda l: (split_order.index(l[0]), group_order.index(l[1]), metric_order.index(l[2]))
    )
    columns = [(f"{_fmt_key(s)} / " if split_in_label else "") + f"{g} {m}" for s, g, m in ordered]

    # efficiency rows attach to every row that matches them on the keys they are specific to
    eff_columns = _in_order(efficiency["metric"], metrics)
    for row in efficiency.to_dict("records"):
        key = tuple(_fmt_key(row[c]) for c in row_keys)
        match = [i for i, c in enumerate(row_keys) if c != "split" and not _unspecific(key[i])]
        targets = [k for k in cells if all(k[i] == key[i] for i in match)] or [key]
        for target in targets:
            cells.setdefault(target, {})[row["metric"]] = _format_cell(row, efficiency=True)
            seeds.setdefault(target, set()).add(int(row["n_seeds"]))

    lines = [f"### {heading}", ""]
    if notes:
        lines += ["; ".join(notes), ""]
    body = []
    for key in sorted(cells, key=_sort_key):
        n = sorted(seeds[key])
        n_text = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
        body.append(list(key) + [n_text] + [cells[key].get(c, "-") for c in columns + eff_columns])
    align = "l" * (len(row_keys) + 1) + "r" * (len(columns) + len(eff_columns))
    lines.append(markdown_table(row_keys + ["seeds"] + columns + eff_columns, body, align))
    return "\n".join(lines) + "\n"


LEGEND = (
    "Cells: mean ± half-width of a 95% CI. With 2+ seeds: Student-t interval over seeds (`seeds` ="
    " number of seeds). † = a single seed: the run's own percentile-bootstrap CI over users, which"
    " ignores training noise. Efficiency columns (trainable_params, update_seconds, ...) come from"
    " group `-`. `-` = not computed."
)


def render_markdown(
    agg: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    stage: str | int = "last",
    group_by: Sequence[str] | None = None,
) -> str:
    """Markdown tables from :func:`aggregate`'s output, one per dataset x protocol x eval_mode.

    ``metrics``: the metrics to show, in this order (quality and efficiency alike); default all.
    ``stage``: see :func:`select_stage`. ``group_by``: the leading row-key columns (default method,
    backbone); every other key that varies within a table (recipe, a cfg.* value, the stage under
    ``stage="all"``) is appended, so two different settings never share a cell. Listing dataset,
    protocol or eval_mode there makes them rows instead of separate tables. Keys that are constant
    within a table are stated above it (e.g. ``candidates: 1+99; stage: 2 (s2)``).

    Efficiency rows (group ``-``) join the tables and rows they match; a ``-`` or blank key in them
    (eval_mode ``-`` of an update, no stage for a run total) matches any value.
    """
    misplaced = [c for c in (group_by or ()) if c in ("group", "metric")]
    if misplaced:
        raise ValueError(f"{misplaced} are table columns, not row keys")
    keys = _keys(agg, AGG_VALUE_COLUMNS)
    leading = list(group_by or DEFAULT_ROW_KEYS)
    unknown = [c for c in leading if c not in keys]
    if unknown:
        raise ValueError(f"unknown --group-by columns {unknown}; available: {keys}")
    data = select_stage(agg, stage)
    if metrics:
        absent = [m for m in metrics if m not in set(data["metric"])]
        if absent:
            raise ValueError(f"metrics {absent} not in the results; available: {_in_order(data['metric'])}")
        data = data[data["metric"].isin(metrics)]

    quality = data[data["group"] != EFFICIENCY_GROUP]
    efficiency = data[data["group"] == EFFICIENCY_GROUP]
    basis_all = quality if len(quality) else efficiency
    table_keys = [c for c in TABLE_KEYS if c not in leading]
    candidates = [c for c in keys if c not in table_keys + leading + ["group", "metric", "split"]]
    parts = [LEGEND + "\n"]
    groups = basis_all.groupby(table_keys, dropna=False, sort=False) if table_keys else [((), basis_all)]
    named = [(tuple(map(_fmt_key, tkey)), table) for tkey, table in groups]
    for tkey, basis in sorted(named, key=lambda kv: _sort_key(kv[0])):
        fits = pd.Series(True, index=efficiency.index)
        for col, value in zip(table_keys, tkey):
            shown = efficiency[col].map(_fmt_key)
            fits &= (shown == value) | shown.isin(["", "-"])
        row_keys = _row_keys(basis, leading, candidates)
        notes = _constant_notes(basis, [c for c in candidates if c not in row_keys])
        table_quality = quality if quality.empty else basis  # basis = efficiency rows when no quality
        heading = " · ".join(tkey) or "results"
        parts.append(_render_table(table_quality, efficiency[fits], heading, row_keys, notes, metrics))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- paired differences

# a run is paired with the baseline run that agrees on these and on every cfg.* value not a method's own
PAIR_KEYS = ("dataset", "backbone", "recipe", "protocol", "seed")
DEFAULT_PAIRED_METRICS = ("HR@10", "NDCG@10", "MRR")
RESOLVABLE = "✓"
PAIRED_LEGEND = (
    "Δ = mean over users of metric(method) − metric(baseline), with a paired percentile-bootstrap 95% CI"
    f" over users (the same resamples for every metric). {RESOLVABLE} = resolvable: the CI excludes 0, so"
    " the gap is larger than resampling the evaluated users explains. No mark: not resolvable with these"
    " users, which does not show that the methods are equal."
)


def _is_method_key(col: str) -> bool:
    """cfg.method (restates the method column) and cfg.method.* (that method's own settings)."""
    return col == "cfg.method" or col.startswith("cfg.method.")


def _run_identity(frame: pd.DataFrame) -> dict:
    """One run's constant columns: method, the pair keys and the cfg.* values (first row)."""
    first = frame.iloc[0]
    cols = ["method", *PAIR_KEYS, *[c for c in frame.columns if c.startswith("cfg.")]]
    return {c: _fmt_key(first[c]) for c in cols if c in frame}


def _setting_label(ident: dict) -> str:
    """'ewc' or 'ewc (method.lam=0.1)': the method and its own swept settings."""
    own = [f"{c[4:]}={v}" for c, v in ident.items() if c.startswith("cfg.method.") and v != ""]
    return ident["method"] + (f" ({', '.join(own)})" if own else "")


def _pair_key(ident: dict) -> tuple:
    keys = [c for c in ident if c in PAIR_KEYS or (c.startswith("cfg.") and not _is_method_key(c))]
    return tuple(sorted((c, ident[c]) for c in keys))


def stage_ranks(run_dir: str | Path) -> dict[int, Path]:
    """{stage index: ranks.npz} of one run, from ``stages/NN_name/ranks.npz``."""
    out = {}
    for path in sorted(Path(run_dir).glob(f"stages/*/{RANKS_FILE}")):
        head = path.parent.name.split("_", 1)[0]
        if head.isdigit():
            out[int(head)] = path
    return out


def _same_candidates(run_a: Path, run_b: Path) -> bool | None:
    """Whether both runs ranked the same candidate sets (candidates.npz); None when a file is absent."""
    a, b = Path(run_a) / "candidates.npz", Path(run_b) / "candidates.npz"
    if not (a.is_file() and b.is_file()):
        return None
    with np.load(a) as x, np.load(b) as y:
        return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def _aligned(users_m, ranks_m, users_b, ranks_b, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' ranks on the same evaluated rows, in one order.

    Same protocol and seed give the same samples in the same order: identical user arrays pair by
    position (a user may have several targets). Otherwise users are matched by id, which needs each
    user once in each run and the same set of users.
    """
    if np.array_equal(users_m, users_b):
        return ranks_m, ranks_b
    unique = len(np.unique(users_m)) == len(users_m) and len(np.unique(users_b)) == len(users_b)
    if not unique or set(users_m.tolist()) != set(users_b.tolist()):
        raise ValueError(f"{where}: the two runs evaluated different users ({len(users_m)} vs {len(users_b)} rows);"
                         " a paired comparison needs the same users (same protocol, seed and split)")
    order_m, order_b = np.argsort(users_m, kind="stable"), np.argsort(users_b, kind="stable")
    return ranks_m[order_m], ranks_b[order_b]


def _paired_ks(metrics: Sequence[str]) -> list[int]:
    ks = set()
    for m in metrics:
        name, _, k = m.partition("@")
        if m != "MRR" and not (name in ("HR", "NDCG", "Recall") and k.isdigit() and int(k) >= 1):
            raise ValueError(f"paired metric {m!r}: per-user metrics are HR@K, NDCG@K, Recall@K and MRR")
        if k:
            ks.add(int(k))
    return sorted(ks) or [1]


def paired_differences(
    df: pd.DataFrame,
    baseline: str,
    metrics: Sequence[str] = DEFAULT_PAIRED_METRICS,
    stage: str | int = "last",
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, list[str]]:
    """Per-user differences method - ``baseline`` with paired bootstrap CIs; (table, notes on skipped runs).

    ``df``: :func:`collect`'s output (it names each run's dir). Each run whose method is not the baseline
    is paired with the baseline run of the same :data:`PAIR_KEYS` and non-method cfg.* values; the two
    must have ranked the same candidates (candidates.npz equal, when both exist) and the same users. The
    stage: ``"last"`` = the highest stage both have ranks for, an int, or ``"all"``. Rows of one method
    setting, stage, eval_mode, split and group are pooled over seeds (users x seeds rows) before the
    bootstrap; every metric uses ``seed`` and the same n, so the same resamples. Returns one row per
    setting x stage x eval_mode x split x group x metric: mean_diff, ci_low, ci_high, n_rows, n_users
    (per seed, ';'-joined when seeds differ), seeds, resolvable.
    """
    metrics = list(metrics)
    ks = _paired_ks(metrics)
    runs = {run: _run_identity(frame) for run, frame in df.groupby("run_dir", sort=True)}
    bases: dict[tuple, str] = {}
    for run, ident in runs.items():
        if ident["method"] == baseline:
            bases.setdefault(_pair_key(ident), run)
    if not bases:
        methods = sorted({i["method"] for i in runs.values()})
        raise ValueError(f"--baseline {baseline!r}: no run has that method; methods: {methods}")

    notes: list[str] = []
    pools: dict[tuple, dict] = {}
    for run, ident in runs.items():
        if ident["method"] == baseline:
            continue
        base = bases.get(_pair_key(ident))
        if base is None:
            notes.append(f"{run}: no {baseline} run with the same {', '.join(PAIR_KEYS)} and cfg.* values")
            continue
        if _same_candidates(Path(run), Path(base)) is False:
            raise ValueError(f"{run} and {base} ranked different candidates (candidates.npz differ): not paired")
        ranks_m, ranks_b = stage_ranks(run), stage_ranks(base)
        common = sorted(set(ranks_m) & set(ranks_b))
        if stage == "last":
            chosen = common[-1:]
        elif stage == "all":
            chosen = common
        else:
            chosen = [int(stage)] if int(stage) in common else []
        if not chosen:
            notes.append(f"{run} vs {base}: no {RANKS_FILE} of stage {stage} in both (stages/NN_name/{RANKS_FILE})")
            continue
        for index in chosen:
            entries_m, entries_b = load_ranks(ranks_m[index]), load_ranks(ranks_b[index])
            stage_name = ranks_m[index].parent.name.split("_", 1)[-1]
            for key in [k for k in entries_m if k in entries_b]:
                where = f"{ranks_m[index]} vs {ranks_b[index]}, {key}"
                r_m, r_b = _aligned(*entries_m[key], *entries_b[key], where)
                values_m, values_b = per_user_metrics(r_m, ks), per_user_metrics(r_b, ks)
                setting = (ident.get("dataset", ""), ident.get("protocol", ""), ident.get("backbone", ""),
                           ident.get("recipe", ""), _setting_label(ident), index, stage_name, *key)
                pool = pools.setdefault(setting, {"seeds": [], "users": [], "diff": {m: [] for m in metrics}})
                pool["seeds"].append(ident.get("seed", ""))
                pool["users"].append(len(r_m))
                for m in metrics:
                    pool["diff"][m].append(values_m[m] - values_b[m])  # [n_users] per-user paired difference

    names = ("dataset", "protocol", "backbone", "recipe", "method", "stage", "stage_name",
             "eval_mode", "split", "group")  # fmt: skip
    rows = []
    for setting, pool in pools.items():
        users = sorted(set(pool["users"]))
        for m in metrics:
            diff = np.concatenate(pool["diff"][m])  # users of every seed pooled: [sum of n_users]
            mean, low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
            rows.append({**dict(zip(names, setting)), "baseline": baseline, "metric": m, "mean_diff": mean,
                         "ci_low": low, "ci_high": high, "n_rows": len(diff),
                         "n_users": ";".join(map(str, users)), "seeds": ";".join(sorted(set(pool["seeds"]))),
                         "resolvable": bool(low > 0 or high < 0)})
    return pd.DataFrame(rows, columns=[*names, "baseline", "metric", "mean_diff", "ci_low", "ci_high", "n_rows",
                                       "n_users", "seeds", "resolvable"]), notes


def _diff_cell(row: dict) -> str:
    if pd.isna(row["mean_diff"]):
        return "-"
    text = f"{row['mean_diff']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
    return text + (f" {RESOLVABLE}" if row["resolvable"] else "")


def render_paired(diff: pd.DataFrame, baseline: str, n_boot: int = 1000, notes: Sequence[str] = ()) -> str:
    """Markdown for :func:`paired_differences`: per dataset x protocol x backbone x recipe x stage, a header
    saying what was compared on which data, protocol and users, the legend, and one row per method x
    eval_mode x split x group with a Δ column per metric."""
    lines = [f"## Paired differences vs `{baseline}`", "", PAIRED_LEGEND, ""]
    if diff.empty:
        lines += [f"(none: no method run could be paired with a `{baseline}` run that has {RANKS_FILE})", ""]
    table_keys = ["dataset", "protocol", "backbone", "recipe", "stage", "stage_name"]
    for tkey, table in diff.groupby(table_keys, sort=False):
        info = dict(zip(table_keys, tkey))
        seeds = sorted({s for text in table["seeds"] for s in str(text).split(";") if s}, key=_sort_key_one)
        users = sorted({u for text in table["n_users"] for u in str(text).split(";")}, key=_sort_key_one)
        lines += [
            f"### {info['dataset']} · {info['protocol']} · {info['backbone']} · {info['recipe']}:"
            f" stage {info['stage']} ({info['stage_name']}) vs `{baseline}`", "",
            f"Compared: each method's run minus the `{baseline}` run of the same seed, dataset, backbone,"
            f" recipe, protocol and non-method cfg.* values, on the same evaluated users and candidates"
            f" ({RANKS_FILE} of stage {info['stage']}). {len(seeds)} seed(s) ({', '.join(seeds)}),"
            f" {'/'.join(users)} users per seed and split/group; the users of all seeds are pooled (n ="
            f" users x seeds) and resampled {n_boot} times.", "",
        ]  # fmt: skip
        metrics = list(dict.fromkeys(table["metric"]))
        body = []
        for rkey, group in table.groupby(["method", "eval_mode", "split", "group"], sort=False):
            by_metric = {r["metric"]: r for r in group.to_dict("records")}
            first = next(iter(by_metric.values()))
            body.append([*rkey, first["n_rows"], first["seeds"].count(";") + 1 if first["seeds"] else 0]
                        + [_diff_cell(by_metric[m]) if m in by_metric else "-" for m in metrics])
        header = ["method", "eval_mode", "split", "group", "n", "seeds", *[f"Δ {m}" for m in metrics]]
        lines += [markdown_table(header, body, "llllrr" + "r" * len(metrics)), ""]
    if notes:
        lines += ["Not compared: " + "; ".join(notes) + ".", ""]
    return "\n".join(lines)


def _sort_key_one(value: str) -> tuple:
    return _sort_key((value,))


# ------------------------------------------------------------------------------------------- CLI


def _parse_stage(text: str) -> str | int:
    if text in ("last", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stage must be last, all or an integer, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsim.tables",
        description="Mean ± 95% CI over seeds from run output directories (results.csv + DONE).",
    )
    parser.add_argument("dirs", nargs="+", help="run directories or folders above them (searched recursively)")
    parser.add_argument("--out", help="output prefix for PREFIX.csv and PREFIX.md (default: <first DIR>/summary)")
    parser.add_argument("--metrics", type=_parse_list, help="comma list of metrics for the markdown, in order")
    parser.add_argument("--stage", type=_parse_stage, default="last", help="markdown stage: last (default), all or N")
    parser.add_argument("--group-by", type=_parse_list, help="leading row-key columns (default method,backbone)")
    parser.add_argument("--baseline", help="method to difference every other method against, per user (ranks.npz)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of --baseline (default 1000)")
    args = parser.parse_args(argv)

    diff = None
    try:
        df = collect(args.dirs)
        agg = aggregate(df)
        markdown = render_markdown(agg, metrics=args.metrics, stage=args.stage, group_by=args.group_by)
        if args.baseline:
            # per-user metrics only: efficiency and R-summary names in --metrics are not per user
            wanted = [m for m in args.metrics or () if m == "MRR" or m.partition("@")[0] in ("HR", "NDCG", "Recall")]
            diff, notes = paired_differences(df, args.baseline, wanted or DEFAULT_PAIRED_METRICS, args.stage,
                                             n_boot=args.n_boot)
            for note in notes:
                print(f"recsim.tables: --baseline: {note}", file=sys.stderr)
            markdown += "\n" + render_paired(diff, args.baseline, args.n_boot, notes)
    except (FileNotFoundError, ValueError) as err:  # NoResultsError, ResultsFileError included
        print(f"recsim.tables: error: {err}", file=sys.stderr)
        return 1

    first = Path(args.dirs[0])
    prefix = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "summary"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = Path(f"{prefix}.csv"), Path(f"{prefix}.md")
    agg.to_csv(csv_path, index=False)
    md_path.write_text(markdown)
    written = [csv_path, md_path]
    if diff is not None:
        written.append(Path(f"{prefix}_paired.csv"))
        diff.to_csv(written[-1], index=False)
    print(markdown)
    print(f"recsim.tables: wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
