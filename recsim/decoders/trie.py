"""A prefix trie over every item's token sequence (its identifier's tokens, EOS last), held as tensors.

Nodes are integers, 0 the root; node n's child on token t is found by binary search of the key n * S + t
(S = largest token id + 1) in the sorted edge keys, so `advance` is one `torch.searchsorted` on whatever device
the trie is on. The children of a node are a CSR slice (`child_ptr[n] : child_ptr[n + 1]` of the edges sorted by
key), which `step_masks` scatters into the [N, V] masks of allowed tokens. Only paths of real items exist, so a
search constrained by these masks can only write real items.

Collisions (two items with the same token sequence) cannot be told apart by a trie: the node where they end
keeps the first of them in the iteration order of `sequences`, and every group of colliding ids is recorded in
`collisions` (the item vocabulary breaks collisions before building, so normally it is empty).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

_TENSORS = ("edge_keys", "edge_child", "edge_token", "edge_extends", "child_ptr", "node_item", "item_edge_token",
            "item_edge_child")


class ItemTrie:
    def __init__(self, sequences: dict[int, list[int]]):
        """`sequences`: item id -> its token ids (EOS last). Every sequence must be non-empty; ids must be >= 0."""
        if not sequences:
            raise ValueError("ItemTrie: `sequences` is empty (no item to decode)")
        children: dict[tuple[int, int], int] = {}  # (node, token) -> child
        end_items: dict[int, list[int]] = {}  # node -> every item whose sequence ends there, in input order
        for item, seq in sequences.items():
            if item < 0:
                raise ValueError(f"ItemTrie: item id {item} < 0 (-1 means 'no item')")
            if len(seq) == 0:
                raise ValueError(f"ItemTrie: item {item} has an empty token sequence")
            node = 0
            for token in seq:
                if token < 0:
                    raise ValueError(f"ItemTrie: item {item} has token id {token} < 0")
                node = children.setdefault((node, int(token)), len(children) + 1)
            end_items.setdefault(node, []).append(int(item))
        self.collisions: list[list[int]] = [group for group in end_items.values() if len(group) > 1]
        self.num_nodes = len(children) + 1
        self.depth = max(len(seq) for seq in sequences.values())  # the longest sequence, in tokens
        self.num_items = len(end_items)  # distinct items the trie can return (colliding ids count once)

        parent = np.fromiter((p for p, _ in children), dtype=np.int64, count=len(children))
        token = np.fromiter((t for _, t in children), dtype=np.int64, count=len(children))
        child = np.fromiter(children.values(), dtype=np.int64, count=len(children))
        self.stride = int(token.max()) + 1  # S in the key n * S + t
        key = parent * self.stride + token
        order = np.argsort(key, kind="stable")  # sorted by key = grouped by parent, tokens ascending within
        parent, token, child, key = parent[order], token[order], child[order], key[order]
        fanout = np.bincount(parent, minlength=self.num_nodes)  # [num_nodes] children per node
        node_item = np.full(self.num_nodes, -1, dtype=np.int64)
        for node, group in end_items.items():
            node_item[node] = group[0]

        # per node, its children that end an item: a dense [num_nodes, F] table (F = 1 when every sequence ends
        # with EOS: a node has at most one EOS child), so collecting finished hypotheses needs no CSR walk
        ends = node_item[child] >= 0  # [E]
        per_node = np.bincount(parent[ends], minlength=self.num_nodes)
        width = max(1, int(per_node.max()))
        item_edge_token = np.full((self.num_nodes, width), -1, dtype=np.int64)
        item_edge_child = np.full((self.num_nodes, width), -1, dtype=np.int64)
        slot = np.zeros(self.num_nodes, dtype=np.int64)
        for p, t, c in zip(parent[ends], token[ends], child[ends]):
            item_edge_token[p, slot[p]], item_edge_child[p, slot[p]] = t, c
            slot[p] += 1

        self.edge_keys = torch.from_numpy(key)  # [E] sorted
        self.edge_child = torch.from_numpy(child)  # [E]
        self.edge_token = torch.from_numpy(token)  # [E]
        self.edge_extends = torch.from_numpy(fanout[child] > 0)  # [E] the child has children of its own
        self.child_ptr = torch.from_numpy(np.concatenate([[0], np.cumsum(fanout)]))  # [num_nodes + 1] CSR
        self.node_item = torch.from_numpy(node_item)  # [num_nodes]
        self.item_edge_token = torch.from_numpy(item_edge_token)  # [num_nodes, F]
        self.item_edge_child = torch.from_numpy(item_edge_child)  # [num_nodes, F]

    @classmethod
    def from_ranker(cls, ranker, items) -> "ItemTrie":
        """The trie of `ranker.answer_ids(item)` for each item, on the ranker's device."""
        return cls({int(item): ranker.answer_ids(int(item)) for item in items}).to(ranker.device)

    @property
    def device(self) -> torch.device:
        return self.edge_keys.device

    def to(self, device) -> "ItemTrie":
        """A copy whose tensors live on `device` (self when they already do)."""
        if torch.device(device) == self.device:
            return self
        moved = copy.copy(self)
        for name in _TENSORS:
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    # ---- vectorised operations: nodes [N] (-1 = a dead hypothesis: no children, no item) --------------------
    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The child of each node on its token [N]; -1 where the token is not allowed there (or the node is -1)."""
        key = nodes * self.stride + tokens  # [N]
        pos = torch.searchsorted(self.edge_keys, key).clamp(max=len(self.edge_keys) - 1)
        found = (self.edge_keys[pos] == key) & (nodes >= 0) & (tokens >= 0) & (tokens < self.stride)
        return torch.where(found, self.edge_child[pos], torch.full_like(key, -1))

    def items_at(self, nodes: torch.Tensor) -> torch.Tensor:
        """The item whose sequence ends exactly at each node [N]; -1 otherwise."""
        return torch.where(nodes >= 0, self.node_item[nodes.clamp(min=0)], torch.full_like(nodes, -1))

    def item_edges(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per node, the tokens that end an item and the items they end: ([N, F], [N, F]), -1 padded."""
        safe = nodes.clamp(min=0)
        live = (nodes >= 0)[:, None]
        tokens = torch.where(live, self.item_edge_token[safe], -1)
        return tokens, self.items_at(torch.where(live, self.item_edge_child[safe], -1).view(-1)).view(tokens.shape)

    def allowed_mask(self, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, V] True where the token continues some item's sequence from that node."""
        return self.step_masks(nodes, vocab_size)[0]

    def step_masks(self, nodes: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed [N, V], extends [N, V]): `extends` keeps only the tokens whose child has children, i.e. the
        hypotheses that can still grow (a token that ends an item at a leaf finishes the hypothesis)."""
        if self.stride > vocab_size:
            raise ValueError(f"ItemTrie: token id {self.stride - 1} >= vocab_size {vocab_size}")
        safe = nodes.clamp(min=0)
        start = self.child_ptr[safe]  # [N]
        count = torch.where(nodes >= 0, self.child_ptr[safe + 1] - start, 0)  # [N]
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)  # [M] (one host sync)
        first = (count.cumsum(0) - count)[rows]  # [M] where each row's run starts
        edges = start[rows] + torch.arange(len(rows), device=nodes.device) - first  # [M] CSR edge index
        cols = self.edge_token[edges]
        allowed = torch.zeros(len(nodes), vocab_size, dtype=torch.bool, device=nodes.device)
        allowed[rows, cols] = True
        extends = torch.zeros_like(allowed)
        extends[rows, cols] = self.edge_extends[edges]  # each (row, token) once: no write conflicts
        return allowed, extends
