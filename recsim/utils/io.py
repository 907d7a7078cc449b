"""Atomic writes: a reader never sees a half-written result file or stage folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
