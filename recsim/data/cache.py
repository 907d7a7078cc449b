"""Cache of processed tables as parquet, so a dataset is read and preprocessed once per setting.

Layout: ``<cache_dir>/<name>-<key>/`` holding ``interactions.parquet``, ``items.parquet``,
``ground_truth.parquet`` (synthetic data only), ``stats.json`` and ``meta.json``.

The key is a hash of everything that can change the result: the reader name and its arguments, the
preprocessing settings, :data:`DATA_FORMAT_VERSION` and each source file's name and sha256 of its bytes.
Editing or replacing a source file therefore gives a new key (the old directory is simply left behind),
while a copy of the data folder elsewhere, or a file touched without changing it, keeps it. Hashing reads
every byte, so each hash is memoised by (absolute path, size, mtime) in the process and in
``<cache_dir>/content_hashes.json``: a repeat run only stats the files.

Writes are atomic: the tables go to a temporary directory beside the target, which is then renamed into
place, so an interrupted run never leaves a half-written entry under the final name. On load the row
counts (users, items, interactions, time range, item rows) are recomputed and compared with
``stats.json``; any mismatch or unreadable file is reported with a warning and the entry is rebuilt,
so a damaged cache is never trusted blindly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsim.data.schema import InteractionData

# Bump when readers or preprocessing change what they produce, so older caches are not reused.
DATA_FORMAT_VERSION = 1

TABLES = ("interactions", "items", "ground_truth")


_MEMO: dict[str, str] = {}  # "path|size|mtime_ns" -> sha256, for this process
MEMO_FILE = "content_hashes.json"


def _stat_key(path: Path) -> str:
    info = path.stat()
    return f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}"


def content_hash(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 of the file's bytes, memoised by (absolute path, size, mtime) in the process and, with
    `memo_dir`, in ``<memo_dir>/content_hashes.json`` (a memo: losing or racing on it only costs a re-hash)."""
    path = Path(path)
    key = _stat_key(path)
    if key in _MEMO:
        return _MEMO[key]
    memo_path = Path(memo_dir) / MEMO_FILE if memo_dir is not None else None
    memo = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}  # a damaged memo is rebuilt
    if key not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        memo[key] = digest.hexdigest()
        if memo_path is not None:
            try:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo_path.with_name(f".{MEMO_FILE}.tmp-{uuid.uuid4().hex[:8]}")
                tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
                os.replace(tmp, memo_path)
            except OSError as exc:
                warnings.warn(f"could not write the content-hash memo {memo_path}: {exc}")
    _MEMO[key] = memo[key]
    return memo[key]


def fingerprint(paths: Iterable[str | Path], memo_dir: str | Path | None = None) -> list[dict]:
    """Name and content hash of each source (a missing file is recorded as such, and will fail to read).
    The folder is left out on purpose: the same bytes elsewhere are the same data."""
    out = []
    for path in map(Path, paths):
        if path.is_file():
            out.append({"file": path.name, "sha256": content_hash(path, memo_dir)})
        else:
            out.append({"file": path.name, "missing": True})
    return out


def cache_key(reader: str, settings: dict, sources: Iterable[str | Path], memo_dir: str | Path | None = None) -> str:
    material = {
        "reader": reader,
        "settings": settings,
        "format": DATA_FORMAT_VERSION,
        "sources": fingerprint(sources, memo_dir),
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# keys that say where something is, never what it is: left out of every cache key
PATH_KEYS = frozenset({"data_dir", "cache_dir", "output_dir", "tokenizer_path"})


def drop_path_keys(value):
    """`value` (plain dicts and lists) without any PATH_KEYS entry, at any depth."""
    if isinstance(value, dict):
        return {k: drop_path_keys(v) for k, v in value.items() if k not in PATH_KEYS}
    if isinstance(value, list):
        return [drop_path_keys(v) for v in value]
    return value


def package_hash(root: str | Path | None = None) -> str:
    """sha256 over the recsim package's sources: every .py and .yaml under `root` (default: the installed
    package), in sorted order of their paths relative to it, each path followed by its bytes. A key that
    includes it changes with any code or config edit, unlike a version string nobody bumps."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "dataset"
    return Path(cache_dir) / f"{safe}-{key}"


def _expected_stats(data: InteractionData) -> dict:
    return {**data.stats(), "item_rows": int(len(data.items))}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(value)
    return str(value)


def save(data: InteractionData, directory: str | Path) -> Path:
    """Write `data` under `directory` atomically (temp dir + rename); returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for table in TABLES:
            frame = getattr(data, table)
            if frame is not None:
                frame.to_parquet(tmp / f"{table}.parquet", index=False, engine="pyarrow")
        (tmp / "stats.json").write_text(json.dumps(_expected_stats(data), indent=2) + "\n")
        meta = {"name": data.name, "meta": data.meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        stale = None
        if directory.exists():  # an entry that failed its check: move it aside, then replace it
            stale = directory.with_name(f".{directory.name}.stale-{uuid.uuid4().hex[:8]}")
            os.rename(directory, stale)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same entry first
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _read_table(path: Path) -> pd.DataFrame:
    """Parquet -> DataFrame, with list columns turned back into Python lists (pyarrow gives arrays)."""
    table = pq.read_table(path)
    frame = table.to_pandas()
    for field in table.schema:
        if str(field.type).startswith(("list", "large_list")):
            frame[field.name] = frame[field.name].map(lambda v: [] if v is None else list(v)).astype(object)
    return frame


def load(directory: str | Path) -> InteractionData | None:
    """The cached entry, or None when there is none or it fails its check (with a warning then)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    try:
        expected = json.loads((directory / "stats.json").read_text())
        meta = json.loads((directory / "meta.json").read_text())
        tables = {
            table: _read_table(directory / f"{table}.parquet") if (directory / f"{table}.parquet").exists() else None
            for table in TABLES
        }
        data = InteractionData(
            name=meta["name"],
            interactions=tables["interactions"],
            items=tables["items"],
            ground_truth=tables["ground_truth"],
            meta=meta["meta"],
        )
        actual = _expected_stats(data)
    except Exception as exc:  # any unreadable piece means the entry cannot be trusted
        warnings.warn(f"data cache {directory} is unreadable ({type(exc).__name__}: {exc}); rebuilding it")
        return None
    if actual != expected:
        diff = {k: (expected.get(k), actual.get(k)) for k in actual if expected.get(k) != actual.get(k)}
        warnings.warn(f"data cache {directory} does not match its stats.json (expected, found): {diff}; rebuilding it")
        return None
    return data


def load_or_build(
    cache_dir: str | Path | None,
    name: str,
    reader: str,
    settings: dict,
    sources: Iterable[str | Path],
    build: Callable[[], InteractionData],
) -> InteractionData:
    """Return the cached tables for this (reader, settings, sources), else `build()` them and cache them.

    ``cache_dir=None`` disables the cache. A failure to write the cache only warns: the data is still good.
    """
    if cache_dir is None:
        return build()
    directory = cache_path(cache_dir, name, cache_key(reader, settings, sources, memo_dir=cache_dir))
    data = load(directory)
    if data is not None:
        data.meta = {**data.meta, "cache": str(directory), "cache_hit": True}
        return data
    data = build()
    try:
        save(data, directory)
    except OSError as exc:
        warnings.warn(f"could not write the data cache {directory}: {exc}")
    data.meta = {**data.meta, "cache": str(directory), "cache_hit": False}
    return data
