"""The two canonical tables every dataset is turned into.

``interactions``: user_id (str), item_id (str), timestamp (int64, unix seconds), rating (float64, NaN
when the source has none). Rows are in chronological order per user; ties keep the source's order.
``items``: item_id (str), title (str), plus any metadata the source has (brand, categories, price...).
Item ids and item text are kept apart on purpose: later recipes map ids to semantic IDs, not titles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "rating")
ITEM_COLUMNS = ("item_id", "title")


class DataFileError(RuntimeError):
    """A data file is missing, truncated or malformed; the message names the file and its public source."""


@dataclass
class InteractionData:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    # synthetic data only: one row per user with the simulator's truth (drifted, old/new interests)
    ground_truth: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    def stats(self) -> dict:
        inter = self.interactions
        return {
            "dataset": self.name,
            "users": int(inter["user_id"].nunique()),
            "items": int(inter["item_id"].nunique()),
            "interactions": int(len(inter)),
            "timestamp_min": int(inter["timestamp"].min()) if len(inter) else None,
            "timestamp_max": int(inter["timestamp"].max()) if len(inter) else None,
        }

    def validate(self) -> "InteractionData":
        missing = [c for c in INTERACTION_COLUMNS if c not in self.interactions.columns]
        if missing:
            raise DataFileError(f"dataset {self.name!r}: interactions table lacks columns {missing}")
        missing = [c for c in ITEM_COLUMNS if c not in self.items.columns]
        if missing:
            raise DataFileError(f"dataset {self.name!r}: items table lacks columns {missing}")
        unknown = set(self.interactions["item_id"]) - set(self.items["item_id"])
        if unknown:
            raise DataFileError(
                f"dataset {self.name!r}: {len(unknown)} interacted items have no row in the items table"
            )
        return self
