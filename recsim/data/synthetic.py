"""A seeded simulator of users whose preferences change at a known time, with the truth attached.

Model (all draws from one ``numpy.random.default_rng(seed)``, so the same arguments give identical tables):

- ``num_categories`` named categories (e.g. "Lipstick", "Hiking Boots"); items are spread over them
  round-robin, so category sizes differ by at most one. Each item has a readable title unique in the
  dataset: two descriptive words + the category noun ("Velvet Rose Lipstick"), so LLM prompts read well.
  Within a category, items have a mild popularity skew (weight ∝ 1/sqrt(rank)) so that, as in real
  data, some items are more common than others without starving the tail below a 5-core.
- Every user has ``interests_per_user`` categories. A ``drift_share`` of users (chosen at random) switch
  to as many *new* categories, disjoint from the old ones, at the drift time
  ``T = start_timestamp + drift_time * horizon`` (abrupt switch; the old interests stop at T).
- Independently, an ``active_share_after`` of users interact both before and after T (their
  interactions are split between the two periods in proportion drift_time : 1 - drift_time, at least
  one on each side); the others interact only before T. A drifted user who is not active after T has a
  drift that the data cannot show; the truth still says ``drifted=True``.
- Each user has a length drawn uniformly in [min_len, max_len]. Every interaction picks, with
  probability 1 - noise, a category from the user's current interests and an item of it; otherwise any
  item. A user never draws the same item twice (so deduplication removes nothing). Timestamps are
  uniform within the user's period(s), whole seconds; rows are grouped by user, chronological.

``ground_truth`` has one row per user: user_id, drifted, active_after, old_interests, new_interests
(lists of category names; for users who did not drift new_interests equals old_interests, i.e. "the
interests in force after T"). ``meta["drift_timestamp"]`` is T.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsim.data.schema import InteractionData

DAY = 86_400

# Category nouns, each with its own descriptive words; two words + noun make a title.
CATEGORY_WORDS: dict[str, tuple[list[str], list[str]]] = {
    "Lipstick": (["Velvet", "Matte", "Glossy", "Satin", "Creamy", "Sheer", "Bold", "Classic"],
                 ["Rose", "Coral", "Berry", "Nude", "Ruby", "Plum", "Cherry", "Mauve"]),
    "Hiking Boots": (["Trail", "Summit", "Alpine", "Canyon", "Ridge", "Rugged", "Lightweight", "Waterproof"],
                     ["Runner", "Trekker", "Explorer", "Scout", "Ranger", "Pathfinder", "Climber", "Rover"]),
    "Board Game": (["Castle", "Pirate", "Galaxy", "Dragon", "Jungle", "Mystery", "Kingdom", "Island"],
                   ["Quest", "Siege", "Race", "Heist", "Legends", "Tactics", "Voyage", "Builders"]),
    "Coffee Beans": (["Dark", "Medium", "Light", "Smooth", "Rich", "Bright", "Single-Origin", "Organic"],
                     ["Colombian", "Ethiopian", "Sumatra", "Espresso", "Breakfast", "Mocha", "Kenyan", "Guatemalan"]),
    "Headphones": (["Wireless", "Studio", "Noise-Cancelling", "Compact", "Bass", "Sport", "Travel", "Pro"],
                   ["Pulse", "Echo", "Wave", "Nova", "Sonic", "Aura", "Beat", "Vibe"]),
    "Mystery Novel": (["Silent", "Midnight", "Hidden", "Crimson", "Frozen", "Broken", "Last", "Secret"],
                      ["Harbor", "Witness", "Garden", "Letter", "Station", "Manor", "Key", "Alibi"]),
    "Yoga Mat": (["Eco", "Thick", "Grip", "Travel", "Cushioned", "Non-Slip", "Cork", "Premium"],
                 ["Lotus", "Balance", "Flow", "Zen", "Harmony", "Breath", "Stretch", "Core"]),
    "Kitchen Knife": (["Forged", "Damascus", "Carbon", "Ceramic", "Japanese", "German", "Chef's", "Hollow-Edge"],
                      ["Santoku", "Paring", "Utility", "Bread", "Carving", "Nakiri", "Cleaver", "Slicer"]),
    "Puzzle": (["Jigsaw", "Wooden", "Panorama", "Mini", "Giant", "Vintage", "Scenic", "Family"],
               ["Lighthouse", "Meadow", "Cityscape", "Aquarium", "Mountains", "Sunset", "Library", "Orchard"]),
    "Face Cream": (["Hydrating", "Night", "Day", "Firming", "Soothing", "Brightening", "Gentle", "Rich"],
                   ["Aloe", "Vitamin C", "Shea", "Collagen", "Green Tea", "Honey", "Retinol", "Jasmine"]),
    "Guitar Strings": (["Bronze", "Nickel", "Coated", "Light", "Medium", "Heavy", "Phosphor", "Silk"],
                       ["Acoustic", "Electric", "Classical", "Bass", "Folk", "Jazz", "Blues", "Studio"]),
    "Video Game": (["Cosmic", "Shadow", "Neon", "Ancient", "Steel", "Wild", "Arcane", "Turbo"],
                   ["Odyssey", "Arena", "Chronicles", "Rally", "Frontier", "Outlaws", "Legacy", "Storm"]),
}
# More categories than nouns: the same nouns again with a line prefix ("Travel Lipstick").
LINE_PREFIXES = ["", "Deluxe", "Kids'", "Vintage", "Limited"]


def category_names(num_categories: int) -> list[str]:
    nouns = list(CATEGORY_WORDS)
    limit = len(nouns) * len(LINE_PREFIXES)
    if not 1 <= num_categories <= limit:
        raise ValueError(f"num_categories must be in 1..{limit}, got {num_categories}")
    return [
        f"{LINE_PREFIXES[i // len(nouns)]} {nouns[i % len(nouns)]}".strip() for i in range(num_categories)
    ]


def _titles(rng: np.random.Generator, category: str, noun: str, count: int) -> list[str]:
    """`count` distinct titles for one category: shuffled word pairs, numbered once the pairs run out."""
    first, second = CATEGORY_WORDS[noun]
    pairs = [f"{a} {b}" for a in first for b in second]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    return [
        f"{pairs[i % len(pairs)]} {category}" + (f" No. {i // len(pairs) + 1}" if i >= len(pairs) else "")
        for i in range(count)
    ]


def simulate(
    num_users: int,
    num_items: int,
    num_categories: int,
    interests_per_user: int,
    drift_share: float,
    drift_time: float,
    active_share_after: float,
    min_len: int,
    max_len: int,
    seed: int,
    start_timestamp: int = 1_600_000_000,
    horizon_days: int = 365,
    noise: float = 0.05,
    name: str = "synthetic",
) -> InteractionData:
    """Simulate users with (possibly drifting) category interests; see the module docstring for the model."""
    if 2 * interests_per_user > num_categories:
        raise ValueError(
            f"drifted users need {interests_per_user} new categories disjoint from {interests_per_user} old ones: "
            f"num_categories={num_categories} is too small"
        )
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 0.0 < drift_time < 1.0:
        raise ValueError(f"drift_time is a share of the horizon, in (0, 1): got {drift_time}")
    rng = np.random.default_rng(seed)
    categories = category_names(num_categories)

    # items: round-robin over categories; ids padded so that string order equals numeric order
    item_ids = np.array([f"i{n:05d}" for n in range(num_items)], dtype=object)
    item_category = np.arange(num_items) % num_categories
    members = [np.flatnonzero(item_category == c) for c in range(num_categories)]
    if min(len(m) for m in members) * interests_per_user < max_len:
        raise ValueError("too few items per category for max_len distinct items per user; raise num_items")
    titles = np.empty(num_items, dtype=object)
    weights = []
    for c, ids in enumerate(members):
        noun = list(CATEGORY_WORDS)[c % len(CATEGORY_WORDS)]
        titles[ids] = _titles(rng, categories[c], noun, len(ids))
        w = 1.0 / np.sqrt(1.0 + rng.permutation(len(ids)))  # popularity rank is random within a category
        weights.append(w / w.sum())

    horizon = horizon_days * DAY
    end = start_timestamp + horizon
    drift_ts = int(start_timestamp + round(drift_time * horizon))  # round: 0.7 * horizon is not exact
    drifted = rng.random(num_users) < drift_share
    active_after = rng.random(num_users) < active_share_after

    rows_user, rows_item, rows_ts, truth = [], [], [], []
    for u in range(num_users):
        user_id = f"u{u:05d}"
        chosen = rng.permutation(num_categories)[: 2 * interests_per_user]
        old = chosen[:interests_per_user]
        new = chosen[interests_per_user:] if drifted[u] else old
        length = int(rng.integers(min_len, max_len + 1))
        if active_after[u] and length >= 2:
            n_before = min(max(1, round(length * drift_time)), length - 1)
            stamps = np.concatenate(
                [
                    np.sort(rng.integers(start_timestamp, drift_ts, n_before)),
                    np.sort(rng.integers(drift_ts, end, length - n_before)),
                ]
            )
        else:
            stamps = np.sort(rng.integers(start_timestamp, drift_ts, length))
        seen: set[int] = set()
        for ts in stamps:
            interests = new if ts >= drift_ts else old
            item = _draw(rng, interests, members, weights, num_items, noise, seen)
            seen.add(item)
            rows_user.append(user_id)
            rows_item.append(item_ids[item])
            rows_ts.append(int(ts))
        truth.append(
            {
                "user_id": user_id,
                "drifted": bool(drifted[u]),
                "active_after": bool(active_after[u]),
                "old_interests": [categories[c] for c in old],
                "new_interests": [categories[c] for c in new],
            }
        )

    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(rows_user, dtype="str"),
            "item_id": pd.Series(rows_item, dtype="str"),
            "timestamp": np.asarray(rows_ts, dtype=np.int64),
            "rating": np.full(len(rows_ts), np.nan),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": pd.Series(item_ids, dtype="str"),
            "title": pd.Series(titles, dtype="str"),
            "category": pd.Series([categories[c] for c in item_category], dtype="str"),
        }
    )
    ground_truth = pd.DataFrame(truth)
    ground_truth["user_id"] = ground_truth["user_id"].astype("str")
    return InteractionData(
        name=name,
        interactions=interactions,
        items=items,
        ground_truth=ground_truth,
        meta={
            "reader": "synthetic",
            "drift_timestamp": drift_ts,
            "start_timestamp": int(start_timestamp),
            "end_timestamp": int(end),
            "categories": categories,
        },
    )


def _draw(rng, interests, members, weights, num_items, noise, seen) -> int:
    """One item the user has not had yet: from a current interest (prob. 1 - noise) or from anywhere."""
    while True:
        if rng.random() < noise:
            item = int(rng.integers(num_items))
        else:
            c = interests[rng.integers(len(interests))]
            item = int(members[c][rng.choice(len(members[c]), p=weights[c])])
        if item not in seen:
            return item
