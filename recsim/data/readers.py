"""Readers: each supported source turned into the raw canonical tables (see :mod:`recsim.data.schema`).

A reader only parses; it never filters. Titles are returned exactly as the source has them (HTML entities
and all), duplicates and sparse users are kept; :func:`recsim.data.preprocess.preprocess` does the cleaning.
Interaction rows keep the file's order, because that order is the tie-break among equal timestamps
(Amazon review times are whole days, so ties are common).

For the JSON sources the items table has one row per item that occurs in the interactions, in the order
of first occurrence there (the full metadata files list many more items, which are not kept). An
interacted item absent from the metadata gets an empty title (preprocessing then treats it as untitled)
rather than being an error: the 2014 and 2018 metadata files are known to miss a few items. The staged
items file is taken as it is (it lists exactly the interacted items).

Metadata columns are normalised across sources so that cached tables look alike:
``title`` / ``brand`` str ("" when missing), ``categories`` list[str] (flattened, duplicates removed,
first-seen order), ``price`` float (NaN when missing or not a single number), and for 2014 sources
``sales_rank`` float / ``sales_type`` str (the first entry of ``salesRank``).

Every problem with a file raises :class:`DataFileError` whose message names the file, the line and field
where that applies, the directory recsim looked in and where the public original can be downloaded.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from recsim.data.schema import DataFileError, InteractionData

URL_2014 = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html"
URL_2018 = "https://nijianmo.github.io/amazon/index.html"
STAGED_HINT = (
    "the staged tables (interactions.csv.gz, items.csv.gz) are derived from the McAuley Amazon 2014 5-core; "
    "either download reviews_<Cat>_5.json.gz and meta_<Cat>.json.gz from "
    "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html into the data directory and run with "
    "dataset.reader=mcauley2014, or rebuild the staged copy with build_amazon2014.py from the project's "
    "shared data folder (see README.md, Data)"
)

REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime")  # `overall` is optional: rating NaN without it

# Errors that mean "this gzip file is cut short or is not gzip at all".
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
# Errors that ast.literal_eval / json.loads raise on a bad line.
_PARSE_ERRORS = (ValueError, SyntaxError, TypeError, RecursionError, MemoryError)
# Finding a metadata line's asin without parsing it lets us skip unreviewed items cheaply (the metadata
# files cover whole categories, several times the 5-core). 2014 lines start with their asin; in 2018 lines
# it comes later, but in strict JSON `"asin": "` cannot occur inside a string value (quotes are escaped).
_ASIN_2014 = re.compile(r"""^\s*\{\s*['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
_ASIN_2018 = re.compile(r'"asin":\s*"([^"\\]+)"')


# ----------------------------------------------------------------------------------------------- files


def staged_files(data_dir: str | Path, folder: str) -> list[Path]:
    directory = Path(data_dir) / folder
    return [directory / "interactions.csv.gz", directory / "items.csv.gz"]


def mcauley2014_files(data_dir: str | Path, category: str) -> list[Path]:
    directory = Path(data_dir)
    return [directory / f"reviews_{category}_5.json.gz", directory / f"meta_{category}.json.gz"]


def amazon2018_files(data_dir: str | Path, category: str) -> list[Path]:
    directory = Path(data_dir)
    return [directory / f"{category}_5.json.gz", directory / f"meta_{category}.json.gz"]


def _origin_2014(category: str) -> str:
    return f"download reviews_{category}_5.json.gz and meta_{category}.json.gz from {URL_2014}"


def _origin_2018(category: str) -> str:
    return f"download {category}_5.json.gz and meta_{category}.json.gz from {URL_2018}"


def _error(
    path: Path, problem: str, origin: str, line: int | None = None, field: str | None = None
) -> DataFileError:
    """Build the one message format every reader uses: what, where in the file, where it was looked for, fix."""
    where = f" at line {line}" if line is not None else ""
    what = f" (field {field!r})" if field is not None else ""
    directory = str(path.parent)
    if not path.parent.is_absolute():
        directory += f" (= {path.parent.absolute()})"
    return DataFileError(
        f"{path}: {problem}{where}{what}. recsim expected this file in {directory}, under the data directory "
        f"set by dataset.data_dir (default: env RECSIM_DATA, else ./data). To get it: {origin}."
    )


# ---------------------------------------------------------------------------------------- line parsing


def _iter_records(
    path: Path, origin: str, parse: Callable[[str], object], skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a gzip JSON-lines file.

    `skip(line)` lets a caller pass over lines it will not use without parsing them (metadata of
    items that have no review); such lines are not checked for syntax.
    """
    if not path.is_file():
        raise _error(path, "file not found", origin)
    lineno = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip() or (skip is not None and skip(line)):
                    continue
                try:
                    record = parse(line)
                except _PARSE_ERRORS as exc:
                    raise _error(path, f"unparseable line ({type(exc).__name__}: {exc})", origin, lineno)
                if not isinstance(record, dict):
                    raise _error(path, "line is not a JSON object / dict", origin, lineno)
                yield lineno, record
    except _GZIP_ERRORS as exc:
        raise _error(path, f"truncated or corrupt gzip file, read up to line {lineno} ({exc})", origin)
    except UnicodeDecodeError as exc:
        raise _error(path, f"not UTF-8 text after line {lineno} ({exc})", origin)


def _parse_python_literal(line: str) -> object:
    """McAuley 2014 metadata lines are Python dict literals (single quotes), not JSON; fall back to JSON."""
    try:
        return ast.literal_eval(line)
    except _PARSE_ERRORS as first:
        try:
            return json.loads(line)
        except ValueError:
            raise first from None


def _read_reviews(path: Path, origin: str) -> pd.DataFrame:
    """Reviews JSON lines (same fields in 2014 and 2018) -> interactions table in file order."""
    users, items, stamps, ratings = [], [], [], []
    for lineno, record in _iter_records(path, origin, json.loads):
        for name in REVIEW_FIELDS:
            if record.get(name) in (None, ""):
                raise _error(path, "missing required field", origin, lineno, name)
        try:
            stamp = int(record["unixReviewTime"])
        except (TypeError, ValueError):
            raise _error(path, "unixReviewTime is not an integer", origin, lineno, "unixReviewTime")
        try:
            rating = float(record["overall"]) if record.get("overall") is not None else math.nan
        except (TypeError, ValueError):
            raise _error(path, "overall is not a number", origin, lineno, "overall")
        users.append(str(record["reviewerID"]))
        items.append(str(record["asin"]))
        stamps.append(stamp)
        ratings.append(rating)
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="str"),
            "item_id": pd.Series(items, dtype="str"),
            "timestamp": np.asarray(stamps, dtype=np.int64),
            "rating": np.asarray(ratings, dtype=np.float64),
        }
    )


def _read_meta(
    path: Path, origin: str, parse: Callable[[str], object], wanted: set[str], asin_pattern: re.Pattern
) -> dict[str, dict]:
    """asin -> first metadata record, for the asins in `wanted` only (later duplicates are ignored).

    Lines whose asin (found by `asin_pattern`) is not wanted are skipped without parsing, so a malformed
    line of an unreviewed item goes unreported; lines where the pattern finds nothing are parsed.
    """

    def skip(line: str) -> bool:
        match = asin_pattern.search(line)
        return match is not None and match.group(1) not in wanted

    found: dict[str, dict] = {}
    for lineno, record in _iter_records(path, origin, parse, skip):
        asin = record.get("asin")
        if asin in (None, ""):
            raise _error(path, "missing required field", origin, lineno, "asin")
        asin = str(asin)
        if asin in wanted and asin not in found:
            found[asin] = record
    return found


# ------------------------------------------------------------------------------------- field cleaning


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _flatten(value: object) -> list[str]:
    """Category paths -> one list: 2014 has a list of lists, 2018 a flat list; duplicates go, order stays."""
    names: list = []
    for entry in value if isinstance(value, (list, tuple)) else []:
        names.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    return list(dict.fromkeys(name for name in names if isinstance(name, str) and name))


def _price(value: object) -> float:
    """2014 prices are numbers; 2018 prices are strings like "$12.99" (ranges and junk -> NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lstrip("$").replace(",", "")
        try:
            return float(text)
        except ValueError:
            return math.nan
    return math.nan


def _item_order(interactions: pd.DataFrame) -> list[str]:
    return pd.unique(interactions["item_id"]).tolist()


# ------------------------------------------------------------------------------------------- readers


def read_mcauley2014(data_dir: str | Path, category: str) -> InteractionData:
    """McAuley 2014 5-core: ``reviews_<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz`` (Python-literal lines)."""
    reviews_path, meta_path = mcauley2014_files(data_dir, category)
    origin = _origin_2014(category)
    interactions = _read_reviews(reviews_path, origin)
    order = _item_order(interactions)
    meta = _read_meta(meta_path, origin, _parse_python_literal, set(order), _ASIN_2014)
    rows = []
    for asin in order:
        record = meta.get(asin, {})
        rank = record.get("salesRank")
        rank_type, rank_value = next(iter(rank.items())) if isinstance(rank, dict) and rank else ("", math.nan)
        rows.append(
            {
                "item_id": asin,
                "title": _text(record.get("title")),
                "brand": _text(record.get("brand")),
                "categories": _flatten(record.get("categories")),
                "price": _price(record.get("price")),
                "sales_rank": _price(rank_value),
                "sales_type": _text(rank_type),
            }
        )
    items = _items_frame(rows, ["item_id", "title", "brand", "categories", "price", "sales_rank", "sales_type"])
    return InteractionData(
        name=f"mcauley2014-{category}",
        interactions=interactions,
        items=items,
        meta={"reader": "mcauley2014", "category": category, "items_without_meta": len(order) - len(meta)},
    )


def read_amazon2018(data_dir: str | Path, category: str) -> InteractionData:
    """Amazon 2018 (Ni et al.) 5-core: ``<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz`` (strict JSON lines).

    The 2018 metadata repeats some asins; the first line wins. Its ``category`` list becomes ``categories``.
    """
    reviews_path, meta_path = amazon2018_files(data_dir, category)
    origin = _origin_2018(category)
    interactions = _read_reviews(reviews_path, origin)
    order = _item_order(interactions)
    meta = _read_meta(meta_path, origin, json.loads, set(order), _ASIN_2018)
    rows = []
    for asin in order:
        record = meta.get(asin, {})
        rows.append(
            {
                "item_id": asin,
                "title": _text(record.get("title")),
                "brand": _text(record.get("brand")),
                "categories": _flatten(record.get("category")),
                "price": _price(record.get("price")),
            }
        )
    items = _items_frame(rows, ["item_id", "title", "brand", "categories", "price"])
    return InteractionData(
        name=f"amazon2018-{category}",
        interactions=interactions,
        items=items,
        meta={"reader": "amazon2018", "category": category, "items_without_meta": len(order) - len(meta)},
    )


def _items_frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("item_id", "title", "brand", "sales_type"):
        if column in frame:
            frame[column] = frame[column].astype("str")
    for column in ("price", "sales_rank"):
        if column in frame:
            frame[column] = frame[column].astype(np.float64)
    return frame


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """All columns as str, empty cells as "" (so ids such as 0439893577 keep their leading zero)."""
    if not path.is_file():
        raise _error(path, "file not found", STAGED_HINT)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, compression="gzip")
    except _GZIP_ERRORS as exc:
        raise _error(path, f"truncated or corrupt gzip file ({exc})", STAGED_HINT)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise _error(path, f"malformed CSV ({exc})", STAGED_HINT)
    for name in required:
        if name not in frame.columns:
            raise _error(path, f"header lacks a column (has {list(frame.columns)})", STAGED_HINT, 1, name)
        empty = np.flatnonzero(frame[name].to_numpy() == "")
        if name != "title" and len(empty):
            # +2: line 1 is the header and rows count from 0 (staged files have no quoted newlines)
            raise _error(path, "empty value", STAGED_HINT, int(empty[0]) + 2, name)
    return frame


def _literal_list(text: str) -> list[str]:
    """Staged categories are the inside of a Python list (``'Beauty', 'Makeup'``); parse back to a list."""
    if not text:
        return []
    try:
        return _flatten(ast.literal_eval(f"[{text}]"))
    except _PARSE_ERRORS:
        return [text]


def read_amazon2014_staged(data_dir: str | Path, folder: str) -> InteractionData:
    """The staged 2014 5-core copies: ``<data_dir>/<folder>/interactions.csv.gz`` and ``items.csv.gz``.

    The interactions file has no ratings, so ``rating`` is NaN. Its row order (P5 order, chronological
    within a user) is kept as the tie-break order. Extra item columns are kept (Beauty has brand,
    categories, price, sales rank; Toys only titles).
    """
    inter_path, items_path = staged_files(data_dir, folder)
    inter = _read_csv(inter_path, ("user_id", "item_id", "timestamp"))
    stamps = pd.to_numeric(inter["timestamp"], errors="coerce")
    bad = np.flatnonzero((stamps.isna() | (stamps != stamps.round())).to_numpy())
    if len(bad):
        raise _error(inter_path, "timestamp is not an integer", STAGED_HINT, int(bad[0]) + 2, "timestamp")
    interactions = pd.DataFrame(
        {
            "user_id": inter["user_id"].astype("str"),
            "item_id": inter["item_id"].astype("str"),
            "timestamp": stamps.astype(np.int64),
            "rating": np.full(len(inter), np.nan, dtype=np.float64),
        }
    )
    items = _read_csv(items_path, ("item_id", "title"))
    items = items.drop_duplicates("item_id", keep="first").reset_index(drop=True)
    if "categories" in items:
        items["categories"] = items["categories"].map(_literal_list).astype(object)
    for column in ("price", "sales_rank"):
        if column in items:
            items[column] = pd.to_numeric(items[column], errors="coerce").astype(np.float64)
    missing = sorted(set(interactions["item_id"]) - set(items["item_id"]))
    if missing:
        raise _error(
            items_path, f"{len(missing)} interacted items have no row, e.g. {missing[:3]}", STAGED_HINT, None, "item_id"
        )
    return InteractionData(
        name=folder, interactions=interactions, items=items, meta={"reader": "amazon2014_staged", "folder": folder}
    )


# -------------------------------------------------------------------------------- RecBole atomic files

RECBOLE_HINT = (
    "write RecBole atomic files <data_dir>/<folder>/<name>.inter and <name>.item: tab-separated, first line a "
    "typed header such as user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float (.inter) and "
    "item_id:token<TAB>title:token_seq (.item); see https://recbole.io/docs/user_guide/data/atomic_files.html"
)
RECBOLE_INTER_FIELDS = ("user_id", "item_id", "timestamp")  # rating is optional: NaN without it


def recbole_files(data_dir: str | Path, folder: str, name: str | None = None) -> list[Path]:
    """``<data_dir>/<folder>/<name>.inter`` and ``.item``; ``name`` defaults to ``folder`` (RecBole's layout)."""
    directory = Path(data_dir) / folder
    stem = name or folder
    return [directory / f"{stem}.inter", directory / f"{stem}.item"]


def _read_atomic(path: Path, required: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Header fields (name -> column, the ``:type`` suffix dropped) and (line number, cells) per data row.

    Lines are split on tabs only, with no quoting (RecBole's own reader does the same), so titles may hold
    commas and quotes. A row with another number of cells than the header is an error.
    """
    if not path.is_file():
        raise _error(path, "file not found", RECBOLE_HINT)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise _error(path, f"not UTF-8 text ({exc})", RECBOLE_HINT)
    if not lines or not lines[0].strip():
        raise _error(path, "empty file, no header", RECBOLE_HINT, 1)
    header = lines[0].split("\t")
    columns = {cell.split(":", 1)[0].strip(): i for i, cell in enumerate(header)}
    for name in required:
        if name not in columns:
            raise _error(path, f"header lacks a field (has {list(columns)})", RECBOLE_HINT, 1, name)
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            problem = f"{len(cells)} tab-separated cells, the header has {len(header)}"
            raise _error(path, problem, RECBOLE_HINT, lineno)
        rows.append((lineno, cells))
    return columns, rows


def _number(path: Path, text: str, lineno: int, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(path, f"{text!r} is not a number", RECBOLE_HINT, lineno, field) from None
    if not math.isfinite(value):
        raise _error(path, f"{text!r} is not a finite number", RECBOLE_HINT, lineno, field)
    return value


def read_recbole(
    data_dir: str | Path, folder: str, name: str | None = None, title_field: str = "title"
) -> InteractionData:
    """RecBole atomic files ``<folder>/<name>.inter`` + ``<name>.item`` -> the canonical tables.

    ``.inter`` needs ``user_id``, ``item_id``, ``timestamp`` (``rating`` is read when present; other fields,
    whatever their type, are ignored). ``timestamp:float`` values become int64 seconds (a fractional part is
    dropped; ties then keep file order). ``.item`` needs ``item_id`` and ``title_field`` (``title:token_seq``
    or ``title:token``; the text is kept as written). As for the JSON sources the items table has one row per
    interacted item, in order of first occurrence, and an item without an ``.item`` row gets an empty title
    (preprocessing's ``drop_untitled`` decides); the first ``.item`` row of a repeated id wins.
    """
    inter_path, item_path = recbole_files(data_dir, folder, name)
    columns, rows = _read_atomic(inter_path, RECBOLE_INTER_FIELDS)
    users, items, stamps, ratings = [], [], [], []
    has_rating = "rating" in columns
    for lineno, cells in rows:
        for field in ("user_id", "item_id"):
            if not cells[columns[field]].strip():
                raise _error(inter_path, "empty value", RECBOLE_HINT, lineno, field)
        users.append(cells[columns["user_id"]].strip())
        items.append(cells[columns["item_id"]].strip())
        stamps.append(int(_number(inter_path, cells[columns["timestamp"]].strip(), lineno, "timestamp")))
        rating = cells[columns["rating"]].strip() if has_rating else None
        ratings.append(math.nan if rating is None else _number(inter_path, rating, lineno, "rating"))
    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="str"),
            "item_id": pd.Series(items, dtype="str"),
            "timestamp": np.asarray(stamps, dtype=np.int64),
            "rating": np.asarray(ratings, dtype=np.float64),
        }
    )
    item_columns, item_rows = _read_atomic(item_path, ("item_id", title_field))
    titles: dict[str, str] = {}
    for lineno, cells in item_rows:
        item = cells[item_columns["item_id"]].strip()
        if not item:
            raise _error(item_path, "empty value", RECBOLE_HINT, lineno, "item_id")
        titles.setdefault(item, cells[item_columns[title_field]])
    order = _item_order(interactions)
    frame = _items_frame([{"item_id": i, "title": titles.get(i, "")} for i in order], ["item_id", "title"])
    return InteractionData(
        name=name or folder,
        interactions=interactions,
        items=frame,
        meta={"reader": "recbole", "folder": folder, "items_without_meta": sum(i not in titles for i in order)},
    )


# ------------------------------------------------------------------------------ PESO's released blocks

PESO_COMMIT = "edbec5f68ddc83e39f22a041f1f2eaf1c4ad172e"
PESO_BLOCKS = 5  # block 0 = first 60% of the data by time, blocks 1-4 the later windows
BLOCK_STRIDE = 10**7  # block-order stamp = block * BLOCK_STRIDE + position in the user's sequence
PRE_BLOCK = -1  # block index of history that no block file lists as current (before the user's first block)


def _peso_origin(folder: str) -> str:
    name = Path(folder).name
    return (
        f"copy data/{name}.all.block_<b>.json.gz (b = 0..{PESO_BLOCKS - 1}; gzip the .json if needed) from "
        f"github.com/hsyoo32/peso, commit {PESO_COMMIT}, folder data/, into <data_dir>/{folder}"
    )


def peso_blocks_files(data_dir: str | Path, folder: str) -> list[Path]:
    """``<data_dir>/<folder>/<name>.all.block_<b>.json.gz`` for b = 0..4, ``name`` = the folder's last part."""
    directory = Path(data_dir) / folder
    name = Path(folder).name
    return [directory / f"{name}.all.block_{b}.json.gz" for b in range(PESO_BLOCKS)]


def _read_block(path: Path, origin: str) -> dict[str, tuple[list[str], list[str]]]:
    """user -> (previous_block, current_block) of one block file, item ids as str."""
    if not path.is_file():
        raise _error(path, "file not found", origin)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            block = json.load(handle)
    except _GZIP_ERRORS as exc:
        raise _error(path, f"truncated or corrupt gzip file ({exc})", origin)
    except UnicodeDecodeError as exc:
        raise _error(path, f"not UTF-8 text ({exc})", origin)
    except ValueError as exc:
        raise _error(path, f"not one JSON object ({exc})", origin)
    if not isinstance(block, dict):
        raise _error(path, "top level is not a JSON object {user_id: {...}}", origin)
    out = {}
    for user, entry in block.items():
        lists = []
        for field in ("previous_block", "current_block"):
            value = entry.get(field) if isinstance(entry, dict) else None
            if not isinstance(value, list) or not all(isinstance(i, (str, int)) and str(i) for i in value):
                raise _error(path, f"user {user!r}: not a list of item ids", origin, None, field)
            lists.append([str(i) for i in value])
        out[str(user)] = (lists[0], lists[1])
    return out


def read_peso_blocks(data_dir: str | Path, folder: str) -> InteractionData:
    """PESO's released continual blocks ``<data_dir>/<folder>/<name>.all.block_{0..4}.json.gz``.

    Each file maps user -> {"previous_block": items before block b, "current_block": items inside block b,
    chronological}. A user's sequence is the ``previous_block`` of the first block they appear in, then the
    ``current_block`` of every block they appear in, in block order.

    Choices (the files have no times and no titles):
    - ``timestamp`` is a *block-order stamp*, not a time: ``block * 10**7 + position in the user's whole
      sequence``, so order within a user is kept and ``stamp // 10**7`` is the block of the interaction.
      History before a user's first block (that first block's ``previous_block``) gets block -1 (negative
      stamps): no block lists it as current, so no protocol stage trains or tests on it. In the released
      files it is always empty (users' first ``previous_block`` is []).
    - A later block's ``previous_block`` must equal the user's sequence so far (blocks 0..b-1 as read);
      any other list (items missing, reordered or extra, e.g. from a block file that left the user out)
      is a DataFileError naming the file, the user and the first differing position, rather than a guess
      at which block the odd items belong to. The released CDs and Video_Games files are consistent.
    - ``title`` is ``"item <id>"`` (no titles exist; prompts are meant to show semantic IDs), ``rating`` NaN.
      The authors' files are already filtered: use ``k_core: 0`` and ``drop_untitled: false``
      (preprocessing still drops a repeated (user, item) pair; the released files have none).
    """
    paths = peso_blocks_files(data_dir, folder)
    origin = _peso_origin(folder)
    sequences: dict[str, list[str]] = {}  # user -> items so far, in order
    blocks_of: dict[str, list[int]] = {}  # user -> block index of each item, aligned with sequences
    for b, path in enumerate(paths):
        for user, (previous, current) in _read_block(path, origin).items():
            if user not in sequences:
                sequences[user], blocks_of[user] = list(previous), [PRE_BLOCK] * len(previous)
            elif previous != sequences[user]:
                known = sequences[user]
                at = next((i for i, (x, y) in enumerate(zip(previous, known)) if x != y), min(len(previous), len(known)))
                raise _error(path, f"user {user!r}: previous_block ({len(previous)} items) disagrees with the "
                             f"user's {len(known)} items of the earlier blocks, first at position {at}",
                             origin, None, "previous_block")
            sequences[user] += current
            blocks_of[user] += [b] * len(current)
    users, items, stamps = [], [], []
    for user, seq in sequences.items():
        if len(seq) >= BLOCK_STRIDE:
            raise _error(paths[0], f"user {user!r} has {len(seq)} items, too many for block-order stamps", origin)
        users += [user] * len(seq)
        items += seq
        stamps += [blk * BLOCK_STRIDE + pos for pos, blk in enumerate(blocks_of[user])]
    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="str"),
            "item_id": pd.Series(items, dtype="str"),
            "timestamp": np.asarray(stamps, dtype=np.int64),
            "rating": np.full(len(items), np.nan, dtype=np.float64),
        }
    )
    order = _item_order(interactions)
    frame = _items_frame([{"item_id": i, "title": f"item {i}"} for i in order], ["item_id", "title"])
    return InteractionData(
        name=Path(folder).name,
        interactions=interactions,
        items=frame,
        meta={"reader": "peso_blocks", "folder": folder, "timestamps": "block-order stamps, not times",
              "block_of_stamp": "stamp // 10**7"},
    )
