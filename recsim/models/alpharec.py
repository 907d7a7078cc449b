"""AlphaRec (Sheng et al., "Language Representations Can be What Recommenders Need: Findings and Potentials",
ICLR 2025, arXiv:2407.05441) on recsim's next-item samples.

The paper's model, in its three parts:

1. Non-linear projection of frozen language representations. z_i is item i's title embedding (here MiniLM's,
   `backbone.encoder`); a user's z_u is the mean of z_i over the user's items. One shared MLP maps both:
   e^(0) = W_2 LeakyReLU(W_1 z + b_1) + b_2 (width `mlp_hidden`, output `hidden`).
2. LightGCN over the user-item graph of the training interactions: E^(k+1) = Â E^(k) with
   Â = D^-1/2 A D^-1/2 (no self-loops), read out as the mean of the layers, ẽ = 1/(K+1) Σ_{k=0..K} E^(k).
3. InfoNCE on cosine similarity with temperature τ:
   L = -log exp(cos(u, i⁺)/τ) / (exp(cos(u, i⁺)/τ) + Σ_{i⁻} exp(cos(u, i⁻)/τ)); items are ranked by cos(u, i).

The authors' settings (their README's commands and code): a 2-layer MLP with LeakyReLU, output width 64, the
hidden width scaled to keep the first layer near 4.7M weights (1536 for their 3072-d encoder); 2 GCN layers;
τ = 0.15 (0.2 on Games); 256 sampled negatives per positive (in-batch when none are sampled); Adam, lr 5e-4,
no weight decay; batch 4096; early stopping on validation (they evaluate every 5 epochs, patience 20, at most
500 epochs, at K = 20).

Choices for recsim, whose protocols are sequential (a sample = a user's history up to a position, the next item
the target), where the paper is a general CF model with one node per user:

- The graph: the edges are the (user, item) pairs of the fit's training targets, plus each user's position-0
  item (a training interaction that is never a target, for it has no history). No other history item is an edge:
  a history may hold a held-out target of another round (two_period keeps them visible as history), and
  evaluated positions are never training targets, so no test or validation target is ever an edge. Every fit adds
  its edges to the graph (a fine-tuned model knows every interaction it was fitted on; `retrain` resets the graph
  with the weights and refits on everything so far). The graph is saved with each stage.
- The user at a sample: a *virtual user node* attached to the sample's history items (the newest `max_len`),
  computed with LightGCN's own rules against the training graph but never added to it:
  u^(0) = MLP(mean_{i∈H} z_i),  u^(k+1) = Σ_{i∈H} e_i^(k) / sqrt(|H| d_i),  u = 1/(K+1) Σ_k u^(k),
  with d_i item i's degree in the training graph (at least 1: an item outside it counts its virtual edge only).
  For a training user whose history is all of their training items this is exactly the paper's user node; it also
  scores users and history items the graph has never seen (a later stage's new users, items after the cut), and a
  test target, never an edge, cannot leak through it. Training uses the same representation, so the model learns
  what it is evaluated on.
- Negatives: `negatives: <n>` draws n items per sample, uniform over the catalogue without the target (duplicates
  and the user's history items may occur, as in uniform sampling); `in_batch` uses the batch's other targets
  (a row's duplicates of its own target are masked). Drawn from a generator seeded at the start of every fit from
  the global RNG the runner seeds per stage, so a resumed run draws what an uninterrupted one does.
- Optimiser: Adam with `weight_decay` as L2 (torch.optim.Adam), 0 as the authors' code. Early stopping is recsim's
  (validation every epoch, so `patience` counts epochs), full ranking with the user's history masked.
- `backbone.seed` seeds the MLP's initialisation; batches and negatives follow the run's stage seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from recsim.models.recommender import SequentialRecommender
from recsim.models.sequential import collate_samples
from recsim.models.sequential_module import SequentialRecModule
from recsim.protocols.base import EncodedData, Sample

ENCODERS = ("minilm",)
GRAPH_FILE = "graph.safetensors"


def training_edges(samples: list[Sample]) -> np.ndarray:
    """Distinct (user, item) edges [E, 2] of training samples: every target, and the position-0 item of a user
    whose sample's history starts at position 0 (see the module docstring for why no other history item)."""
    pairs = {(s.user, s.target) for s in samples}
    pairs |= {(s.user, s.history[0]) for s in samples if s.history and s.position == len(s.history)}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def normalized_adjacency(edges: np.ndarray, num_items: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """LightGCN's Â = D^-1/2 A D^-1/2 of the bipartite graph, nodes ordered items 0..N (0, padding, isolated)
    then the graph's users in ascending id. Returns (Â sparse [N+1+U, N+1+U], item degrees [N+1], user ids [U])."""
    users, user_col = np.unique(edges[:, 0], return_inverse=True)
    items = edges[:, 1]
    item_deg = np.bincount(items, minlength=num_items + 1)
    user_deg = np.bincount(user_col, minlength=len(users))
    weight = 1.0 / np.sqrt(item_deg[items] * user_deg[user_col])  # Â_ui = 1 / sqrt(d_u d_i)
    user_node = num_items + 1 + user_col
    rows = np.concatenate([items, user_node])
    cols = np.concatenate([user_node, items])  # symmetric: both directions of every edge
    size = num_items + 1 + len(users)
    adjacency = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                        torch.from_numpy(np.concatenate([weight, weight])).float(), (size, size),
                                        check_invariants=True).coalesce()
    return adjacency, torch.from_numpy(item_deg).float(), users


def info_nce(positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean of -log exp(s⁺/τ) / (exp(s⁺/τ) + Σ exp(s⁻/τ)) from cosine scores positive [B], negatives [B, M]
    (-inf entries are no negative)."""
    logits = torch.cat([positive[:, None], negatives], dim=1) / tau  # [B, 1 + M]
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


class AlphaRec(nn.Module):
    """Frozen title embeddings -> MLP -> LightGCN over the training graph; users as virtual nodes of their history.

    Exposes the interface of recsim.models.sequential's models (``num_items``, ``score``, ``score_all`` over
    left-padded histories) so :class:`SequentialRecModule`'s validation and scoring apply unchanged. Without a
    graph (before the first fit) every layer above 0 is zero and the model is the paper's MLP alone.
    """

    def __init__(self, text_embeddings: torch.Tensor, hidden: int = 64, mlp_hidden: int = 1536,
                 gcn_layers: int = 2):
        super().__init__()
        if text_embeddings.ndim != 2 or not len(text_embeddings):
            raise ValueError(f"text_embeddings must be [N + 1, d] (row 0 padding), got {tuple(text_embeddings.shape)}")
        self.num_items = text_embeddings.shape[0] - 1
        self.gcn_layers = int(gcn_layers)
        text = text_embeddings.detach().float().clone()
        text[0] = 0  # padding has no text
        # frozen inputs, rebuilt from the cache, never saved with the weights
        self.register_buffer("text", text, persistent=False)  # z_i: [N + 1, d]
        self.mlp = nn.Sequential(nn.Linear(text.shape[1], mlp_hidden), nn.LeakyReLU(), nn.Linear(mlp_hidden, hidden))
        for name in ("adjacency", "item_degree", "user_text"):  # the graph: set_graph fills them, .to() moves them
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.edges = np.zeros((0, 2), dtype=np.int64)
        self._graph_version = 0
        self._cache: tuple | None = None
        self.set_graph(self.edges)

    # ------------------------------------------------------------------ the graph

    def set_graph(self, edges: np.ndarray) -> None:
        """Use the (user, item) ``edges`` [E, 2] as the interaction graph."""
        edges = np.unique(np.asarray(edges, dtype=np.int64).reshape(-1, 2), axis=0)
        if len(edges) and (edges[:, 1].min() < 1 or edges[:, 1].max() > self.num_items):
            raise ValueError(f"graph edges name items outside 1..{self.num_items}")
        device = self.text.device
        adjacency, item_degree, users = normalized_adjacency(edges, self.num_items)
        # z_u of each graph user: the mean title embedding of their graph items
        user_col = np.searchsorted(users, edges[:, 0])
        mean = torch.sparse_coo_tensor(torch.from_numpy(np.stack([user_col, edges[:, 1]])),
                                       torch.from_numpy(1.0 / np.bincount(user_col)[user_col]).float(),
                                       (len(users), self.num_items + 1), check_invariants=True)
        self.adjacency = adjacency.to(device)  # [N + 1 + U, N + 1 + U]
        self.item_degree = item_degree.to(device)  # [N + 1]
        self.user_text = torch.sparse.mm(mean, self.text.cpu()).to(device)  # [U, d]
        self.edges, self._graph_version = edges, self._graph_version + 1

    def add_edges(self, edges: np.ndarray) -> None:
        self.set_graph(np.concatenate([self.edges, np.asarray(edges, dtype=np.int64).reshape(-1, 2)]))

    # ------------------------------------------------------------------ representations

    def propagate(self) -> torch.Tensor:
        """E^(0..K) [K + 1, N + 1 + U, D]: the MLP on every node's text, then K LightGCN layers."""
        x = self.mlp(torch.cat([self.text, self.user_text]))  # e^(0) = MLP(z): [N + 1 + U, D]
        layers = [x]
        for _ in range(self.gcn_layers):
            x = torch.sparse.mm(self.adjacency, x)  # E^(k+1) = Â E^(k)
            layers.append(x)
        return torch.stack(layers)

    def layers(self) -> torch.Tensor:
        """:meth:`propagate`, cached under no_grad until a weight, the graph or the device changes (scoring calls
        it per batch of users; training recomputes it every step)."""
        if torch.is_grad_enabled():
            return self.propagate()
        key = (self._graph_version, str(self.text.device), *((p.data_ptr(), p._version) for p in self.parameters()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.propagate())
        return self._cache[1]

    def item_table(self, layers: torch.Tensor) -> torch.Tensor:
        """ẽ_i = mean over layers: [N + 1, D]."""
        return layers[:, : self.num_items + 1].mean(0)

    def user_repr(self, history: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """The virtual user node of each left-padded history [B, L] (module docstring): [B, D]."""
        layers = self.layers() if layers is None else layers
        real = (history != 0).float()  # [B, L]
        count = real.sum(1, keepdim=True).clamp(min=1)  # |H|: [B, 1]
        u0 = self.mlp(F.embedding_bag(history, self.text, mode="mean", padding_idx=0))  # MLP(mean_{i∈H} z_i): [B, D]
        weight = real / torch.sqrt(count * self.item_degree[history].clamp(min=1))  # 1/sqrt(|H| d_i): [B, L]
        # u^(k+1) = Σ_i e_i^(k) / sqrt(|H| d_i) for k = 0..K-1
        above = torch.einsum("bl,kbld->kbd", weight, layers[:-1, history])  # [K, B, D]
        return (u0 + above.sum(0)) / (self.gcn_layers + 1)

    def cosine_all(self, history: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """cos(u, ẽ_i) for every item: [B, N + 1] (column 0 included, callers mask it)."""
        layers = self.layers() if layers is None else layers
        user = F.normalize(self.user_repr(history, layers), dim=-1)  # [B, D]
        return user @ F.normalize(self.item_table(layers), dim=-1).T

    def score(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        user = F.normalize(self.user_repr(history, layers), dim=-1)  # [B, D]
        table = F.normalize(self.item_table(layers), dim=-1)[items]  # [B, C, D]
        return torch.einsum("bd,bcd->bc", user, table).masked_fill(items == 0, float("-inf"))

    def score_all(self, history: torch.Tensor) -> torch.Tensor:
        scores = self.cosine_all(history)  # [B, N + 1]
        scores[:, 0] = float("-inf")
        return scores


NEGATIVES_IN_BATCH = "in_batch"


class AlphaRecModule(SequentialRecModule):
    """Trains :class:`AlphaRec` with InfoNCE; validation, early stopping and scoring are SequentialRecModule's.

    At the start of every fit the training samples' edges join the graph (:func:`training_edges`) and the
    negatives' generator is seeded from the global RNG (the runner seeds it per stage)."""

    def __init__(self, model: AlphaRec, tau: float = 0.15, negatives: int | str = 256, lr: float = 5e-4,
                 weight_decay: float = 0.0, valid_metric: str = "Recall@20", grad_clip: float | None = None,
                 seen_sequences=None):
        if negatives != NEGATIVES_IN_BATCH and not (isinstance(negatives, int) and negatives >= 1):
            raise ValueError(f"backbone.negatives={negatives!r}: expected an integer >= 1 or {NEGATIVES_IN_BATCH}")
        if not tau > 0:
            raise ValueError(f"backbone.tau={tau!r}: expected a number > 0")
        # the whole batch shares one propagation, so length buckets would only repeat it
        super().__init__(model, lr=lr, weight_decay=weight_decay, valid_metric=valid_metric, grad_clip=grad_clip,
                         seen_sequences=seen_sequences, length_buckets=False)
        self.tau, self.negatives = float(tau), negatives

    def on_train_start(self) -> None:
        self.model.add_edges(training_edges(list(self.trainer.train_dataloader.dataset)))
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))

    def sample_negatives(self, target: torch.Tensor) -> torch.Tensor:
        """``negatives`` items per target [B, M], uniform over 1..N without the target."""
        n = self.model.num_items
        draw = torch.randint(1, n, (len(target), self.negatives), generator=self.generator).to(target.device)
        return draw + (draw >= target[:, None]).long()  # 1..N-1 shifted past the target

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, target = batch["history"], batch["target"]  # [B, L], [B]
        layers = self.model.propagate()
        if self.negatives == NEGATIVES_IN_BATCH:
            user = F.normalize(self.model.user_repr(history, layers), dim=-1)  # [B, D]
            scores = user @ F.normalize(self.model.item_table(layers)[target], dim=-1).T  # [B, B]
            same = target[:, None] == target[None, :]
            scores = scores.masked_fill(same & ~torch.eye(len(target), dtype=torch.bool, device=same.device),
                                        float("-inf"))  # another row's target equal to mine is no negative
            return F.cross_entropy(scores / self.tau, torch.arange(len(target), device=target.device))
        scores = self.model.cosine_all(history, layers)  # [B, N + 1]
        positive = scores.gather(1, target[:, None]).squeeze(1)  # [B]
        return info_nce(positive, scores.gather(1, self.sample_negatives(target)), self.tau)

    def configure_optimizers(self):
        # the authors' optimiser: Adam (weight decay, when set, as Adam's L2 term)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def text_embeddings(cfg, titles: list[str]) -> torch.Tensor:
    """Title embeddings [N + 1, d] of `backbone.encoder`, through recsim.items' cached item embeddings."""
    from recsim.items.vocab import item_embeddings

    encoder = cfg.backbone.encoder
    if encoder not in ENCODERS:
        raise ValueError(f"backbone.encoder={encoder!r}: expected one of {', '.join(ENCODERS)}")
    view = OmegaConf.create({"item_id": {"encoder": encoder}, "backbone": {"name": cfg.backbone.name}})
    return torch.from_numpy(item_embeddings(view, titles, Path(cfg.paths.cache_dir)))


class AlphaRecRecommender(SequentialRecommender):
    """AlphaRec behind the classic models' interface (`backbone.kind: graph`): full ranking, candidate scoring,
    early stopping, history masking and the continual methods exactly as SASRec's. `text` injects title
    embeddings [N + 1, d] (tests); by default they come from `backbone.encoder`."""

    kind = "graph"
    can_rank_all = True

    def __init__(self, cfg, data: EncodedData, seed: int, text: torch.Tensor | None = None):
        bb = cfg.backbone
        self.cfg, self._collate = cfg, collate_samples
        text = text_embeddings(cfg, data.titles) if text is None else text
        if text.shape[0] != data.num_items + 1:
            raise ValueError(f"title embeddings have {text.shape[0]} rows for {data.num_items} items + padding")
        with torch.random.fork_rng():
            torch.manual_seed(bb.seed if bb.get("seed") is not None else seed)
            model = AlphaRec(text, hidden=bb.hidden, mlp_hidden=bb.mlp_hidden, gcn_layers=bb.gcn_layers)
        stop = bb.get("early_stopping")
        self.module = AlphaRecModule(model, tau=bb.tau, negatives=bb.negatives, lr=bb.lr,
                                     weight_decay=bb.weight_decay, valid_metric=stop.metric if stop else "Recall@20",
                                     grad_clip=bb.get("grad_clip"), seen_sequences=data.sequences)
        self.initial = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.loss_terms: list = []

    def reset_to_initial(self) -> None:
        """The initial weights and an empty graph (`retrain` refits both on everything so far)."""
        super().reset_to_initial()
        self.module.model.set_graph(np.zeros((0, 2), dtype=np.int64))

    def save(self, folder: Path) -> None:
        import safetensors.torch

        super().save(folder)
        safetensors.torch.save_file({"edges": torch.from_numpy(self.module.model.edges)}, str(folder / GRAPH_FILE))

    def load(self, folder: Path) -> None:
        import safetensors.torch

        super().load(folder)
        path = folder / GRAPH_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an AlphaRec stage keeps its interaction graph there; "
                                    f"delete {folder} to recompute that stage")
        self.module.model.set_graph(safetensors.torch.load_file(str(path))["edges"].numpy())
