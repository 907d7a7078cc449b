"""Semantic item IDs: a short sequence of codes per item, one per level, from its text embedding.

Two ways to build the codes, both coarse-to-fine over residuals (level l quantises what levels < l left):
- `rqvae`: TIGER's RQ-VAE, as PESO uses it (4 levels x 256 codes, e_dim 32): an MLP encoder to an e_dim latent,
  `levels` residual codebooks, an MLP decoder, trained end to end with a straight-through estimator.
- `rkmeans`: residual k-means straight on the embeddings (GRID's and TIGER's baseline), faiss level by level.
The PESO authors' released index (`from_released_index`) is read into the same `SemanticIds`.

Items whose codes coincide are told apart by one extra dedup level (`suffix`): `dedup="colliding"` gives it only to
items that share their codes with another item; `dedup="all"` (GRID / TIGER) gives every item one (0 when unique).
Tokens are `<a_12><b_3><c_200><d_5>`: level letters a, b, c, ..., the dedup level the letter after the last one.
Codebook collapse (few codes used) is the known failure, so `usage` reports, per level, the codes used and the
perplexity of the code distribution (K when uniform over K codes, 1 when every item has the same code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)
METHODS = ("rqvae", "rkmeans")
DEDUP_MODES = ("colliding", "all")


def level_letter(level: int) -> str:
    return chr(ord("a") + level)


@dataclass
class SemanticIds:
    codes: np.ndarray  # [N, L] int64 level codes
    suffix: np.ndarray  # [N] int64, -1 = item not in a collision group, else 0, 1, 2, .. within its group
    levels: int
    codebook_size: int
    method: str
    usage: list[dict]
    collisions: dict

    def _dedup_code(self, i: int, dedup: str) -> int | None:
        if dedup not in DEDUP_MODES:
            raise ValueError(f"item_id.dedup={dedup!r}: expected one of {', '.join(DEDUP_MODES)}")
        k = int(self.suffix[i])
        if dedup == "all":
            return max(k, 0)  # unique items get <e_0> too: every ID has levels + 1 tokens
        return k if k >= 0 else None

    def tokens(self, i: int, dedup: str = "colliding") -> list[str]:
        out = [f"<{level_letter(l)}_{int(c)}>" for l, c in enumerate(self.codes[i])]
        k = self._dedup_code(i, dedup)
        if k is not None:
            out.append(f"<{level_letter(self.levels)}_{k}>")
        return out

    def vocabulary(self, dedup: str = "colliding") -> list[str]:
        """Every token some item uses, sorted by level then code: the tokens the tokenizer must add."""
        used = [sorted(set(self.codes[:, l].tolist())) for l in range(self.levels)]
        dedup_codes = {self._dedup_code(i, dedup) for i in range(len(self.codes))} - {None}
        used.append(sorted(dedup_codes))
        return [f"<{level_letter(l)}_{c}>" for l, codes in enumerate(used) for c in codes]


# ---------------------------------------------------------------------------------------------------------------
# collisions and codebook usage


def break_collisions(codes: np.ndarray) -> tuple[np.ndarray, dict]:
    """Suffix per item: -1 when no other item has its codes, else its rank (item index order) in its group."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, levels], got shape {codes.shape}")
    n = len(codes)
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)  # [N] group of each item
    order = np.argsort(group, kind="stable")  # items grouped, item index order inside a group
    first = np.searchsorted(group[order], np.arange(len(counts)))  # [G] where each group starts in `order`
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first[group[order]]
    in_collision = counts[group] > 1
    suffix = np.where(in_collision, rank, -1).astype(np.int64)
    report = {"items_in_collisions": int(in_collision.sum()), "groups": int((counts > 1).sum()),
              "max_group": int(counts.max()) if n else 0, "distinct_ids": int(len(counts))}
    return suffix, report


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: codes used, their share of the codebook, and perplexity exp(H), H = -sum_k p_k log p_k."""
    codes = np.asarray(codes)
    out = []
    for l in range(codes.shape[1]):
        counts = np.bincount(codes[:, l], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        used = int((counts > 0).sum())
        out.append({"level": l, "used": used, "share": used / codebook_size,
                    "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return out


# ---------------------------------------------------------------------------------------------------------------
# residual k-means


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """faiss k-means on every row of x (no subsampling, no small-sample warning); centroids [k, d]."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False)
    km.cp.max_points_per_centroid = max(len(x), 1)  # faiss would otherwise subsample beyond 256 points per centroid
    km.cp.min_points_per_centroid = 1
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids  # [k, d]


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)  # [N]


def residual_kmeans_codes(emb: np.ndarray, levels: int = 4, codebook_size: int = 256, seed: int = 0,
                          niter: int = 20) -> np.ndarray:
    """Codes [N, levels]: r_0 = x; c_l = argmin_k ||r_l - mu_{l,k}||, r_{l+1} = r_l - mu_{l,c_l}.

    Each level is a faiss k-means (seed `seed + l`, `niter` iterations) on all N residuals; with N < codebook_size a
    level has N centroids (codes < N)."""
    _check_inputs(emb, levels, codebook_size)
    residual = np.array(emb, dtype=np.float32)  # [N, d]
    k = min(len(residual), codebook_size)
    codes = np.empty((len(residual), levels), dtype=np.int64)
    for l in range(levels):
        centroids = _kmeans(residual, k, seed + l, niter)  # [k, d]
        codes[:, l] = _nearest(residual, centroids)
        residual = residual - centroids[codes[:, l]]
    return codes


# ---------------------------------------------------------------------------------------------------------------
# RQ-VAE


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:  # no activation on the latent nor on the reconstruction
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """x -> x' = (x - mean) / rms -> z = E(x') -> residual quantisation z_q = sum_l e_{l,c_l} -> x'_hat = D(z_q)."""

    def __init__(self, in_dim: int, levels: int, codebook_size: int, e_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(()))
        self.encoder = _mlp([in_dim, *hidden, e_dim])
        self.decoder = _mlp([e_dim, *reversed(hidden), in_dim])
        self.codebooks = nn.ParameterList(nn.Parameter(torch.zeros(codebook_size, e_dim)) for _ in range(levels))

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes [B, L], z_q [B, e_dim], and [codebook loss, commitment loss] summed over levels.
        r_0 = z, c_l = argmin_k ||r_l - e_{l,k}||, r_{l+1} = r_l - e_{l,c_l}, z_q = sum_l e_{l,c_l}."""
        residual, z_q = z, torch.zeros_like(z)
        codes, codebook_loss, commit_loss = [], z.new_zeros(()), z.new_zeros(())
        for book in self.codebooks:
            c = torch.cdist(residual, book).argmin(dim=1)  # [B]
            e = book[c]  # [B, e_dim]
            codebook_loss = codebook_loss + F.mse_loss(e, residual.detach())  # ||sg[r_l] - e||^2 moves the codebook
            commit_loss = commit_loss + F.mse_loss(residual, e.detach())  # ||r_l - sg[e]||^2 moves the encoder
            z_q = z_q + e
            residual = residual - e.detach()  # later levels see what earlier (frozen) codes left
            codes.append(c)
        return torch.stack(codes, dim=1), z_q, torch.stack([codebook_loss, commit_loss])

    @torch.no_grad()
    def fit_input_scale(self, x: torch.Tensor) -> None:
        """Centre the catalogue and scale it to unit RMS per dimension (one scalar: distances keep their ratios)."""
        self.input_mean.copy_(x.mean(0))
        self.input_scale.copy_((x - self.input_mean).pow(2).mean().sqrt().clamp(min=1e-12))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_scale

    def forward(self, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
        x = self.standardise(x)  # [B, d]
        z = self.encoder(x)  # [B, e_dim]
        codes, z_q, (codebook_loss, commit_loss) = self.quantise(z)
        x_hat = self.decoder(z + (z_q - z).detach())  # straight-through: decoder gradients pass to the encoder
        recon = F.mse_loss(x_hat, x)
        # L = ||x - x_hat||^2 + sum_l ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2
        loss = recon + codebook_loss + beta * commit_loss
        return loss, {"recon": recon.detach(), "codes": codes}

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int) -> None:
        """Each level's codebook = k-means (faiss, on CPU) of that level's residuals on one batch, levels in order."""
        residual = self.encoder(self.standardise(x))  # [B, e_dim]
        for l, book in enumerate(self.codebooks):
            k = book.shape[0]
            n_centroids = min(k, len(residual))
            centroids = torch.from_numpy(_kmeans(residual.cpu().numpy(), n_centroids, seed + l, niter=20))
            centroids = centroids.to(residual.device)
            if n_centroids < k:  # fewer points than codes: the spare codes start on random batch points
                g = torch.Generator().manual_seed(seed + l)
                spare = residual[torch.randint(len(residual), (k - n_centroids,), generator=g).to(residual.device)]
                centroids = torch.cat([centroids, spare])
            book.copy_(centroids)
            residual = residual - book[torch.cdist(residual, book).argmin(dim=1)]

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        return torch.cat([self.quantise(self.encoder(self.standardise(x[i:i + batch_size])))[0]
                          for i in range(0, len(x), batch_size)])  # [N, L]


def train_rqvae(emb: np.ndarray, levels: int = 4, codebook_size: int = 256, e_dim: int = 32,
                hidden: tuple[int, ...] = (512, 256, 128), epochs: int = 200, batch_size: int = 1024,
                lr: float = 1e-3, beta: float = 0.25, seed: int = 0, device: str = "cpu") -> tuple[RQVAE, list[dict]]:
    """The trained RQ-VAE and its history: one {"epoch", "loss", "recon"} (means over the epoch's batches) per epoch;
    `recon` is the MSE on the standardised inputs (1.0 = predicting the catalogue mean).

    Choices where TIGER / PESO leave it open:
    - inputs centred and scaled to unit RMS per dimension (one scalar for the catalogue, kept in the model). Why:
      unit-norm text embeddings have per-dimension values ~ 1/sqrt(d); the untrained encoder then maps every item
      into a tiny cloud, Adam moves the latent by ~lr per step regardless of that scale, the cloud leaves the
      k-means-initialised codebooks within tens of steps and all but a few codes die (measured on 3,000 MiniLM
      title embeddings, 256 codes, 30 epochs: 1 code used at every level unscaled, 61-221 per level scaled).
      PESO's raw Llama hidden states do not have that problem; scaling them is harmless.
    - Adam (lr), plain MSE means (over batch and dims) for every term, PyTorch's default init, ReLU MLPs without
      dropout or batch norm, batches reshuffled every epoch by a seeded generator;
    - codebooks initialised by k-means (faiss) on the first shuffled batch encoded by the untrained encoder, level
      after level on its residuals (TIGER's fix for collapse: random codebooks leave most codes never nearest to any
      latent); with fewer points than codes the spare codes start on random batch latents;
    - no dead-code restarts and no Sinkhorn balancing, so `codebook_usage` shows whatever collapse is left.
    Deterministic on CPU for a seed (torch's global RNG is forked, not consumed)."""
    _check_inputs(emb, levels, codebook_size)
    x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=device)  # [N, d]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RQVAE(x.shape[1], levels, codebook_size, e_dim, tuple(hidden)).to(device)
    model.fit_input_scale(x)
    g = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        if epoch == 0:
            model.init_codebooks(x[order[:batch_size]], seed)
        sums = torch.zeros(2)
        n_batches = 0
        for start in range(0, len(x), batch_size):
            loss, out = model(x[order[start:start + batch_size]], beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            sums += torch.stack([loss.detach(), out["recon"]]).cpu()
            n_batches += 1
        history.append({"epoch": epoch, "loss": float(sums[0] / n_batches), "recon": float(sums[1] / n_batches)})
    log.info("rqvae: %d epochs, reconstruction MSE %.5f -> %.5f", epochs, history[0]["recon"], history[-1]["recon"])
    return model, history


def rqvae_codes(emb: np.ndarray, levels: int = 4, codebook_size: int = 256, e_dim: int = 32,
                hidden: tuple[int, ...] = (512, 256, 128), epochs: int = 200, batch_size: int = 1024,
                lr: float = 1e-3, beta: float = 0.25, seed: int = 0, device: str = "cpu") -> np.ndarray:
    """Codes [N, levels] of every item under an RQ-VAE trained on `emb` (see `train_rqvae` for the choices)."""
    model, _ = train_rqvae(emb, levels, codebook_size, e_dim, hidden, epochs, batch_size, lr, beta, seed, device)
    model.eval()
    x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=device)
    return model.encode_codes(x).cpu().numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# building, caching, the released index


def _check_inputs(emb: np.ndarray, levels: int, codebook_size: int) -> None:
    if np.ndim(emb) != 2 or len(emb) == 0:
        raise ValueError(f"item embeddings must be a non-empty [N, d] array, got shape {np.shape(emb)}")
    if not 1 <= levels <= 25:  # one letter per level, and one more for the dedup level
        raise ValueError(f"item_id.levels={levels}: expected 1..25")
    if codebook_size < 1:
        raise ValueError(f"item_id.codebook_size={codebook_size}: expected >= 1")


def _semantic_ids(codes: np.ndarray, levels: int, codebook_size: int, method: str) -> SemanticIds:
    suffix, collisions = break_collisions(codes)
    return SemanticIds(codes, suffix, levels, codebook_size, method, codebook_usage(codes, codebook_size), collisions)


def build_semantic_ids(emb: np.ndarray, method: str = "rqvae", levels: int = 4, codebook_size: int = 256,
                       seed: int = 0, **method_kwargs) -> SemanticIds:
    """Semantic IDs of every row of `emb` by `method` (rqvae | rkmeans); method_kwargs go to that method."""
    if method == "rqvae":
        codes = rqvae_codes(emb, levels=levels, codebook_size=codebook_size, seed=seed, **method_kwargs)
    elif method == "rkmeans":
        codes = residual_kmeans_codes(emb, levels=levels, codebook_size=codebook_size, seed=seed, **method_kwargs)
    else:
        raise ValueError(f"item_id.method={method!r} is not one of: {', '.join(METHODS)}")
    ids = _semantic_ids(codes, levels, codebook_size, method)
    log.info("semantic ids (%s): %d items, %d distinct, %d in collisions, usage per level %s", method, len(codes),
             ids.collisions["distinct_ids"], ids.collisions["items_in_collisions"], [u["used"] for u in ids.usage])
    return ids


def semantic_ids_cached(emb: np.ndarray, cache_dir: str | Path, settings: dict, method: str = "rqvae",
                        levels: int = 4, codebook_size: int = 256, seed: int = 0, **method_kwargs) -> SemanticIds:
    """`build_semantic_ids`, cached at <cache_dir>/semantic_ids/<key>.npz (codes, suffix) + <key>.json (the rest).

    key = sha1 of (sha1 of the embeddings' dtype, shape and bytes; `settings`; the build arguments): the arguments
    are keyed too, so a `settings` that forgets one cannot serve stale codes."""
    emb = np.ascontiguousarray(emb)
    emb_hash = hashlib.sha1(f"{emb.dtype}{emb.shape}".encode() + emb.tobytes()).hexdigest()
    build_args = {"method": method, "levels": levels, "codebook_size": codebook_size, "seed": seed, **method_kwargs}
    try:
        blob = json.dumps([emb_hash, settings, build_args], sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"semantic-id settings must be JSON values (plain dicts/lists, not OmegaConf): {exc}") from exc
    key = hashlib.sha1(blob.encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "semantic_ids"
    arrays, meta = folder / f"{key}.npz", folder / f"{key}.json"
    if arrays.is_file() and meta.is_file():
        with np.load(arrays, allow_pickle=False) as z:
            codes, suffix = z["codes"].astype(np.int64), z["suffix"].astype(np.int64)
        m = json.loads(meta.read_text())
        return SemanticIds(codes, suffix, m["levels"], m["codebook_size"], m["method"], m["usage"], m["collisions"])
    ids = build_semantic_ids(emb, method, levels, codebook_size, seed, **method_kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{key}.tmp{os.getpid()}"
    with open(tmp.with_suffix(".npz"), "wb") as fh:  # a file handle: np.savez keeps the name as given
        np.savez(fh, codes=ids.codes, suffix=ids.suffix)
    tmp.with_suffix(".json").write_text(json.dumps(
        {"levels": ids.levels, "codebook_size": ids.codebook_size, "method": ids.method, "usage": ids.usage,
         "collisions": ids.collisions, "settings": settings, "build_args": build_args}, indent=1))
    tmp.with_suffix(".json").replace(meta)
    tmp.with_suffix(".npz").replace(arrays)  # last: the .npz marks a complete entry (both files are checked)
    return ids


_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def from_released_index(index: dict[str, list[str]], item_ids: list, codebook_size: int = 256) -> SemanticIds:
    """The released semantic IDs (PESO: {item id: ["<a_12>", "<b_3>", "<c_200>", "<d_5>"]}) of `item_ids`, row k =
    item_ids[k] (compared as strings), collisions broken as for recsim's own codes. `codebook_size` (256 in PESO's
    RQ-VAE) is only the denominator of the usage share; a code at or above it is an error."""
    ids = [str(i) for i in item_ids]
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(f"released semantic index lacks {len(missing)} of {len(ids)} items, e.g. "
                         f"{', '.join(map(repr, missing[:5]))}")
    if not ids:
        raise ValueError("from_released_index: no item ids given")
    levels = len(index[ids[0]])
    codes = np.empty((len(ids), levels), dtype=np.int64)
    for row, item in enumerate(ids):
        tokens = index[item]
        if len(tokens) != levels:
            raise ValueError(f"released semantic index: item {item!r} has {len(tokens)} tokens, item {ids[0]!r} has "
                             f"{levels}")
        for l, token in enumerate(tokens):
            m = _TOKEN.fullmatch(token)
            if m is None or m.group(1) != level_letter(l):
                raise ValueError(f"released semantic index: item {item!r} token {l} is {token!r}, expected "
                                 f"<{level_letter(l)}_N>")
            codes[row, l] = int(m.group(2))
    if codes.max() >= codebook_size:
        raise ValueError(f"released semantic index has code {codes.max()} >= codebook_size={codebook_size}")
    return _semantic_ids(codes, levels, codebook_size, "released")
