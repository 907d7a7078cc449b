"""Preprocessing: raw canonical tables -> the tables every protocol uses.

Steps, in this order (each choice is deliberate):

1. **Titles cleaned**: ``html.unescape`` once (the Amazon metadata stores ``&amp;``, ``&#39;``...), then
   runs of whitespace collapsed to one space and the ends stripped. Non-string titles (NaN/None) become "".
2. **Untitled items dropped** (``drop_untitled=True``): a title is *usable* when it is non-empty after
   cleaning and, if ``max_title_words`` is set, has at most that many whitespace-separated words. Items
   without a usable title and all their interactions are removed *before* k-core, so the k-core
   guarantee holds for the data that is finally used. ``max_title_words`` applies even when
   ``drop_untitled`` is off (it is a separate, explicit request).
3. **Chronological order per user**: users keep the order of their first row in the source; within a
   user rows are sorted by timestamp with a stable sort, so equal timestamps keep the source order
   (Amazon times are whole days; the source order is the only tie-break there is).
4. **Duplicate (user, item) pairs removed**, keeping the chronologically first occurrence (after step 3).
5. **Iterative k-core**: users and items with fewer than ``k_core`` interactions are removed at the same
   time, repeatedly, until every remaining user and item has at least ``k_core``. ``k_core <= 1``
   disables it. The result may be empty; callers decide whether that is an error.
6. The items table keeps one row (the first) per remaining item, in its original order.
"""

from __future__ import annotations

import html
from dataclasses import replace

import numpy as np
import pandas as pd

from recsim.data.schema import InteractionData


def clean_title(value: object) -> str:
    """HTML entities unescaped once, whitespace collapsed and stripped; anything but a str gives ""."""
    if not isinstance(value, str):
        return ""
    return " ".join(html.unescape(value).split())


def usable_title(title: str, max_title_words: int | None = None) -> bool:
    """A cleaned title is usable when non-empty and, when a limit is set, not longer than it in words."""
    if not title:
        return False
    return max_title_words is None or len(title.split()) <= max_title_words


def chronological(interactions: pd.DataFrame) -> pd.DataFrame:
    """Group rows by user (first-appearance order) and sort each user's rows by time, ties in row order."""
    users = pd.factorize(interactions["user_id"])[0]
    order = np.lexsort((np.arange(len(interactions)), interactions["timestamp"].to_numpy(), users))
    return interactions.iloc[order].reset_index(drop=True)


def filter_k_core(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep rows whose user and item both have >= k rows, repeating until nothing changes (row order kept)."""
    if k <= 1:
        return interactions
    while True:
        user_counts = interactions["user_id"].map(interactions["user_id"].value_counts())
        item_counts = interactions["item_id"].map(interactions["item_id"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return interactions.reset_index(drop=True)
        interactions = interactions[keep.to_numpy()]


def preprocess(
    data: InteractionData, k_core: int = 5, drop_untitled: bool = True, max_title_words: int | None = None
) -> InteractionData:
    """Clean titles, drop untitled items, order chronologically, dedupe pairs, k-core (see module doc)."""
    items = data.items.drop_duplicates("item_id", keep="first").copy()
    items["title"] = items["title"].map(clean_title).astype("str")
    inter = data.interactions
    if drop_untitled or max_title_words is not None:
        # items missing from the items table have no title at all, so they go too
        if drop_untitled:
            usable = items["title"].map(lambda t: usable_title(t, max_title_words))
        else:
            usable = items["title"].map(lambda t: len(t.split()) <= max_title_words)
        keep_ids = set(items.loc[usable.to_numpy(), "item_id"])
        inter = inter[inter["item_id"].isin(keep_ids).to_numpy()]
    inter = chronological(inter)
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="first").reset_index(drop=True)
    inter = filter_k_core(inter, k_core)
    items = items[items["item_id"].isin(set(inter["item_id"])).to_numpy()].reset_index(drop=True)
    settings = {"k_core": k_core, "drop_untitled": drop_untitled, "max_title_words": max_title_words}
    return InteractionData(
        name=data.name,
        interactions=inter,
        items=items,
        ground_truth=_restrict_truth(data.ground_truth, inter),
        meta={**data.meta, "preprocess": settings},
    )




def _restrict_truth(truth: pd.DataFrame | None, interactions: pd.DataFrame) -> pd.DataFrame | None:
    if truth is None:
        return None
    users = set(interactions["user_id"])
    return truth[truth["user_id"].isin(users).to_numpy()].reset_index(drop=True)


def sample_user_ids(user_ids, n: int | None, seed: int) -> set[str] | None:
    """A seeded uniform sample of `n` distinct user ids, without replacement (None: no sampling).

    Users are drawn from the *sorted* distinct ids, so the sample depends only on the set of users and
    the seed, not on row order. ``n=None`` or ``n >= #users`` gives None (every user).
    """
    users = np.sort(pd.unique(np.asarray(list(user_ids), dtype=object)))
    if n is None or n >= len(users):
        return None
    if n < 1:
        raise ValueError(f"dataset.sample_users must be >= 1 or null, got {n}")
    return set(np.random.default_rng(seed).choice(users, size=n, replace=False).tolist())


def sample_users(data: InteractionData, n: int | None, seed: int) -> InteractionData:
    """A seeded uniform sample of `n` users with all their interactions, and only the items they touch.

    The users are :func:`sample_user_ids` of the interactions' user ids. Row order is kept. The sample is
    not re-filtered: an item may have fewer than k interactions inside it. ``n=None`` or ``n >= #users``
    returns `data` unchanged. (Runs do not use this table-level sample: they keep the whole dataset and
    restrict the protocol to the sampled users, see :mod:`recsim.protocols.prepare`.)
    """
    chosen = sample_user_ids(data.interactions["user_id"], n, seed)
    if chosen is None:
        return data
    inter = data.interactions[data.interactions["user_id"].isin(chosen).to_numpy()].reset_index(drop=True)
    touched = set(inter["item_id"])
    items = data.items[data.items["item_id"].isin(touched).to_numpy()].reset_index(drop=True)
    return replace(
        data,
        interactions=inter,
        items=items,
        ground_truth=_restrict_truth(data.ground_truth, inter),
        meta={**data.meta, "sample_users": {"n": n, "seed": seed}},
    )
