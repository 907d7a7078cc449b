"""PESO's own continual protocol over its released blocks (``dataset.reader=peso_blocks``).

The data's timestamps are block-order stamps (see :func:`recsim.data.readers.read_peso_blocks`): the block
of an interaction is ``stamp // 10**7`` (-1 for history before a user's first block, never a target).
As the authors' code does, per block b, for each user with >= ``min_block_interactions`` interactions
inside block b (``current`` = those positions, in order):
  training targets   = every position of current[:-2], history = the full prefix (previous + current),
                       cut to the last ``history_window`` items;
  validation target  = current[-2];   test target = current[-1].
Stage b trains on block b and is judged on block b's test split ("block<b>"), i.e. each block's test set
is scored by the model as it is right after training that block.

Choices:
- Users with fewer than ``min_block_interactions`` items in block b are dropped from block b entirely,
  as the authors do: no training, validation or test target there. Their block-b items stay in
  ``sequences`` as history for later blocks (the reader keeps every item the files list).
- A user enters at the first block that lists them: history before it (block -1, the ``previous_block`` of
  that first block; empty in the released files) is visible from that stage on, never earlier.
- Position 0 of a user's sequence is never a training target (no history to condition on), as in every
  recsim protocol; the authors' files always have >= 5 current items per user, so only each first-time
  user's first item is affected.
- Every block's test and validation targets are removed from every stage's training targets (the rule
  above already keeps them apart; the mask is explicit so that edited data can never leak a target).
- Groups of block b's splits: "U_A" = returning users (some interaction before block b: they are active in
  block b with a history, EvoRec's U_A), "new" = users whose first interaction is in block b (block 0: all
  of them). Both are trained on in stage b before being tested; there is no U_I (a user absent from block b
  is not evaluated on it). The authors score every user of the block, i.e. U_A ∪ new: see
  ``description["pooled_groups"]``.
- The number of blocks is read from the whole dataset (max block + 1), not from a user sample. Stamps whose
  block would be >= 100 are taken as real times and refused: this protocol needs block-order stamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsim.data.readers import BLOCK_STRIDE
from recsim.protocols.base import EncodedData, EvalSplit, Protocol, StageData, resolve_users, sample_at

GROUPS = ("U_A", "new")
MAX_BLOCKS = 100  # a block index above this means the stamps are unix times, not block-order stamps
MASKED = "every test and validation target of every block, at every stage"


def block_bounds(data: EncodedData) -> tuple[int, dict[int, np.ndarray]]:
    """Number of blocks and, per user, ``bounds[u][b]`` = #items before block b (block b = bounds[b]..bounds[b+1]-1)."""
    blocks = {u: t // BLOCK_STRIDE for u, t in data.timestamps.items()}  # floor division: pre-block stamps give -1
    top = max(int(b.max()) for b in blocks.values() if len(b))
    low = min(int(b.min()) for b in blocks.values() if len(b))
    if top >= MAX_BLOCKS or low < -1:
        raise ValueError(f"stage=peso_blocks needs block-order stamps (dataset.reader=peso_blocks, block = stamp // "
                         f"{BLOCK_STRIDE}); dataset {data.name!r} has stamps of blocks {low}..{top}: real times?")
    n_blocks = top + 1
    return n_blocks, {u: np.searchsorted(b, np.arange(n_blocks + 1), side="left") for u, b in blocks.items()}


def build_peso_blocks(data: EncodedData, min_block_interactions: int, window: int,
                      users: Sequence[int] | None = None) -> Protocol:
    if min_block_interactions < 1:
        raise ValueError(f"stage.min_block_interactions={min_block_interactions}: expected an integer >= 1")
    n_blocks, bounds = block_bounds(data)
    users = resolve_users(data, users)
    held: dict[int, set[int]] = {u: set() for u in users}
    trained: dict[int, list[list[int]]] = {u: [[] for _ in range(n_blocks)] for u in users}  # [u][b] -> positions
    tests = [{g: [] for g in GROUPS} for _ in range(n_blocks)]
    valids = [{g: [] for g in GROUPS} for _ in range(n_blocks)]
    for u in users:
        seq = data.sequences[u]
        for b in range(n_blocks):
            lo, hi = int(bounds[u][b]), int(bounds[u][b + 1])  # current = positions lo..hi-1
            if hi - lo < min_block_interactions:
                continue  # dropped from this block (see the module docstring)
            group = "U_A" if lo > 0 else "new"
            test = hi - 1
            if test >= 1:
                held[u].add(test)
                tests[b][group].append(sample_at(u, seq, test, window))
            if test - 1 >= max(1, lo):
                held[u].add(test - 1)
                valids[b][group].append(sample_at(u, seq, test - 1, window))
            trained[u][b] = list(range(max(1, lo), hi - 2))  # current[:-2], position 0 has no history
    for u in users:  # the explicit mask: no evaluated position of any block is ever trained on
        trained[u] = [[p for p in ps if p not in held[u]] for ps in trained[u]]

    stages = []
    for b in range(n_blocks):
        sequences, new_t, cum_t, boundary, active, inactive = {}, {}, {}, {}, [], []
        for u in users:
            n_visible = int(bounds[u][b + 1])
            if n_visible == bounds[u][0]:
                continue  # no item in blocks 0..b: the user has not entered yet (pre-block history alone)
            sequences[u] = data.sequences[u][:n_visible]
            boundary[u] = int(bounds[u][b])
            new_t[u] = list(trained[u][b])
            cum_t[u] = [p for ps in trained[u][: b + 1] for p in ps]
            (active if new_t[u] else inactive).append(u)
        stages.append(StageData(b, f"stage{b}", sequences, new_t, cum_t, boundary, active, inactive,
                                eval_split=f"block{b}"))
    names = {b: f"block{b}" for b in range(n_blocks)}
    splits = {n: EvalSplit(n, tests[b]) for b, n in names.items()}
    valid_splits = {n: EvalSplit(f"{n}_valid", valids[b], role="valid") for b, n in names.items()}
    description = {
        "protocol": "peso_blocks", "blocks": n_blocks, "min_block_interactions": min_block_interactions,
        "timestamps": f"block-order stamps: block = stamp // {BLOCK_STRIDE}",
        "training": "block b: every position of current[:-2] (position >= 1), history = full prefix",
        "groups": {"U_A": "returning: an interaction before block b; target: current[-1] of block b",
                   "new": "first interaction in block b; target: current[-1] of block b"},
        "pooled_groups": list(GROUPS),
        "short_users": f"users with < {min_block_interactions} items in block b are left out of block b",
        "validation": "current[-2] of block b (second-to-last interaction inside the block)",
        "masked_from_training": MASKED,
    }
    return Protocol(data, stages, splits, window, description, valid_splits)
