"""Classic sequential recommenders: SASRec, GRU4Rec and BPR-MF behind one interface.

Every model maps a LEFT-padded history ``[B, L]`` (item ids 1..N, 0 = padding, oldest first, so the
most recent item sits in the last column) to a user vector ``[B, D]`` and scores items by dot product
with a shared item embedding whose row 0 is padding:

- ``user_repr(history) -> [B, D]``
- ``score(history, items [B, C]) -> [B, C]``
- ``score_all(history) -> [B, N + 1]`` (column 0 is -inf so padding is never recommended)
- ``grow_items(new_num_items)`` adds rows for items first seen at a later stage, keeping the old ones.

Left padding is used because the prediction is read at the last position; every model is written so
that extra left padding does not change its output (tested).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from recsim.protocols.base import Sample


class SequentialRecommender(nn.Module, abc.ABC):
    """Shared item table and scoring; subclasses only say how a history becomes a user vector."""

    def __init__(self, num_items: int, hidden: int):
        super().__init__()
        self.num_items = num_items
        self.hidden = hidden
        self.item_emb = self._new_item_table(num_items)

    def _new_item_table(self, num_items: int) -> nn.Embedding:
        table = nn.Embedding(num_items + 1, self.hidden, padding_idx=0)
        nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            table.weight[0].zero_()
        return table

    @abc.abstractmethod
    def user_repr(self, history: torch.Tensor) -> torch.Tensor:
        """User vector [B, D] from a left-padded history [B, L]; each model defines its own."""

    def score(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        user = self.user_repr(history)  # [B, D]
        scores = torch.einsum("bd,bcd->bc", user, self.item_emb(items))  # [B, C]
        return scores.masked_fill(items == 0, float("-inf"))

    def score_all(self, history: torch.Tensor) -> torch.Tensor:
        scores = self.user_repr(history) @ self.item_emb.weight.T  # [B, N + 1]
        scores[:, 0] = float("-inf")
        return scores

    @torch.no_grad()
    def grow_items(self, new_num_items: int) -> None:
        """Enlarge the item table to ``new_num_items``; existing rows (and so their scores) are kept.

        The parameter is replaced, so build the optimiser after growing (a fresh Trainer per stage does).
        """
        if new_num_items < self.num_items:
            raise ValueError(f"grow_items cannot shrink: {new_num_items} < {self.num_items}")
        old = self.item_emb.weight
        table = self._new_item_table(new_num_items).to(device=old.device, dtype=old.dtype)
        table.weight[: old.shape[0]] = old
        self.item_emb = table
        self.num_items = new_num_items


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018, arXiv:1808.09781).

    Item + learned position embeddings, causal self-attention blocks (pre-layernorm, point-wise
    feed-forward of width ``hidden`` as in the paper), a final layernorm; the user vector is the output
    at the last position. Positions are counted from the right (the newest item always gets position
    ``max_len - 1``, as in the paper's left-padded inputs), and padded keys are masked, so extra left
    padding changes nothing. Histories longer than ``max_len`` keep their newest ``max_len`` items.
    """

    def __init__(self, num_items, hidden=64, layers=2, heads=2, dropout=0.2, max_len=50):
        super().__init__(num_items, hidden)
        self.heads, self.max_len = heads, max_len
        self.pos_emb = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, dim_feedforward=hidden, dropout=dropout, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Per-position outputs ``[B, L, D]``; position t only sees items at positions <= t."""
        history = history[:, -self.max_len :]  # [B, L]
        B, L = history.shape
        positions = torch.arange(self.max_len - L, self.max_len, device=history.device)  # [L]
        x = self.item_emb(history) * self.hidden**0.5 + self.pos_emb(positions)  # [B, L, D]
        x = self.dropout(x)
        # blocked[b, q, k]: query q may not look at key k (the future, or padding). Every query may
        # see itself so padded rows never become all -inf (NaN); real rows never see padded keys.
        ones = torch.ones(L, L, dtype=torch.bool, device=history.device)
        future = torch.triu(ones, diagonal=1)  # [L, L]
        blocked = future | (history == 0)[:, None, :]  # [B, L, L]
        blocked = blocked & ~torch.eye(L, dtype=torch.bool, device=history.device)
        blocked = blocked.repeat_interleave(self.heads, dim=0)  # [B * heads, L, L]
        for block in self.blocks:
            x = block(x, src_mask=blocked)
        return self.norm(x)  # [B, L, D]

    def user_repr(self, history: torch.Tensor) -> torch.Tensor:
        return self.encode(history)[:, -1]  # [B, D]


class GRU4Rec(SequentialRecommender):
    """Session-based recommendation with a GRU (Hidasi et al., ICLR 2016, arXiv:1511.06939).

    Like most reimplementations (e.g. Tan et al. 2016, RecBole) it feeds item embeddings rather than
    one-hot vectors and trains on whole-catalogue scores; the user vector is the top layer's last
    hidden state. Histories are packed by length, so padding never enters the recurrence.
    """

    def __init__(self, num_items, hidden=64, layers=1, dropout=0.2):
        super().__init__(num_items, hidden)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)

    def user_repr(self, history: torch.Tensor) -> torch.Tensor:
        B, L = history.shape
        lengths = (history != 0).sum(1)  # [B]
        # left-padded -> right-padded: row b's items move from columns L-n..L-1 to 0..n-1
        cols = (torch.arange(L, device=history.device) + L - lengths[:, None]) % L  # [B, L]
        right = history.gather(1, cols)  # [B, L]
        x = self.dropout(self.item_emb(right))  # [B, L, D]
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, h = self.gru(packed)  # h: [layers, B, D]
        return h[-1]  # [B, D]


class BPRMF(SequentialRecommender):
    """Matrix factorisation trained with BPR (Rendle et al., UAI 2009, arXiv:1205.2618), on sequences.

    Instead of a learned per-user row, the user vector is the mean embedding of the history's items
    (an item-based, FISM-like factorisation). This lets BPR-MF score users never seen in training and
    turns it into an order-free baseline and filter over any sequence, with no user table to grow.
    """

    def __init__(self, num_items, hidden=64):
        super().__init__(num_items, hidden)

    def user_repr(self, history: torch.Tensor) -> torch.Tensor:
        counts = (history != 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        return self.item_emb(history).sum(1) / counts  # padding rows are zero: [B, D]


def collate_samples(samples: list[Sample], max_len: int) -> dict[str, torch.Tensor]:
    """Batch samples: the newest ``max_len`` history items, left-padded with 0 to ``max_len``."""
    history = torch.zeros(len(samples), max_len, dtype=torch.long)  # [B, max_len]
    for row, sample in enumerate(samples):
        items = sample.history[-max_len:] if max_len > 0 else ()
        if items:
            history[row, max_len - len(items) :] = torch.tensor(items, dtype=torch.long)
    return {
        "history": history,
        "target": torch.tensor([s.target for s in samples], dtype=torch.long),  # [B]
        "user": torch.tensor([s.user for s in samples], dtype=torch.long),  # [B]
    }
