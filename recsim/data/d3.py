"""D3's preprocessing of Amazon 2018, the data L2D uses: the reader ``amazon2018_d3``.

Bao et al. 2024, "Decoding Matters" (github.com/SAI990323/DecodingMatters, ``code/process.py``), read for its
rules only. From ``<data_dir>/<Cat>.json.gz`` (every review: what the authors' README downloads;
``d3.reviews=5core`` reads ``<Cat>_5.json.gz``, which their script takes first when it is there) and
``<data_dir>/meta_<Cat>.json.gz``:

1. Titles. A metadata line without a title, or whose title holds ``<span id`` (scraped HTML), makes its item
   unusable. Otherwise the title is cleaned as D3 cleans it (``&quot;`` -> ``"``, ``&amp;`` -> ``&``, then spaces
   and double quotes stripped from both ends) and is usable when longer than one character and at most
   ``max_title_words`` (20) words, counted by splitting on single spaces. An item with any unusable line is
   dropped, otherwise its last line's title is kept (the 2018 metadata repeats asins). A reviewed item with no
   metadata line is dropped.
2. Window. Reviews with start <= unixReviewTime <= end, start and end the first instant of the months
   ``window_start`` (2017-10) and ``window_end`` (2018-11): both ends inclusive, as D3 compares.
3. k-core. Users and items with fewer than ``k_core`` (5) reviews in the window are removed together, over and
   over until none is left (:func:`recsim.data.preprocess.filter_k_core`).
4. Widening. While fewer than ``min_items`` (10,000) items survive 2-3, the window starts one year earlier (same
   month, same end) and 2-3 are redone on the whole file. A window starting in ``earliest_year`` (1996, D3's) is
   kept whatever it holds, with a warning.

The samples (each next item after at most 10 previous ones) and the global 8:1:1 split are the protocol's:
:mod:`recsim.protocols.global_split`.

Choices (where D3 is silent, or recsim departs on purpose):
- Months are read in UTC; D3 reads them in the local zone of the machine that runs it. Amazon's stamps are UTC
  midnights and the 2018 data ends in October 2018, so only reviews dated 2018-11-01 can differ (kept here,
  dropped by a machine east of UTC).
- A (user, item) pair reviewed twice inside the window is kept once (its first review by time, ties in file
  order) before the k-core. D3 keeps and counts repeats; recsim's preprocessing drops them anyway, and dropping
  them first keeps the k-core intact afterwards.
- Rows come out in file order, so users appear in the order of their first kept review: the order in which D3
  breaks ties of the split. :func:`recsim.data.preprocess.preprocess` then runs as on every dataset: titles
  html-unescaped (the entities D3 leaves, such as ``&#39;``) with whitespace collapsed; its title and k-core
  filters change nothing here unless unescaping leaves a title empty.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from recsim.data import readers
from recsim.data.preprocess import filter_k_core
from recsim.data.schema import InteractionData

log = logging.getLogger(__name__)

REVIEW_FILES = {"full": "{category}.json.gz", "5core": "{category}_5.json.gz"}
REVIEW_KINDS = {"full": "every review", "5core": "the 5-core"}
MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


def d3_files(data_dir: str | Path, category: str, reviews: str = "full") -> list[Path]:
    """The review file (``reviews``: full or 5core) and the metadata file, under ``data_dir``."""
    if reviews not in REVIEW_FILES:
        raise ValueError(f"dataset.d3.reviews={reviews!r}: expected one of {', '.join(REVIEW_FILES)}")
    directory = Path(data_dir)
    return [directory / REVIEW_FILES[reviews].format(category=category), directory / f"meta_{category}.json.gz"]


def _origin(category: str, reviews: str) -> str:
    other = "5core" if reviews == "full" else "full"
    name = lambda kind: REVIEW_FILES[kind].format(category=category)
    return (f"download {name(reviews)} ({REVIEW_KINDS[reviews]}) and meta_{category}.json.gz (the metadata) from "
            f"{readers.URL_2018} into that directory; to use {name(other)} ({REVIEW_KINDS[other]}) instead, set "
            f"dataset.d3.reviews={other}")


def parse_month(text: object, key: str) -> tuple[int, int]:
    """``"YYYY-MM"`` -> (year, month); anything else is an error naming ``dataset.d3.<key>``."""
    match = MONTH.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"dataset.d3.{key}={text!r}: expected a month written YYYY-MM, e.g. 2017-10")
    return int(match.group(1)), int(match.group(2))


def month_start(year: int, month: int) -> int:
    """Unix seconds of the first instant of that month, in UTC (see the module's choices)."""
    return int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())


def d3_title(raw: object, max_words: int | None) -> str | None:
    """D3's cleaned title of one metadata line, or None when the line makes its item unusable."""
    if not isinstance(raw, str) or "<span id" in raw:
        return None
    title = raw.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(title) <= 1 or (max_words is not None and len(title.split(" ")) > max_words):
        return None
    return title


def _usable_titles(path: Path, origin: str, wanted: set[str], max_words: int | None) -> dict[str, str]:
    """asin -> title of every wanted asin all of whose metadata lines are usable (the last line's title)."""

    def skip(line: str) -> bool:  # metadata of unreviewed items is not parsed (the file covers the whole category)
        match = readers._ASIN_2018.search(line)
        return match is not None and match.group(1) not in wanted

    titles: dict[str, str] = {}
    unusable: set[str] = set()
    for lineno, record in readers._iter_records(path, origin, json.loads, skip):
        asin = record.get("asin")
        if asin in (None, ""):
            raise readers._error(path, "missing required field", origin, lineno, "asin")
        asin = str(asin)
        if asin not in wanted:
            continue
        title = d3_title(record.get("title"), max_words)
        if title is None:
            unusable.add(asin)
        else:
            titles[asin] = title  # a later line overwrites, as in D3
    return {asin: title for asin, title in titles.items() if asin not in unusable}


def window_core(reviews: pd.DataFrame, start: int, end: int, k_core: int) -> pd.DataFrame:
    """The reviews of [start, end], one per (user, item), k-cored; rows in file order (the frame's index)."""
    rows = reviews[((reviews["timestamp"] >= start) & (reviews["timestamp"] <= end)).to_numpy()]
    # a stable sort by time keeps file order among ties, so "first" is the first by time, then by file
    once = rows.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"]).sort_index()
    return filter_k_core(once, k_core).reset_index(drop=True)


def read_amazon2018_d3(
    data_dir: str | Path,
    category: str,
    *,
    k_core: int = 5,
    reviews: str = "full",
    window_start: str = "2017-10",
    window_end: str = "2018-11",
    min_items: int = 10_000,
    earliest_year: int = 1996,
    max_title_words: int | None = 20,
) -> InteractionData:
    """Amazon 2018 ``category`` processed as D3 does it (see the module docstring); the window used is in ``meta``."""
    start_year, start_month = parse_month(window_start, "window_start")
    end = month_start(*parse_month(window_end, "window_end"))
    if month_start(start_year, start_month) >= end:
        raise ValueError(f"dataset.d3.window_start={window_start!r} is not before dataset.d3.window_end={window_end!r}")
    paths = d3_files(data_dir, category, reviews)
    origin = _origin(category, reviews)
    for path in paths:  # both files before reading either: the review file alone can take minutes
        if not path.is_file():
            raise readers._error(path, "file not found", origin)
    every = readers._read_reviews(paths[0], origin)
    titles = _usable_titles(paths[1], origin, set(every["item_id"]), max_title_words)
    titled = every[every["item_id"].isin(titles).to_numpy()]

    year = start_year
    while True:
        kept = window_core(titled, month_start(year, start_month), end, k_core)
        n_items = int(kept["item_id"].nunique())
        if n_items >= min_items or year <= earliest_year:
            break
        log.info("%s: %d items from %d-%02d to %s, fewer than %d: starting a year earlier", category, n_items, year,
                 start_month, window_end, min_items)
        year -= 1
    if n_items < min_items:
        log.warning("%s: %d items from %d-%02d to %s, still fewer than dataset.d3.min_items=%d, but the window "
                    "already starts in dataset.d3.earliest_year=%d: kept as it is", category, n_items, year,
                    start_month, window_end, min_items, earliest_year)
    window = {"start": f"{year}-{start_month:02d}", "end": window_end, "start_timestamp": month_start(year, start_month),
              "end_timestamp": end, "years_widened": start_year - year, "items": n_items, "min_items": min_items}
    log.info("%s: D3 window %s .. %s (widened %d year(s)): %d users, %d items, %d reviews", category, window["start"],
             window_end, window["years_widened"], kept["user_id"].nunique(), n_items, len(kept))
    order = pd.unique(kept["item_id"]).tolist()
    items = readers._items_frame([{"item_id": i, "title": titles[i]} for i in order], ["item_id", "title"])
    return InteractionData(
        name=f"amazon2018_d3-{category}",
        interactions=kept,
        items=items,
        meta={"reader": "amazon2018_d3", "category": category, "reviews_file": paths[0].name, "window": window,
              "reviewed_items_without_usable_title": int(every["item_id"].nunique()) - len(titles)},
    )
