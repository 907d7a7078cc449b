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


NORMS = ("pre", "post")
POSITIONS = ("from_newest", "from_oldest")
INITS = ("torch", "normal")
ACTIVATIONS = ("relu", "gelu")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"backbone.{name}={value!r} is not allowed; choose one of {list(allowed)}")


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018, arXiv:1808.09781).

    Item + learned position embeddings, causal self-attention blocks, the user vector is the output at
    the last position. Padded keys are masked, so extra left padding changes nothing; histories longer
    than ``max_len`` keep their newest ``max_len`` items. The paper leaves open, and implementations
    differ on, the choices below; each is an argument. The constructor defaults reproduce recsim's
    earlier block (the paper's TF code as ``nn.TransformerEncoderLayer`` builds it), so callers that
    pass only the first six arguments (EvoRec's Forget filter) get the model they had;
    ``conf/backbone/sasrec.yaml`` selects RecBole's SASRec, the reference a reviewer runs:

    ==================  ==========================================  =========================================
    argument            default (paper code / earlier recsim)        RecBole ``SASRec.yaml``
    ==================  ==========================================  =========================================
    inner_size          ``hidden`` (FFN as wide as the embedding)    256
    activation          relu                                         gelu (erf form, = torch's "gelu")
    norm                pre: LN before each sub-layer + a final LN   post: LN(x + sublayer(x)), LN on the
                                                                     embedding sum, no final LN (BERT)
    layer_norm_eps      1e-5                                         1e-12
    emb_scale           True: item embedding * sqrt(hidden)          False
    dropout             one rate for everything                      hidden_dropout_prob 0.5
    attn_dropout        None = ``dropout``                           attn_dropout_prob 0.5
    inner_dropout       True: also drop inside the FFN (torch)       False
    positions           from_newest: newest item = ``max_len - 1``   from_oldest: oldest item in the window
                                                                     = 0 (RecBole pads on the right)
    init                torch: torch's layer defaults                normal: N(0, 0.02) on every Linear and
                                                                     Embedding weight, zero biases
    ==================  ==========================================  =========================================

    Both pads keep row 0 of the item table at zero and score it -inf (RecBole leaves a random row 0 in
    its softmax; one column of 12k, negligible).
    """

    def __init__(
        self,
        num_items,
        hidden=64,
        layers=2,
        heads=2,
        dropout=0.2,
        max_len=50,
        *,
        inner_size: int | None = None,
        activation: str = "relu",
        norm: str = "pre",
        layer_norm_eps: float = 1e-5,
        emb_scale: bool = True,
        attn_dropout: float | None = None,
        inner_dropout: bool = True,
        positions: str = "from_newest",
        init: str = "torch",
    ):
        for name, value, allowed in (("norm", norm, NORMS), ("positions", positions, POSITIONS),
                                     ("init", init, INITS), ("activation", activation, ACTIVATIONS)):
            _check_choice(name, value, allowed)
        super().__init__(num_items, hidden)
        self.heads, self.max_len = heads, max_len
        self.emb_scale, self.positions = emb_scale, positions
        self.pos_emb = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, dim_feedforward=inner_size or hidden, dropout=dropout, activation=activation,
                layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=norm == "pre",
            )
            for _ in range(layers)
        )
        for block in self.blocks:
            # torch's layer uses `dropout` on the attention weights too and drops out inside the FFN;
            # RecBole has a separate attention rate and no dropout between the FFN's two layers
            block.self_attn.dropout = dropout if attn_dropout is None else float(attn_dropout)
            if not inner_dropout:
                block.dropout = nn.Identity()
        # pre-LN needs a final LN (the residual stream is never normalised); post-LN normalises the input sum
        self.input_norm = nn.LayerNorm(hidden, eps=layer_norm_eps) if norm == "post" else nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps) if norm == "pre" else nn.Identity()
        if init == "normal":
            self._init_normal(0.02)

    @torch.no_grad()
    def _init_normal(self, std: float) -> None:
        """RecBole/BERT init: every Linear and Embedding weight ~ N(0, std), biases 0, LayerNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):  # q, k, v live in one packed parameter
                nn.init.normal_(module.in_proj_weight, std=std)
                nn.init.zeros_(module.in_proj_bias)
        self.item_emb.weight[0].zero_()

    def _positions(self, history: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, L]`` (or ``[L]``) of a left-padded history, both counted so padding cannot shift them."""
        L = history.shape[1]
        if self.positions == "from_newest":
            return torch.arange(self.max_len - L, self.max_len, device=history.device)  # [L]
        # the k-th real item (0-based, oldest first) gets id k; padded slots get 0 and are never attended to
        return ((history != 0).long().cumsum(1) - 1).clamp(min=0)  # [B, L]

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Per-position outputs ``[B, L, D]``; position t only sees items at positions <= t."""
        history = history[:, -self.max_len :]  # [B, L]
        B, L = history.shape
        x = self.item_emb(history)  # [B, L, D]
        if self.emb_scale:
            x = x * self.hidden**0.5
        x = self.dropout(self.input_norm(x + self.pos_emb(self._positions(history))))  # [B, L, D]
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

    ``gru_hidden=None`` (default, earlier recsim) gives the GRU the embedding width and uses its state
    directly; a width (RecBole: 128 for 64-wide embeddings) adds RecBole's linear map from the state back
    to the embedding width. ``gru_bias`` (RecBole: False) toggles the GRU's bias terms.
    """

    def __init__(self, num_items, hidden=64, layers=1, dropout=0.2, *, gru_hidden: int | None = None,
                 gru_bias: bool = True):
        super().__init__(num_items, hidden)
        self.dropout = nn.Dropout(dropout)
        width = gru_hidden or hidden
        self.gru = nn.GRU(hidden, width, num_layers=layers, bias=gru_bias, batch_first=True)
        self.proj = nn.Linear(width, hidden) if gru_hidden else nn.Identity()

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
        _, h = self.gru(packed)  # h: [layers, B, H]
        return self.proj(h[-1])  # [B, D]


class BPRMF(SequentialRecommender):
    """Matrix factorisation trained with BPR (Rendle et al., UAI 2009, arXiv:1205.2618), on sequences.

    Instead of a learned per-user row, the user vector is the mean embedding of the history's items
    (an item-based, FISM-like factorisation). This lets BPR-MF score users never seen in training and
    turns it into an order-free baseline and filter over any sequence, with no user table to grow.
    This deliberately differs from RecBole's ``BPR`` (a learned user table, embedding_size 64, trained
    with one uniform negative): a user table cannot score a stage's new users nor follow their history.
    """

    def __init__(self, num_items, hidden=64):
        super().__init__(num_items, hidden)

    def user_repr(self, history: torch.Tensor) -> torch.Tensor:
        counts = (history != 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        return self.item_emb(history).sum(1) / counts  # padding rows are zero: [B, D]


def collate_samples(samples: list[Sample], max_len: int) -> dict[str, torch.Tensor]:
    """Batch samples: the newest ``max_len`` history items, left-padded with 0 to ``max_len``, plus target,
    user and the target's position in the user's sequence (-1 when unknown)."""
    history = torch.zeros(len(samples), max_len, dtype=torch.long)  # [B, max_len]
    for row, sample in enumerate(samples):
        items = sample.history[-max_len:] if max_len > 0 else ()
        if items:
            history[row, max_len - len(items) :] = torch.tensor(items, dtype=torch.long)
    return {
        "history": history,
        "target": torch.tensor([s.target for s in samples], dtype=torch.long),  # [B]
        "user": torch.tensor([s.user for s in samples], dtype=torch.long),  # [B]
        # where the target sits in the user's full sequence: validation masks everything before it
        "position": torch.tensor([s.position for s in samples], dtype=torch.long),  # [B]
    }
