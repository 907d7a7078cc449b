"""The results of a run, in one place: the results.csv schema, its checks, the per-user ranks file, and
the one markdown table renderer that results.md, ``recsim.tables`` and ``recsim.reproduce`` share.

results.csv: one row per stage x split x group x metric (:data:`COLUMNS`), plus ``cfg.*`` columns holding
the command-line overrides of the job. Efficiency rows (trainable_params, update_seconds, ...) use group
:data:`EFFICIENCY_GROUP` and eval_mode ``-``; their CI and n_users are empty. R-matrix summary rows
(forgetting, transfer) use split ``R``.

ranks.npz (:func:`save_ranks` / :func:`load_ranks`): per (eval_mode, split, group) the evaluated user ids
and the 0-based rank of each user's target (-1: not retrieved), in evaluation order. Every metric of
recsim is a function of that rank (recsim.eval.metrics), so two runs' files give per-user, paired
comparisons without re-evaluating anything (``python -m recsim.tables --baseline``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# column -> kind: "str", "int" (a whole number, never empty), "stage" (a whole number or empty: a
# run-level row belongs to no stage), "float" (a number or empty), "count" (a number >= 0 or empty)
COLUMNS = {
    "dataset": "str", "method": "str", "backbone": "str", "recipe": "str", "protocol": "str",
    "eval_mode": "str", "candidates": "str", "seed": "int", "stage": "stage", "stage_name": "str",
    "split": "str", "group": "str", "metric": "str", "value": "float", "ci_low": "float", "ci_high": "float",
    "n_users": "count",
}  # fmt: skip
RESULT_COLUMNS = list(COLUMNS)  # the order the runner writes
# every column but candidates, which results written before it existed lack (it then reads as blank)
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c != "candidates")
NUMERIC_COLUMNS = tuple(c for c, kind in COLUMNS.items() if kind != "str")
EFFICIENCY_GROUP = "-"
RANKS_FILE = "ranks.npz"


class ResultsFileError(ValueError):
    """A results.csv (or ranks.npz) is unreadable or breaks the schema; the message names the file."""


# ------------------------------------------------------------------------------------------ schema


def _where(path) -> str:
    return str(path) if path is not None else "results"


def validate(frame: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """``frame`` checked against :data:`COLUMNS`, numeric columns converted; raises ResultsFileError.

    The error names the file (``path``), the column, the first offending row and value, and what is
    allowed. Extra columns (``cfg.*``, ``run_dir``) pass unchecked. Returns a converted copy.
    """
    where = _where(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsFileError(
            f"{where}: missing required columns {missing} (a results.csv needs {list(REQUIRED_COLUMNS)})"
        )
    frame = frame.copy()
    for col in NUMERIC_COLUMNS:
        if col not in frame:
            continue
        raw = frame[col]
        numbers = pd.to_numeric(raw, errors="coerce")
        bad = numbers.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        kind = COLUMNS[col]
        allowed = {"int": "an integer", "stage": "an integer or empty", "float": "a number or empty",
                   "count": "a number >= 0 or empty"}[kind]  # fmt: skip
        if kind == "int":
            bad |= numbers.isna()
        if kind in ("int", "stage"):
            bad |= numbers.notna() & (numbers != numbers.round())
        if kind == "count":
            bad |= numbers < 0
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw.iloc[row].item() if hasattr(raw.iloc[row], "item") else raw.iloc[row]  # numpy -> plain
            raise ResultsFileError(f"{where}: column {col!r}, row {row}: {value!r} is not {allowed}")
        frame[col] = numbers
    for col in ("group", "metric"):
        blank = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise ResultsFileError(f"{where}: column {col!r}, row {row} is empty (a name is required)")
    crossed = frame["ci_low"] > frame["ci_high"]
    if crossed.any():
        row = int(np.flatnonzero(crossed.to_numpy())[0])
        raise ResultsFileError(
            f"{where}: row {row}: ci_low {frame['ci_low'].iloc[row]} > ci_high {frame['ci_high'].iloc[row]}"
        )
    return frame


def read_results(path: str | Path) -> pd.DataFrame:
    """One results.csv, validated, with a ``run_dir`` column (the folder it sits in)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"{path}: cannot be read as CSV ({err}); truncated run?") from err
    frame = validate(frame, path)
    frame["run_dir"] = str(path.parent)
    return frame


def order_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The schema's columns in :data:`RESULT_COLUMNS` order, then every other column as it appears."""
    ordered = [c for c in RESULT_COLUMNS if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in RESULT_COLUMNS]]


def write_results(path: str | Path, frame: pd.DataFrame) -> None:
    """Validate, order the columns and write atomically (a reader never sees half a file)."""
    from recsim.utils.io import write_csv

    path = Path(path)
    write_csv(path, order_columns(validate(frame, path)))


# ------------------------------------------------------------------------------------------- ranks


def save_ranks(path: str | Path, entries: Mapping[tuple[str, str, str], tuple[Sequence[int], Sequence[int]]]) -> None:
    """Write ``{(eval_mode, split, group): (user_ids, ranks)}`` to ``path`` (np.savez, int64, atomic).

    ``ranks[i]`` is the 0-based rank of user ``user_ids[i]``'s target, in evaluation order; -1 = not
    retrieved (generation mode, as in recsim.eval.metrics.per_user_metrics). Keys go into a
    string array (``keys``, [E, 3]) and entry ``i`` into ``users_i`` / ``ranks_i``, so the file loads
    without pickle.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    keys = []
    for i, (key, (users, ranks)) in enumerate(entries.items()):
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, str) and k for k in key)):
            raise ValueError(f"{path}: a ranks key is (eval_mode, split, group), three non-empty strings; got {key!r}")
        users, ranks = _int_array(users, path, key, "user ids"), _int_array(ranks, path, key, "ranks")
        if len(users) != len(ranks):
            raise ValueError(f"{path}: {key}: {len(users)} user ids but {len(ranks)} ranks")
        if len(ranks) and ranks.min() < -1:
            raise ValueError(f"{path}: {key}: ranks must be >= 0 (0 = ranked first) or -1 (a generated list"
                             f" without the target), got {ranks.min()}")
        keys.append(key)
        arrays[f"users_{i}"], arrays[f"ranks_{i}"] = users, ranks
    arrays["keys"] = np.array(keys, dtype=str).reshape(len(keys), 3)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a bare tmp name
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def _int_array(values, path, key, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{path}: {key}: {what} must be 1-D, got shape {array.shape}")
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"{path}: {key}: {what} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def load_ranks(path: str | Path) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """What :func:`save_ranks` wrote: ``{(eval_mode, split, group): (user_ids, ranks)}``, int64 arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ranks file")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = data["keys"]
            out = {}
            for i, key in enumerate(keys.reshape(-1, 3)):
                out[tuple(str(k) for k in key)] = (data[f"users_{i}"].astype(np.int64),
                                                   data[f"ranks_{i}"].astype(np.int64))
    except (OSError, ValueError, KeyError) as err:  # truncated zip, a pickled array, a missing entry
        raise ResultsFileError(f"{path}: not a ranks file written by recsim.results.save_ranks ({err})") from err
    return out


# ---------------------------------------------------------------------------------------- markdown


def markdown_table(header: Sequence, rows: Iterable[Sequence], align: str | Sequence[str] = "l") -> str:
    """A GitHub markdown table, the one renderer of recsim's tables (no trailing newline).

    ``align``: one letter per column, ``l`` (``---``) or ``r`` (``---:``, for numbers); a single letter
    applies to every column. ``|`` inside a cell is escaped so that it cannot split the cell.
    """
    header = [str(h) for h in header]
    letters = list(align) if len(align) > 1 else list(align) * len(header)
    if len(letters) != len(header) or set(letters) - {"l", "r"}:
        raise ValueError(f"align {align!r}: need 'l' or 'r' for each of {len(header)} columns")
    lines = [_md_row(header), _md_row(["---:" if a == "r" else "---" for a in letters])]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under a header of {len(header)}: {row}")
        lines.append(_md_row(row))
    return "\n".join(lines)


def _md_row(cells: Iterable) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def frame_markdown(frame: pd.DataFrame) -> str:
    """A (pivoted) DataFrame as a markdown table: index levels become the leading columns; a column
    tuple ``(group, metric)`` becomes ``group / metric``; empty cells stay blank."""
    flat = frame.reset_index()
    names = [" / ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in flat.columns]
    n_index = flat.shape[1] - frame.shape[1]
    return markdown_table(names, ([_cell(v) for v in row] for row in flat.itertuples(index=False)),
                          align="l" * n_index + "r" * frame.shape[1])


def matrix_markdown(R, row_labels: Sequence[str], col_labels: Sequence[str], fmt: str = ".4f") -> str:
    """R[i, j] as a markdown table: a row per model (after stage i), a column per split j; NaN -> '-'."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"R has shape {R.shape}, labels give {(len(row_labels), len(col_labels))}")
    rows = [[label] + ["-" if np.isnan(x) else format(x, fmt) for x in row] for label, row in zip(row_labels, R)]
    return markdown_table(["model \\ split", *col_labels], rows, align="l" + "r" * len(col_labels))


def render_run_markdown(results: pd.DataFrame, cfg, split_of: dict[int, str]) -> str:
    """results.md: per stage, its own split (the diagonal of R) for every group; the full matrix follows."""
    quality = results[results.eval_mode != "-"]
    metrics = [m for m in cfg.eval.table_metrics if m in set(quality.metric)]
    lines = [f"## {cfg.method.name} on {cfg.dataset.name} ({cfg.backbone.name}, {cfg.stage.name}, seed {cfg.seed})", ""]
    for mode in quality.eval_mode.unique():
        sel = quality[(quality.eval_mode == mode) & quality.metric.isin(metrics)]
        sel = sel[sel.split == sel.stage.map(split_of)]
        texts = [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(sel.value, sel.ci_low, sel.ci_high)]
        cell = sel.assign(text=texts)
        table = cell.pivot_table(index=["stage", "stage_name", "split"], columns=["group", "metric"], values="text",
                                 aggfunc="first")
        cands = sel.candidates.iloc[0] if len(sel) else ""
        lines += [f"### {mode} ranking ({cands} candidates; mean [95% bootstrap CI over users])", "",
                  frame_markdown(table) if len(table) else "(no rows)", ""]
    eff = results[results.eval_mode == "-"].pivot_table(index=["stage", "stage_name"], columns="metric", values="value")
    lines += ["### update cost", "", frame_markdown(eff.map(lambda v: f"{v:.6g}")), ""]
    return "\n".join(lines)
