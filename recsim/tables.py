"""Results tables from run output directories: mean and 95% CI over seeds.

    python -m recsim.tables DIR [DIR ...] [--out PREFIX] [--metrics NDCG@3,HR@1,...]
                            [--stage last|all|N] [--group-by method,backbone,...]

Each DIR is one run's output directory or any folder above many (a multirun sweep): every
``results.csv`` below it is read, unless no ``DONE`` marker sits beside it (an unfinished or crashed
job; it is skipped and named on stderr). Tables are built from these files alone -- no W&B, no
re-evaluation -- so a sweep can be tabulated while it is still running.

``results.csv`` has one row per stage x group x metric (see REQUIRED_COLUMNS) plus ``cfg.*`` columns
holding swept config values. Efficiency rows use group ``-`` (trainable_params, update_seconds, ...).

Aggregation (:func:`aggregate`): rows are merged over seeds when every other column agrees, so any
setting that differs -- a ``cfg.*`` value, the backbone, the protocol -- keeps results apart. The
interval is mean +- t_{0.975, n-1} * sd / sqrt(n) over the n seeds (Student's t: with 3-5 seeds the
normal 1.96 would understate the interval by 20-60%). With one seed there is no spread over seeds, so
the run's own percentile-bootstrap CI over users is shown instead and marked: it is narrower than a
seed interval would be, because it ignores training noise.

Outputs: ``PREFIX.csv`` (long format, every stage and metric: keys, mean, ci_low, ci_high, n_seeds,
ci_method, ...) and ``PREFIX.md`` (one markdown table per dataset x protocol x eval_mode; printed to
stdout too). ``--stage``, ``--metrics`` and ``--group-by`` shape the markdown only.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = (
    "dataset", "method", "backbone", "recipe", "protocol", "eval_mode", "seed", "stage",
    "stage_name", "split", "group", "metric", "value", "ci_low", "ci_high", "n_users",
)  # fmt: skip
# columns of a results.csv (plus the run dir) that are measurements, not identity
RAW_VALUE_COLUMNS = ("seed", "value", "ci_low", "ci_high", "n_users", "run_dir")
# columns aggregate() adds; everything else in its output is a key
AGG_VALUE_COLUMNS = ("mean", "ci_low", "ci_high", "sd", "n_seeds", "ci_method", "seeds", "n_users")
TABLE_KEYS = ("dataset", "protocol", "eval_mode")  # one markdown table per combination
DEFAULT_ROW_KEYS = ("method", "backbone")  # always shown; any other key that varies is added
EFFICIENCY_GROUP = "-"
CI_SEEDS = "t over seeds"
CI_BOOTSTRAP = "bootstrap over users (1 seed)"

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables, 4 decimals).
# Beyond 30 the normal 1.96 is used: at df = 31 the true value is 2.040, so the interval is at most
# 4% too narrow there, and nobody runs 32 seeds of an LLM fine-tune.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


class ResultsFileError(ValueError):
    """A results.csv is unreadable or lacks required columns; the message names the file."""


class NoResultsError(FileNotFoundError):
    """No finished run (results.csv with a DONE marker) under the given directories."""


def t_quantile_975(df: int) -> float:
    """t_{0.975, df} from :data:`T_975`, 1.96 for df > 30."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else 1.96


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


def read_results(path: str | Path) -> pd.DataFrame:
    """One results.csv, checked for the required columns, with a ``run_dir`` column added."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"{path}: cannot be read as CSV ({err}); truncated run?") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsFileError(
            f"{path}: missing required columns {missing} (a results.csv needs {list(REQUIRED_COLUMNS)})"
        )
    for col in ("value", "ci_low", "ci_high", "n_users"):
        try:
            df[col] = pd.to_numeric(df[col])
        except (ValueError, TypeError) as err:
            raise ResultsFileError(f"{path}: column {col!r} is not numeric ({err})") from err
    df["run_dir"] = str(path.parent)
    return df


def collect(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every finished run's results.csv under ``dirs``, concatenated (one row per result).

    See :func:`find_results` for what counts as a run. Runs without a DONE marker are skipped and listed on stderr. Raises :class:`NoResultsError` when
    nothing finished is found and :class:`ResultsFileError` for a malformed file.
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


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


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
    lines.append(_md_row(row_keys + ["seeds"] + columns + eff_columns))
    lines.append(_md_row(["---"] * (len(row_keys) + 1) + ["---:"] * (len(columns) + len(eff_columns))))
    for key in sorted(cells, key=_sort_key):
        n = sorted(seeds[key])
        n_text = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
        values = [cells[key].get(c, "-") for c in columns + eff_columns]
        lines.append(_md_row(list(key) + [n_text] + values))
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
    args = parser.parse_args(argv)

    try:
        agg = aggregate(collect(args.dirs))
        markdown = render_markdown(agg, metrics=args.metrics, stage=args.stage, group_by=args.group_by)
    except (FileNotFoundError, ValueError) as err:  # NoResultsError, ResultsFileError included
        print(f"recsim.tables: error: {err}", file=sys.stderr)
        return 1

    first = Path(args.dirs[0])
    prefix = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "summary"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = Path(f"{prefix}.csv"), Path(f"{prefix}.md")
    agg.to_csv(csv_path, index=False)
    md_path.write_text(markdown)
    print(markdown)
    print(f"recsim.tables: wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
