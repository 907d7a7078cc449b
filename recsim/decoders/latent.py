"""L2D (Wang et al., "Decoding in Latent Spaces for Efficient Inference in LLM-based Recommendation"): keep the
generative fine-tuning, decode in the LLM's latent space: one pass over the prompt per user, no autoregression.

    memory   {(h_j, v_j)}: h_j = the last layer's state (final norm applied) at the position that writes training
             sample j's answer, i.e. its prompt's last token; v_j = its target item
    L2D-G    h̄_v = mean{h_j : v_j = v};                                        score(v) = 1 / ‖h_t − h̄_v‖₂
    L2D-L    N_M(h_t) = the M memory entries most similar to h_t;
             h̄_v^t = mean{h_j : j ∈ N_M(h_t), v_j = v}, for the items of N_M(h_t);  score(v) = 1 / ‖h_t − h̄_v^t‖₂
    top-K by score. 1/d decreases with d, so the top-K by score is the K nearest by distance: what is computed.

Choices (settings: conf/decoder/l2d_global.yaml, l2d_local.yaml, read through `decoder_settings`):
- Memory samples (`memory.samples`): `seen` (default; the model should remember all it was trained on) = every
  training sample of every stage up to this one (the protocol's trainable positions, `stage.cumulative_targets`);
  `stage` = what the stage's update trains on by default (stage 0: everything up to it; an update: its window).
  These are the protocol's samples, not a method's own choice (EvoRec's Forget, `trainer.max_train_samples`'s cap):
  asking the method again would re-run its data choice. Test and validation targets are never training targets.
- `memory_ratio` keeps max(1, ⌊ratio·n + ½⌋) entries, uniform without replacement, seeded by (seed, stage). The
  subset is drawn before encoding: only kept samples cost a pass.
- The states come through the method (`method.decode_hidden`: the model as the method infers). Stored float16
  [n, H] with int64 targets in the stage folder, `l2d_memory-<key>.safetensors`, its fingerprint (stage, samples,
  ratio, seed, the sample list, the adapter weights, the method) in the file's metadata; a file whose fingerprint
  matches is loaded instead of rebuilt. Memory build seconds (encoding only) are reported, also per 100k entries.
- L2D-L: `similarity` l2 (default: the score's own distance) or cosine picks N_M(h_t); the score is always the
  L2 distance of the raw states. `aggregation` mean (the paper's) or count (a kNN vote: items by their number of
  entries in N_M(h_t), ties by the mean's distance). Items outside N_M(h_t): `local_fallback: global` (default)
  ranks them after, by L2D-G's distance; `none` leaves them out (a short list, counted). With M >= the memory
  size and the mean, L2D-L is L2D-G.
- Cold items (no memory entry) have no representation: they are never listed (a cold target is missed: rank -1,
  0 in every metric). Their number, and the count and share of evaluated targets that are cold, are reported.
- Search (`search`): auto = torch on a GPU (cdist + topk, exact), faiss on CPU (IndexFlatL2, exact; past
  `index.approximate_above` entries IndexIVFFlat, `index.kind: ivf`, deterministic, or IndexHNSWFlat, `hnsw`).
  faiss's squared distances are square-rooted. Everything is computed in float32.
- As the other catalogue decoders, the user's history is not removed from the list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsim.backbones.lora import ADAPTER_TENSORS
from recsim.decoders.base import CatalogueDecoder, decoder_settings, ranks_of_lists
from recsim.protocols.base import make_samples

log = logging.getLogger(__name__)
MEMORY_FORMAT = 1
_BLOCK = 1 << 25  # elements of the largest float32 temporary a search or aggregation step builds (128 MB)


# ---- the memory ----------------------------------------------------------------------------------------------
@dataclass
class Memory:
    states: torch.Tensor  # [n, H] float16, CPU
    targets: torch.Tensor  # [n] int64, items 1..N
    fingerprint: dict
    build_seconds: float  # encoding time when it was built (a loaded memory keeps its builder's figure)
    reused: bool = False  # loaded from the stage folder

    @property
    def key(self) -> str:
        return fingerprint_key(self.fingerprint)

    def __len__(self) -> int:
        return len(self.targets)

    def stats(self, num_items: int) -> dict[str, float]:
        items = int(torch.unique(self.targets).numel()) if len(self) else 0
        return {"memory_entries": float(len(self)), "memory_items": float(items),
                "cold_items": float(num_items - items), "memory_build_seconds": self.build_seconds,
                "memory_seconds_per_100k": self.build_seconds / max(1, len(self)) * 1e5,
                "memory_reused": float(self.reused)}


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def memory_samples(protocol, stage, which: str) -> list:
    """The training samples the memory holds (`memory.samples`): `seen` or `stage` (see the module docstring)."""
    if which not in ("seen", "stage"):
        raise ValueError(f"decoder.memory.samples={which!r}: expected seen or stage")
    targets = stage.cumulative_targets if which == "seen" or stage.index == 0 else stage.new_targets
    return make_samples(stage.sequences, targets, protocol.window)


def kept_entries(n: int, ratio: float, seed: int, stage_index: int) -> np.ndarray:
    """Sorted indices of the max(1, ⌊ratio·n + ½⌋) samples `memory_ratio` keeps (all of them at ratio 1)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"decoder.memory_ratio={ratio}: expected a number in (0, 1]")
    keep = min(n, max(1, math.floor(ratio * n + 0.5))) if n else 0
    if keep == n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stage_index]).choice(n, keep, replace=False))


def model_fingerprint(rec) -> str:
    """sha1 of what the states depend on besides the base model: every adapter tensor, the parameters a method keeps
    on the ranker outside the model (SD-LoRA's magnitudes), and the base weights' hash."""
    digest = hashlib.sha1(str(getattr(rec, "base_hash", "")).encode())
    named = [(n, p) for n, p in rec.model.named_parameters() if any(t in n for t in ADAPTER_TENSORS)]
    named += [(f"module.{n}", p) for n, p in rec.module.named_parameters() if not n.startswith("model.")]
    for name, p in sorted(named, key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode(hidden, ranker, samples, batch_size: int, progress=None) -> torch.Tensor:
    """h of each sample [n, H] float32 on the ranker's device: `hidden(ids, mask)`'s state at the prompt's last
    token (left padding: the last column). Prompts are grouped by length, so batches carry little padding."""
    if batch_size < 1:
        raise ValueError(f"decoder.batch_size={batch_size}: expected an integer >= 1")
    prompts = [ranker.prompt_ids(s.history) for s in samples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = None
    was_training = ranker.training
    ranker.eval()  # no LoRA dropout
    try:
        batches = range(0, len(order), batch_size)
        for start in progress(batches) if progress else batches:
            rows = order[start : start + batch_size]
            ids, mask = ranker._left_pad([prompts[i] for i in rows])
            last = hidden(ids, mask)[:, -1].float()  # [b, H]
            if out is None:
                out = torch.empty(len(prompts), last.shape[-1], device=last.device)
            out[torch.tensor(rows, device=last.device)] = last
    finally:
        ranker.train(was_training)
    return out if out is not None else torch.empty(0, 0)


def _memory_path(stage_dir: Path, key: str) -> Path:
    return Path(stage_dir) / f"l2d_memory-{key}.safetensors"


def load_fingerprinted(path: Path, fingerprint: dict, what: str) -> tuple[dict, dict] | None:
    """(tensors, metadata) of a safetensors file saved with `fingerprint` in its metadata; None when the
    fingerprint differs or the file cannot be read (then `what` is built again)."""
    import safetensors
    import safetensors.torch

    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("fingerprint", "null")) != fingerprint:
            return None
        return safetensors.torch.load_file(str(path)), meta
    except (OSError, ValueError, json.JSONDecodeError, safetensors.SafetensorError) as err:
        log.warning("%s %s unreadable (%s): building it again", what, path, err)
        return None


def _load(path: Path, fingerprint: dict) -> Memory | None:
    loaded = load_fingerprinted(path, fingerprint, "L2D memory")
    if loaded is None:
        return None
    tensors, meta = loaded
    return Memory(tensors["states"], tensors["targets"], fingerprint, float(meta.get("build_seconds", "nan")),
                  reused=True)


def _save(path: Path, memory: Memory) -> None:
    import safetensors.torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    meta = {"fingerprint": json.dumps(memory.fingerprint, sort_keys=True), "build_seconds": repr(memory.build_seconds),
            "seconds_per_100k": repr(memory.build_seconds / max(1, len(memory)) * 1e5)}
    safetensors.torch.save_file({"states": memory.states.contiguous(), "targets": memory.targets.contiguous()},
                                str(tmp), metadata=meta)
    os.replace(tmp, path)  # a reader never sees half a memory


def stage_memory(method, rec, protocol, stage, stage_dir, settings, seed: int) -> Memory:
    """The stage's memory: from this process's cache, else the stage folder, else built (and saved there unless
    `memory.save` is false or there is no folder)."""
    samples = memory_samples(protocol, stage, settings.memory.samples)
    ratio = float(settings.memory_ratio)
    keep = kept_entries(len(samples), ratio, seed, stage.index)
    samples = [samples[i] for i in keep]
    kept = hashlib.sha1(json.dumps([(s.user, s.position, s.target, list(s.history)) for s in samples]).encode())
    model = model_fingerprint(rec)
    fingerprint = {"format": MEMORY_FORMAT, "stage": stage.index, "stage_name": stage.name,
                   "samples": settings.memory.samples, "memory_ratio": ratio, "seed": seed, "entries": len(samples),
                   "samples_sha1": kept.hexdigest(), "model": model, "method": type(method).__name__}
    key = fingerprint_key(fingerprint)
    cache = rec.__dict__.setdefault("decoder_cache", {}).setdefault("l2d_memory", {})
    for stale in [k for k, m in cache.items() if m.fingerprint["model"] != model]:  # an earlier stage's weights
        del cache[stale]
    if key in cache:
        return cache[key]
    path = _memory_path(stage_dir, key) if stage_dir is not None else None
    memory = _load(path, fingerprint) if path is not None and path.is_file() else None
    if memory is None:
        device = rec.module.device
        start = time.perf_counter()
        states = encode(method.decode_hidden(rec), rec.module, samples, int(settings.batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        states = states.to("cpu", torch.float16) if len(samples) else torch.empty(0, 0, dtype=torch.float16)
        targets = torch.tensor([s.target for s in samples], dtype=torch.int64)
        memory = Memory(states, targets, fingerprint, seconds)
        log.info("L2D memory of stage %s: %d entries in %.1f s (%.1f s per 100k)", stage.name, len(memory), seconds,
                 seconds / max(1, len(memory)) * 1e5)
        if path is not None and settings.memory.get("save", True):
            _save(path, memory)
    cache[key] = memory
    return memory


# ---- aggregation and search ----------------------------------------------------------------------------------
def item_means(states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2D-G's item representations: (items [I] sorted, h̄ [I, H] float32, entries per item [I]) over the items with
    at least one entry; h̄_v = the mean of the states whose target is v."""
    items, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(items), states.shape[1], dtype=torch.float32, device=states.device)
    sums.index_add_(0, inverse, states.float())
    return items, sums / counts[:, None].to(sums.dtype), counts


class NearestRows:
    """The rows of `base` [n, H] nearest each query in L2, exactly (torch; faiss IndexFlatL2) or approximately (faiss
    past `index.approximate_above` rows). `backend`: torch | faiss."""

    def __init__(self, base: torch.Tensor, backend: str, index_cfg=None):
        if backend not in ("torch", "faiss"):
            raise ValueError(f"decoder.search={backend!r}: expected auto, faiss or torch")
        self.backend, self.n = backend, len(base)
        if backend == "faiss":
            self.device = torch.device("cpu")
            if self.n:
                self.index = _faiss_index(np.ascontiguousarray(base.float().cpu().numpy()), index_cfg or {})
        else:
            self.base = base.float()
            self.device = self.base.device

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 distances [B, k'], row indices [B, k']) nearest first, k' = min(k, n); a row an approximate index
        could not fill is -1 at distance inf."""
        k = min(k, self.n)
        B = len(queries)
        if k == 0:
            return torch.empty(B, 0, device=self.device), torch.empty(B, 0, dtype=torch.long, device=self.device)
        queries = queries.float().to(self.device)
        if self.backend == "faiss":
            d, i = self.index.search(np.ascontiguousarray(queries.numpy()), k)
            d = np.where(i < 0, np.inf, np.sqrt(np.maximum(d, 0.0)))  # IndexFlatL2: squared distances
            return torch.from_numpy(d.astype(np.float32)), torch.from_numpy(i.astype(np.int64))
        rows = max(1, _BLOCK // max(1, self.n))  # bounds the [rows, n] distance block
        out = [torch.cdist(queries[r : r + rows], self.base).topk(k, dim=1, largest=False) for r in range(0, B, rows)]
        return torch.cat([d for d, _ in out]), torch.cat([i for _, i in out])


def _faiss_index(x: np.ndarray, index_cfg):
    import faiss  # imported here: only the latent and grounding decoders need it

    n, dim = x.shape
    above = index_cfg.get("approximate_above")
    if above is None or n <= int(above):
        index = faiss.IndexFlatL2(dim)
    elif index_cfg.get("kind", "ivf") == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(index_cfg.get("hnsw_m", 32)))
        index.hnsw.efSearch = int(index_cfg.get("ef_search", 128))
    else:
        nlist = index_cfg.get("nlist") or max(1, int(4 * math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, int(nlist))
        index.train(x)  # k-means with faiss's fixed seed: the same lists every run
        index.nprobe = int(index_cfg.get("nprobe", 16))
    index.add(x)
    return index


def local_items(queries, neighbours, states, targets, aggregation: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """L2D-L inside each query's neighbour set: (items [B, M] ranked, -1 padded; their ‖h_t − h̄_v^t‖₂ [B, M], inf
    padded). `neighbours` [B, M]: memory rows (-1: none); `aggregation`: mean (by distance to h̄_v^t) or count
    (by entries among the M, then distance)."""
    B, M = neighbours.shape
    if aggregation not in ("mean", "count"):
        raise ValueError(f"decoder.aggregation={aggregation!r}: expected mean or count")
    if M == 0:
        return neighbours.clone(), torch.empty(B, 0, device=neighbours.device)
    missing = neighbours < 0
    sentinel = int(targets.max()) + 1 if len(targets) else 1
    item = torch.where(missing, sentinel, targets[neighbours.clamp(min=0)])  # [B, M]
    item, order = item.sort(dim=1, stable=True)
    rows = neighbours.gather(1, order).clamp(min=0)
    # one segment per (query, item): a running id over the sorted row
    starts = torch.ones_like(item, dtype=torch.bool)
    starts[:, 1:] = item[:, 1:] != item[:, :-1]
    seg = (starts.cumsum(1) - 1) + torch.arange(B, device=item.device)[:, None] * M  # [B, M] flat segment id
    flat = seg.reshape(-1)
    sums = torch.zeros(B * M, states.shape[1], dtype=torch.float32, device=states.device)
    sums.index_add_(0, flat, states[rows.reshape(-1)].float())
    counts = torch.bincount(flat, minlength=B * M)
    seg_item = torch.full((B * M,), -1, dtype=torch.long, device=item.device)
    seg_item[flat] = item.reshape(-1)
    means = (sums / counts.clamp(min=1)[:, None].to(sums.dtype)).view(B, M, -1)
    dist = (queries.float()[:, None, :] - means).norm(dim=-1)  # [B, M]
    seg_item, counts = seg_item.view(B, M), counts.view(B, M)
    empty = (counts == 0) | (seg_item == sentinel)
    dist = dist.masked_fill(empty, float("inf"))
    seg_item = seg_item.masked_fill(empty, -1)
    # mean: ascending distance; count: descending count, then distance (a stable sort by the second key first)
    order = dist.argsort(dim=1, stable=True)
    if aggregation == "count":
        by_count = counts.masked_fill(empty, -1).gather(1, order).argsort(dim=1, descending=True, stable=True)
        order = order.gather(1, by_count)
    return seg_item.gather(1, order), dist.gather(1, order)


def merge_lists(first: torch.Tensor, then: torch.Tensor, num_items: int, top_k: int) -> torch.Tensor:
    """Each row's items of `first` (-1 padded), then those of `then` not already listed, cut to `top_k` [B, top_k]."""
    B = len(first)
    seen = torch.zeros(B, num_items + 1, dtype=torch.bool, device=first.device)
    seen.scatter_(1, first.clamp(min=0), first >= 0)  # column 0 takes the -1s: no real item is 0
    then = then.masked_fill((then < 0) | seen.gather(1, then.clamp(min=0)), -1)
    return compact(torch.cat([first, then], 1), top_k)


def compact(items: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each row's real items (>= 0) moved ahead of its -1s in their order, cut or -1 padded to `top_k` columns."""
    order = (items < 0).to(torch.int8).argsort(dim=1, stable=True)
    items = items.gather(1, order)[:, :top_k]
    if items.shape[1] < top_k:
        items = torch.cat([items, items.new_full((len(items), top_k - items.shape[1]), -1)], 1)
    return items


# ---- the decoders --------------------------------------------------------------------------------------------
class LatentDecoder(CatalogueDecoder):
    """What L2D-G, L2D-L and the ID head share: settings (`decoder_settings`), the stage's memory (`prepare`), each
    user's test state h_t, and the memory's figures beside the metrics."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings = decoder_settings(cfg, self.name)
        self.memory: Memory | None = None

    def top_k(self) -> int:
        k = self.settings.get("top_k")
        return int(k) if k is not None else max(self.cfg.eval.ks)

    def backend(self, rec) -> str:
        search = self.settings.get("search", "auto")
        return ("torch" if rec.module.device.type == "cuda" else "faiss") if search == "auto" else search

    def prepare(self, method, rec, protocol, stage, stage_dir) -> None:
        self.memory = stage_memory(method, rec, protocol, stage, stage_dir, self.settings, int(self.cfg.seed))
        self.hidden = method.decode_hidden(rec)
        self.num_items = rec.num_items
        if len(self.memory):  # an empty memory lists nothing (every target is cold)
            self.fit(rec, stage_dir)

    def fit(self, rec, stage_dir) -> None:
        """What the decoder derives from the memory once per stage (indexes, a trained head)."""

    @abstractmethod
    def lists(self, queries: torch.Tensor) -> torch.Tensor:
        """Each test state's top_k items [B, top_k], -1 padded."""

    @torch.no_grad()
    def rank(self, method, rec, samples, candidates, progress=None):
        if self.memory is None:
            raise RuntimeError(f"decoder {self.name}: prepare(method, rec, protocol, stage, stage_dir) builds its "
                               "memory and must run before rank")
        K, lists = self.top_k(), []
        step = int(self.settings.batch_size)
        batches = range(0, len(samples), step)
        for start in progress(batches) if progress else batches:
            queries = encode(self.hidden, rec.module, samples[start : start + step], step)
            lists.append(self.lists(queries).cpu().numpy() if len(self.memory) else np.full((len(queries), K), -1))
        lists = np.concatenate(lists) if lists else np.zeros((0, K), dtype=np.int64)
        ranks, counts = ranks_of_lists(lists, samples, rec.num_items, K)
        known = set(torch.unique(self.memory.targets).tolist())
        counts["cold_targets"] = sum(s.target not in known for s in samples)
        return ranks, counts

    def count_rows(self, counts):
        rows = super().count_rows(counts)
        rows["cold_targets"] = float(counts["cold_targets"])
        rows["cold_target_share"] = counts["cold_targets"] / max(1, counts["users"])
        if self.memory is not None:
            rows.update(self.memory.stats(self.num_items))
        return rows


class L2DGlobal(LatentDecoder):
    """L2D-G: items ranked by the L2 distance of the user's state to the mean of their memory states."""

    name = "l2d_global"

    def fit(self, rec, stage_dir):
        self.items, means, _ = item_means(self.memory.states, self.memory.targets)
        backend = self.backend(rec)
        self.items = self.items.to(rec.module.device if backend == "torch" else "cpu")
        self.centroids = NearestRows(means.to(self.items.device), backend, self.settings.get("index"))

    def global_lists(self, queries, k: int) -> torch.Tensor:
        _, rows = self.centroids.search(queries, k)
        return torch.where(rows >= 0, self.items[rows.clamp(min=0)], -1)

    def lists(self, queries):
        return compact(self.global_lists(queries, self.top_k()), self.top_k())


class L2DLocal(L2DGlobal):
    """L2D-L: per user, the M most similar memory entries, aggregated per item inside that set, ranked by the L2
    distance of the user's state to each item's local mean; items outside the set after, by L2D-G (or not at all)."""

    name = "l2d_local"

    def fit(self, rec, stage_dir):
        super().fit(rec, stage_dir)
        s = self.settings
        if s.similarity not in ("l2", "cosine"):
            raise ValueError(f"decoder.similarity={s.similarity!r}: expected l2 or cosine")
        if s.local_fallback not in ("global", "none"):
            raise ValueError(f"decoder.local_fallback={s.local_fallback!r}: expected global or none")
        states = self.memory.states.to(self.items.device).float()
        self.states, self.targets = states, self.memory.targets.to(self.items.device)
        # cosine similarity: L2 between unit vectors, ‖a − b‖² = 2 − 2·cos(a, b), the same order
        keyed = torch.nn.functional.normalize(states, dim=1) if s.similarity == "cosine" else states
        self.entries = NearestRows(keyed, self.backend(rec), s.get("index"))

    def lists(self, queries):
        s, K = self.settings, self.top_k()
        queries = queries.float().to(self.items.device)
        M = min(int(s.m), len(self.states))
        keyed = torch.nn.functional.normalize(queries, dim=1) if s.similarity == "cosine" else queries
        rows = max(1, _BLOCK // max(1, M * self.states.shape[1]))  # bounds the [rows, M, H] gathered states
        out = []
        for r in range(0, len(queries), rows):
            q = queries[r : r + rows]
            _, neighbours = self.entries.search(keyed[r : r + rows], M)
            items, _ = local_items(q, neighbours, self.states, self.targets, s.aggregation)
            if s.local_fallback == "global":  # every item the local set lacks can still be among the top K
                out.append(merge_lists(items, self.global_lists(q, K + items.shape[1]), self.num_items, K))
            else:
                out.append(compact(items, K))
        return torch.cat(out)
