"""KL to a frozen copy of the model, the consistency term of EvoRec (L_c) and of FT-KL.

Which distribution: the next-token distributions over the whole vocabulary at the chosen positions
of a teacher-forced sample (prompt + the title its target would be written as). The frozen copy is
the LoRA state right before the update, run through `LLMRanker.with_params`, so no second model is
held in memory. Both passes run with dropout off, so the term is 0 until the first optimiser step
changes the weights (exactly 0 in the reference passes; round-off, ~1e-7 per position, when a sample's
stored frozen log-probs come from a batch of another shape, see `cache_frozen`).

Two choices the paper leaves open ("L_c = KL between the updated and the original model's outputs on
inactive-user data"), both in config (EvoRec: `method.kl.*`):
- `positions`: `answer` (default): the positions that predict the answer tokens of each sample, the
  model's distribution for the item text; `all`: every position that predicts a token of prompt +
  answer, as in the authors' released code, whose (disabled) term averages over all positions.
- `reduction`: `token_mean` (default): the mean over those positions of the batch; `sum`: summed over
  the positions and the samples of the KL batch, so the term scales with the tokens it constrains,
  as L_e's gradient does with the number of samples it fits.
FT-KL uses the defaults (answer, token_mean), unchanged since the term was introduced.

Cost (`cache_frozen`, EvoRec: `method.kl.cache_frozen`). With its own sample stream (EvoRec's pool of
inactive-user samples, drawn in seeded shuffled passes), much of what the term computes per step is the
same at every draw of a sample during an update: the frozen model never changes, dropout is off in both
passes, and the blocks below the lowest trainable one (l_min: the lowest located layer) do not train. So
each sample is prepared once and reused at every draw. When: on a CUDA device the whole pool at the
first call (inside the first training step: under the same autocast as every later step), in chunks of
similar lengths of up to 8,192 positions, because a small model's pass there costs kernel launches, not
FLOPs (512 samples: a handful of passes instead of 64); elsewhere each sample at its first draw, in that
step's batch, so an update that draws fewer samples than the pool prepares no more than it draws.
What is prepared:
- the pool is collated once and kept on the model's device; a step's batch is rows of it cut to the
  batch's own width (left padding: the same tensors `collate` makes), and its positions are picked by
  index (no boolean mask, so no host-device sync);
- the hidden state entering block l_min (recsim.models.layer_split), for both models: below l_min they
  are the same model, so blocks < l_min run once per sample instead of twice per draw. Memory: pool x
  width x hidden in the model's dtype (512 x ~150 x 576 x 2 B ≈ 90 MB for SmolLM2-135M in bf16);
- with the store on, the frozen model's final (normed) hidden states at exactly the positions L_c uses, in
  the dtype the pass made them in; a step turns them into log-probs with the head (frozen: it carries no
  LoRA) as the per-step pass does (logits `.float()`, then log_softmax), so nothing is rounded. Memory
  positions x H x 2 B in bf16: 65,752 positions x 576 x 2 B ≈ 76 MB for SmolLM2-135M at the gpu scale.
  (recsim stored the log-probs themselves before, positions x V x 4 B: 12.6 GB there, which ran the GPU out
  of memory beside other runs; a head GEMM per step costs far less than that memory.)
A step whose samples are all prepared then runs only the current model's blocks >= l_min (forward and
backward), the head on the stored frozen states, and no frozen pass. Values and gradients are those of the
per-step passes up to float round-off (the pool is prepared in other batch shapes than the steps'). With EvoRec's GPU setting
(144 steps x 8 draws from 512 samples, l_min = 20 of 30 blocks) a step's L_c then costs 10 blocks forward
and backward instead of 60 forward and 10 backward.
- `false`: the reference, per step: collate the KL batch on the host, run the current model (grad) and
  the frozen one (no grad) through every block. FT-KL (`samples=None`: its KL batch is the training
  batch itself, which arrives collated, without a fixed pool to prepare) always runs this way.
- `true`: everything above, on any device.
- `auto` (EvoRec's default): the frozen states are stored when the model is on a CUDA device and they
  take at most half of its free memory (driver free + PyTorch's reserved but unused); otherwise (CPU, where
  the cpu-scale tables were made this way; or too big) the rest is still done and each step runs the
  frozen model from the shared state, so only blocks >= l_min run twice.
The shared lower blocks need the trainable set fixed during the update (EvoRec sets it before) and a
decoder whose forward takes the state as `inputs_embeds` unchanged: the first batch is checked against the
full pass, and the split dropped (full passes, still with the store) when it does not match.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from recsim.backbones.lora import layer_of
from recsim.models.layer_split import decode_from, lowest_trainable_layer, split_matches, state_entering
from recsim.protocols.base import Sample

log = logging.getLogger(__name__)

POSITIONS = ("answer", "all")
REDUCTIONS = ("token_mean", "sum")
STORE_SHARE = 0.5  # auto: the frozen states may take at most this share of the device's free memory


def _check_cache(value):
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"method.kl.cache_frozen={value!r}: expected auto, true or false")


def _position_logits(module, batch: dict, positions: str) -> torch.Tensor:
    """Next-token logits [M, V] at the chosen positions of a collated batch."""
    if positions == "answer":
        return module.answer_logits(batch)["logits"]
    hidden = module._decode(batch["input_ids"], batch["attention_mask"]).last_hidden_state  # [B, L, H]
    mask = batch["attention_mask"].bool()
    where = mask[:, :-1] & mask[:, 1:]  # t real and predicting a real token t+1: not a left pad, not the last
    return _head_logits(module, hidden[:, :-1][where])


def kl_rows(module, batch: dict, anchor: dict[str, torch.Tensor], positions: str = "answer") -> torch.Tensor:
    """KL(p_anchor ‖ p_current) at each chosen position [M], with grad through the current model."""
    if positions not in POSITIONS:
        raise ValueError(f"method.kl.positions={positions!r}: expected one of {list(POSITIONS)}")
    was_training = module.training
    module.eval()  # dropout off: the term compares the two models, not two dropout masks
    try:
        current = _position_logits(module, batch, positions)
        with torch.no_grad():
            frozen = module.with_params(anchor, _position_logits, module, batch, positions)
    finally:
        module.train(was_training)
    return _kl(current, F.log_softmax(frozen, -1))


def _head_logits(module, states: torch.Tensor) -> torch.Tensor:
    """fp32 logits [M, V] of final states [M, H], as `_position_logits` makes them."""
    return module.base.get_output_embeddings()(states).float()


def _kl(current_logits: torch.Tensor, frozen_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per position, p = frozen, q = current."""
    return F.kl_div(F.log_softmax(current_logits, -1), frozen_logp, log_target=True, reduction="none").sum(-1)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    return rows.mean() if reduction == "token_mean" else rows.sum()


def kl_to_anchor(module, batch: dict, anchor: dict[str, torch.Tensor], positions: str = "answer",
                 reduction: str = "token_mean") -> torch.Tensor:
    """The raw L_c of one batch (see the module doc for `positions` and `reduction`)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"method.kl.reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
    return _reduce(kl_rows(module, batch, anchor, positions), reduction)


@torch.no_grad()
def kl_after_update(module, anchor: dict[str, torch.Tensor], samples: list[Sample], batch_size: int) -> float:
    """Mean over all answer tokens of `samples` of KL(p_anchor ‖ p_current), dropout off, no grad.

    Every answer token weighs the same (Σ KL / #tokens over all samples, not a mean of batch means),
    so the figure does not depend on `batch_size`. 0.0 for no samples.
    """
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(module.device) for k, v in module.collate(samples[start : start + batch_size]).items()}
        rows = kl_rows(module, batch, anchor, "answer")
        total, count = total + float(rows.double().sum()), count + rows.numel()
    return total / count if count else 0.0


def _free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _unchanged_below(model, anchor: dict[str, torch.Tensor], layer: int) -> bool:
    """Whether every anchor tensor outside blocks >= `layer` equals the current parameter (the two models
    then share the state entering `layer`)."""
    params = dict(model.named_parameters())
    for name, value in anchor.items():
        where = layer_of(name)
        if (where is None or where < layer) and not torch.equal(value, params[name].detach()):
            return False
    return True


class KLPool:
    """A fixed sample stream of L_c, each sample prepared once (see the module doc): the pool collated on
    the model's device, the state entering the lowest trainable block, optionally the frozen model's final
    states at the term's positions. `prepare_all` (default: on a CUDA device) prepares the whole pool at construction
    in large chunks; otherwise each sample is prepared at its first draw, in that step's batch."""

    def __init__(self, module, anchor: dict[str, torch.Tensor], samples: list[Sample], positions: str,
                 cache_frozen, prepare_all: bool | None = None):
        dev = module.device
        pool = module.collate(samples)
        mask = pool["attention_mask"]
        if not (bool(mask[:, -1].all()) and bool((mask.diff(dim=1) >= 0).all())):  # rows 0..0 1..1
            raise ValueError("L_c's prepared pool cuts batches out of a left-padded collate; this collate pads "
                             "otherwise: use method.kl.cache_frozen=false")
        self.width = width = mask.shape[1]
        self.lengths = mask.sum(1).numpy()
        # the tensors a step's batch is cut from; the pool's width is every row's padded width
        self.tensors = {k: pool[k].to(dev) for k in ("input_ids", "attention_mask", "labels")}
        # positions of each row as distances from the row's end, so they hold for any batch width
        chosen = (mask[:, :-1].bool() & mask[:, 1:].bool()) if positions == "all" else pool["labels"][:, 1:] != -100
        self.dist = [(width - 1) - torch.nonzero(row).flatten().numpy() for row in chosen]
        self.counts = np.array([len(d) for d in self.dist])
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)  # row i's first stored row
        head = module.base.get_output_embeddings().weight
        self.store_bytes = int(self.counts.sum()) * head.shape[1] * head.element_size()
        head_ids = {id(p) for p in module.base.get_output_embeddings().parameters()}
        # the stored states go through the current head: right only if the update cannot change it
        head_moves = any(id(p) in head_ids for n, p in module.model.named_parameters() if n in anchor)
        self.stored = not head_moves and (cache_frozen is True or (
            cache_frozen == "auto" and dev.type == "cuda" and self.store_bytes <= STORE_SHARE * _free_bytes(dev)))
        lowest = lowest_trainable_layer(module.model)
        self.split = lowest if lowest and _unchanged_below(module.model, anchor, lowest) else 0
        self.checked = False  # the split is checked against the full pass on the first batch
        self.ready = np.zeros(len(samples), dtype=bool)  # rows whose state / frozen log-probs are stored
        self.state = None  # [N, width, H], allocated at the first batch (its dtype is the state's)
        self.frozen_h = None  # [positions, H] stored final states, allocated at the first batch (the states' dtype)
        # on a GPU a small model's pass costs about the same for 8 samples as for 64 (kernel launches, not
        # FLOPs), so the whole pool costs a few passes; on a CPU cost follows tokens, and an update that
        # draws fewer samples than the pool would pay for samples it never uses
        if prepare_all is None:
            prepare_all = dev.type == "cuda"
        # under CUDA graphs (`trainer.compile_mode=reduce-overhead`) every step's KL batch keeps the pool's width:
        # a batch cut to its own longest row gives each step a new shape, hence a recompile and a new graph (the
        # gpu-scale EvoRec update hit dynamo's recompile limit and took 5x fine-tuning's time); values change by
        # round-off only (more left padding)
        self.static_width = bool(getattr(module, "cuda_graphs", False))
        self.prepare_seconds = 0.0  # of the whole pool at once (the figure would need a sync per step otherwise)
        if prepare_all:
            began = time.perf_counter()
            # eager, also when the trainer compiled the blocks: the pool's chunks differ in row count, so compiled
            # each would be a new shape (a recompile, under CUDA graphs a recording too) for a pass made once; the
            # gpu-scale update spent 34 s of its 129 s here that way, where a few eager no-grad passes suffice
            with torch.compiler.set_stance("force_eager"):
                self._prepare_all(module, anchor)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # once per update: the time is the device's, not the launches'
            self.prepare_seconds = time.perf_counter() - began
        log.info("L_c pool: %d samples, %d positions; blocks < %d run once per sample; frozen log-probs %s",
                 len(samples), int(self.counts.sum()), self.split,
                 f"from stored final states ({self.store_bytes / 2**20:.1f} MiB)" if self.stored
                 else f"recomputed per step (storing the states would take {self.store_bytes / 2**20:.1f} MiB)")

    def _device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.tensors["input_ids"].device, non_blocking=True)

    def _cut(self, rows: np.ndarray):
        """Device row indices, the batch's first column (left padding: the last `width` columns of the pool
        are what collate() makes of these rows), its attention mask, and the chosen positions (row, column)."""
        index = self._device(rows)
        start = 0 if self.static_width else self.width - int(self.lengths[rows].max())
        dist = [self.dist[r] for r in rows]
        b = np.repeat(np.arange(len(rows)), self.counts[rows])
        c = (self.width - start - 1) - np.concatenate(dist)
        return index, start, self.tensors["attention_mask"][index, start:], (self._device(b), self._device(c))

    def batch(self, rows) -> dict:
        """The batch `collate` makes of these pool rows (the tests' handle on the cut)."""
        index, start, _, _ = self._cut(np.asarray(rows))
        return {k: v[index, start:] for k, v in self.tensors.items()}

    def _final_states(self, module, inputs, mask, where) -> torch.Tensor:
        """Final hidden states [M, H] at the chosen positions, from the state entering block `split` (or the ids)."""
        if self.split:
            hidden = decode_from(module, self.split, inputs, mask)
        else:
            hidden = module._decode(inputs, mask).last_hidden_state
        return hidden[where]

    def _logits(self, module, inputs, mask, where) -> torch.Tensor:
        """Logits [M, V] at the chosen positions."""
        return _head_logits(module, self._final_states(module, inputs, mask, where))

    def _prepared_inputs(self, index, start):
        return self.state[index, start:] if self.split else self.tensors["input_ids"][index, start:]

    @torch.no_grad()
    def _check_split(self, module, anchor, ids, mask, state) -> None:
        """Once: the frozen model run from block `split` must reproduce its full pass (see layer_split)."""
        full = module.with_params(anchor, lambda: module._decode(ids, mask).last_hidden_state)
        split = module.with_params(anchor, decode_from, module, self.split, state, mask)
        if not split_matches(full, split):
            log.warning("L_c: the decoder run from block %d does not reproduce its full pass; running every block",
                        self.split)
            self.split = 0
        self.checked = True

    @torch.no_grad()
    def _frozen_pass(self, module, anchor, rows: np.ndarray, cut):
        """The frozen model on these rows, from blocks < split run now (both models' state): returns the
        current model's inputs (that state, or the ids) and the frozen log-probs [M, V]; the rows not yet
        prepared keep their state and log-probs. Dropout is off (the caller's eval mode)."""
        index, start, mask, where = cut
        new = self._device(np.flatnonzero(~self.ready[rows]))
        inputs = self.tensors["input_ids"][index, start:]
        if self.split:
            state = state_entering(module, self.split, inputs, mask)
            if not self.checked:
                self._check_split(module, anchor, inputs, mask, state)
        if self.split:  # the check may have dropped the split
            if self.state is None:
                self.state = torch.zeros((len(self.lengths), self.width, state.shape[-1]), dtype=state.dtype,
                                         device=state.device)
            self.state[index[new], start:] = state[new]
            inputs = state
        states = module.with_params(anchor, self._final_states, module, inputs, mask, where)
        frozen = F.log_softmax(_head_logits(module, states), -1)
        if self.stored:  # the new rows' positions among the batch's (rows in order, each its own positions)
            if self.frozen_h is None:
                self.frozen_h = states.new_empty((int(self.counts.sum()), states.shape[-1]))
            fresh = ~self.ready[rows]
            new_positions = self._device(np.flatnonzero(np.repeat(fresh, self.counts[rows])))
            self.frozen_h[self._stored_rows(rows[fresh])] = states[new_positions]
        self.ready[rows] = True
        return inputs, frozen

    def _prepare_all(self, module, anchor, max_positions: int = 8192) -> None:
        """Every row, in chunks of similar lengths and at most `max_positions` positions (a [positions, V] fp32
        block of logits: 1.6 GB at V = 49,152)."""
        was_training = module.training
        module.eval()
        try:
            order, chunk, size = np.argsort(self.lengths, kind="stable"), [], 0
            for r in order.tolist() + [None]:
                if r is None or (chunk and size + self.counts[r] > max_positions):
                    rows = np.asarray(chunk, dtype=np.int64)
                    self._frozen_pass(module, anchor, rows, self._cut(rows))
                    chunk, size = [], 0
                if r is not None:
                    chunk, size = chunk + [r], size + self.counts[r]
        finally:
            module.train(was_training)

    def kl_rows(self, module, anchor: dict[str, torch.Tensor], rows: np.ndarray) -> torch.Tensor:
        """KL(p_anchor ‖ p_current) [M] at the chosen positions of these pool rows, grad through the current model.

        A batch holding a row not yet prepared runs blocks < split once (no grad; both models) and the frozen
        model from there, and keeps what its new rows need for their later draws."""
        cut = self._cut(rows)
        index, start, mask, where = cut
        was_training = module.training
        module.eval()  # dropout off: the term compares the two models, not two dropout masks
        try:
            if not self.ready[rows].all():
                inputs, frozen = self._frozen_pass(module, anchor, rows, cut)
            elif self.stored:
                inputs = self._prepared_inputs(index, start)
                with torch.no_grad():
                    frozen = F.log_softmax(_head_logits(module, self.frozen_h[self._stored_rows(rows)]), -1)
            else:
                inputs = self._prepared_inputs(index, start)
                with torch.no_grad():
                    frozen = F.log_softmax(module.with_params(anchor, self._logits, module, inputs, mask, where), -1)
            current = self._logits(module, inputs, mask, where)
        finally:
            module.train(was_training)
        return _kl(current, frozen)

    def _stored_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Rows of `frozen_h` holding these pool rows' positions, in the order of `_cut`'s positions."""
        return self._device(np.concatenate([np.arange(self.first[r], self.first[r] + self.counts[r]) for r in rows]))

    def summary(self) -> dict:
        return {"split_layer": self.split, "frozen_stored": self.stored, "samples_prepared": int(self.ready.sum()),
                "frozen_store_mb": round(self.store_bytes / 2**20, 1) if self.stored else 0.0,
                "prepare_seconds": round(self.prepare_seconds, 3), "static_width": self.static_width}


class AnchorKL:
    """Loss term λ·KL(p_frozen ‖ p_current) on its own sample stream (EvoRec: inactive users) or on the
    training batch itself (FT-KL: `samples=None`).

    `cache_frozen` (auto | true | false; see the module doc) prepares the stream once, at the first call;
    false, the default, keeps the per-step reference passes (and FT-KL ignores it: nothing to prepare).
    The stream's order (seeded shuffled passes) is the same either way.

    Logged per step: `train/<name>` = λ·L_c (the term added to the loss, by the ranker's training_step)
    and `train/<name>_raw` = L_c.
    """

    def __init__(self, anchor: dict[str, torch.Tensor], lam: float, samples: list[Sample] | None = None,
                 batch_size: int = 8, seed: int = 0, name: str = "kl", positions: str = "answer",
                 reduction: str = "token_mean", cache_frozen=False, prepare_all: bool | None = None):
        if positions not in POSITIONS:
            raise ValueError(f"method.kl.positions={positions!r}: expected one of {list(POSITIONS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"method.kl.reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
        self.anchor, self.lam, self.samples, self.batch_size, self.name = anchor, lam, samples, batch_size, name
        self.positions, self.reduction, self.cache_frozen = positions, reduction, _check_cache(cache_frozen)
        self.prepare_all = prepare_all  # None: the whole pool at the first call on a CUDA device (KLPool)
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pool: KLPool | None = None  # prepared at the first call when cache_frozen is not false

    def _next_rows(self) -> np.ndarray:
        if len(self.order) < self.batch_size:  # cycle through the stream in seeded shuffled passes
            self.order += self.rng.permutation(len(self.samples)).tolist()
        take, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return np.asarray(take, dtype=np.int64)

    def _next_samples(self) -> list[Sample]:
        return [self.samples[i] for i in self._next_rows()]

    def __call__(self, module, batch: dict, out: dict) -> dict:
        if self.lam == 0:
            return {}
        if self.samples is not None and self.cache_frozen is not False:
            if self.pool is None or self.pool.tensors["input_ids"].device != module.device:
                self.pool = KLPool(module, self.anchor, self.samples, self.positions, self.cache_frozen,
                                   self.prepare_all)
            rows = self._next_rows()
            raw, size = _reduce(self.pool.kl_rows(module, self.anchor, rows), self.reduction), len(rows)
        else:
            if self.samples is not None:  # the reference: collate this step's KL batch on the host
                batch = {k: v.to(module.device) for k, v in module.collate(self._next_samples()).items()}
            raw = kl_to_anchor(module, batch, self.anchor, self.positions, self.reduction)
            size = batch["input_ids"].shape[0]
        if getattr(module, "_current_fx_name", None) == "training_step":  # a direct call has nowhere to log
            module.log(f"train/{self.name}_raw", raw.detach(), batch_size=size)
        return {self.name: self.lam * raw}
