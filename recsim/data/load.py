"""One entry point from a ``dataset`` config to processed tables.

Pipeline: cache lookup -> read -> preprocess -> validate -> cache write. The result is always the whole
processed dataset: ``sample_users`` / ``sample_seed`` are applied by the protocol
(:func:`recsim.protocols.prepare.prepare_protocol`), which keeps cut times and candidates those of the
whole data and restricts only the evaluated and trained users. Readers are looked up in :data:`READERS`
by name (no ``if name == ...`` chains); each entry says how to read and which source files to fingerprint
for the cache key.

Config keys (see ``recsim/conf/dataset/*.yaml``): name, reader, data_dir, folder (staged reader),
category (raw readers), k_core, drop_untitled, max_title_words, sample_users, sample_seed, and
simulator (synthetic reader: the arguments of :func:`recsim.data.synthetic.simulate`), d3 (amazon2018_d3
reader: the arguments of :func:`recsim.data.d3.read_amazon2018_d3`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from recsim.data import d3, readers
from recsim.data.cache import load_or_build
from recsim.data.preprocess import preprocess
from recsim.data.schema import InteractionData
from recsim.data.synthetic import simulate

log = logging.getLogger(__name__)


def default_data_dir() -> str:
    """Env ``RECSIM_DATA`` if set, else ``data`` (relative to the working directory)."""
    return os.environ.get("RECSIM_DATA") or "data"


@dataclass(frozen=True)
class Reader:
    read: Callable[[dict], InteractionData]
    sources: Callable[[dict], list[Path]]  # files whose size+mtime go into the cache key
    args: tuple[str, ...]  # config keys that select what is read (they go into the cache key too)


def _need(cfg: dict, key: str) -> str:
    value = cfg.get(key)
    if value in (None, ""):
        raise ValueError(f"dataset {cfg.get('name')!r}: reader {cfg['reader']!r} needs dataset.{key}")
    return value


READERS: dict[str, Reader] = {
    "amazon2014_staged": Reader(
        read=lambda c: readers.read_amazon2014_staged(c["data_dir"], _need(c, "folder")),
        sources=lambda c: readers.staged_files(c["data_dir"], _need(c, "folder")),
        args=("folder",),
    ),
    "mcauley2014": Reader(
        read=lambda c: readers.read_mcauley2014(c["data_dir"], _need(c, "category")),
        sources=lambda c: readers.mcauley2014_files(c["data_dir"], _need(c, "category")),
        args=("category",),
    ),
    "amazon2018": Reader(
        read=lambda c: readers.read_amazon2018(c["data_dir"], _need(c, "category")),
        sources=lambda c: readers.amazon2018_files(c["data_dir"], _need(c, "category")),
        args=("category",),
    ),
    "amazon2018_d3": Reader(  # D3's window, titles and k-core happen inside the reader (recsim/data/d3.py)
        read=lambda c: d3.read_amazon2018_d3(c["data_dir"], _need(c, "category"), k_core=int(c.get("k_core", 5)),
                                             **(c.get("d3") or {})),
        sources=lambda c: d3.d3_files(c["data_dir"], _need(c, "category"), (c.get("d3") or {}).get("reviews", "full")),
        args=("category", "d3"),
    ),
    "recbole": Reader(
        read=lambda c: readers.read_recbole(
            c["data_dir"], _need(c, "folder"), c.get("atomic_name"), c.get("title_field") or "title"
        ),
        sources=lambda c: readers.recbole_files(c["data_dir"], _need(c, "folder"), c.get("atomic_name")),
        args=("folder", "atomic_name", "title_field"),
    ),
    "peso_blocks": Reader(
        read=lambda c: readers.read_peso_blocks(c["data_dir"], _need(c, "folder")),
        sources=lambda c: readers.peso_blocks_files(c["data_dir"], _need(c, "folder")),
        args=("folder",),
    ),
    "synthetic": Reader(
        read=lambda c: simulate(name=c["name"], **(c.get("simulator") or {})),
        sources=lambda c: [],
        args=("simulator",),
    ),
}


def _as_dict(cfg: Mapping) -> dict:
    if isinstance(cfg, DictConfig):  # resolves ${paths.data_dir}, ${seed} against the root config
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _describe(stats: dict) -> str:
    def day(ts):
        return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")

    return (
        f"{stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions, "
        f"time {day(stats['timestamp_min'])} .. {day(stats['timestamp_max'])}"
    )


def load_dataset(cfg: Mapping, cache_dir: str | Path | None = None) -> InteractionData:
    """Read (or take from the cache), preprocess and validate a dataset: always the whole dataset.

    `cfg` is the ``dataset`` config node (dict or DictConfig). ``cache_dir=None`` disables the cache.
    ``data_dir`` null falls back to :func:`default_data_dir`. Raises ValueError for an unknown reader or
    a dataset that preprocessing empties, DataFileError for missing or broken source files.
    """
    cfg = _as_dict(cfg)
    reader_name = cfg.get("reader")
    if reader_name not in READERS:
        raise ValueError(f"unknown dataset.reader {reader_name!r}; valid readers: {', '.join(sorted(READERS))}")
    reader = READERS[reader_name]
    cfg["name"] = cfg.get("name") or reader_name
    cfg["data_dir"] = cfg.get("data_dir") or default_data_dir()
    settings = {
        "name": cfg["name"],
        **{key: cfg.get(key) for key in reader.args},
        "k_core": int(cfg.get("k_core", 5)),
        "drop_untitled": bool(cfg.get("drop_untitled", True)),
        "max_title_words": cfg.get("max_title_words"),
    }

    def build() -> InteractionData:
        raw = reader.read(cfg)
        log.info("dataset %s: read %s", cfg["name"], _describe(raw.stats()))
        data = preprocess(
            replace(raw, name=cfg["name"]),
            k_core=settings["k_core"],
            drop_untitled=settings["drop_untitled"],
            max_title_words=settings["max_title_words"],
        )
        if len(data.interactions) == 0:
            raise ValueError(
                f"dataset {cfg['name']!r}: no interactions left after preprocessing "
                f"(k_core={settings['k_core']}, drop_untitled={settings['drop_untitled']}, "
                f"max_title_words={settings['max_title_words']})"
            )
        return data.validate()

    data = load_or_build(cache_dir, cfg["name"], reader_name, settings, reader.sources(cfg), build)
    log.info("dataset %s: processed %s", cfg["name"], _describe(data.stats()))
    return data
