"""TALLRec-style LLM recommender: a causal LM with LoRA learns to write the next item's title after a
prompt listing the user's history, and ranks candidates by the likelihood of their titles.

Scoring choice (config `scoring.normalize`): a candidate's score is the mean log-probability per token
of " <title><eos>" after the prompt (`mean`, the default, so long titles are not penalised for their
length), or the sum (`sum`, the sequence log-likelihood). The EOS token is included so that a title
which is a prefix of another is not favoured.

Scoring kernel (config `scoring.kernel`): `packed` (the default) runs one sequence per user,
prompt + cand_1 + ... + cand_C, under a 4D mask in which every candidate sees the whole prompt and its
own earlier tokens only, at positions P, P+1, ... as if it alone followed the prompt: one forward pass,
no copy of the prompt's KV cache. `kv_repeat` (the former kernel, kept as the reference) runs the
prompt, copies its KV cache C times and runs the C titles in a second pass; the copies cost ~6.6 GB at
64 users on a GPU. Both give the same scores as one pass per candidate (tests/test_llm_ranker.py).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from recsim.eval.metrics import ranks_from_lists
from recsim.models.prompts import answer_text, candidate_list_prompt, distinct_titles, history_prompt, parse_ranked_list
from recsim.protocols.base import Sample

SCORING_KERNELS = ("packed", "kv_repeat")  # scoring.kernel (recsim.schema restates it: it must not import torch)

def _cache_kwarg(decoder) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); the GPU machine has an older 5.x."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def fp32_logits(head: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """`head(h)` with fp32 logits. On CUDA with bf16/fp16 `h` and weights: one tensor-core GEMM that writes fp32
    (`torch.mm(..., out_dtype=float32)`). A product of two bf16 numbers is exact in fp32 and both GEMMs sum in
    fp32, so it equals the fp32 GEMM of the upcast operands up to summation order, at a fraction of its time
    (that GEMM was ~19% of a scoring pass on the H200). Elsewhere: the fp32 GEMM."""
    w, bias = head.weight, None if head.bias is None else head.bias.float()
    if h.is_cuda and h.dtype == w.dtype and w.dtype in (torch.bfloat16, torch.float16):
        out = torch.mm(h, w.t(), out_dtype=torch.float32)
        return out if bias is None else out + bias
    return F.linear(h.float(), w.float(), bias)


@contextlib.contextmanager
def no_lora_input_casts(layers: list, active: bool = True):
    """peft's `disable_input_dtype_casting` over LoRA layers found once: peft's helper walks every module of the
    model twice a call (2,500 in SmolLM2 with LoRA: 19 ms on 2 CPU cores), and this runs at every decoder pass."""
    if not active:
        yield
        return
    before = [layer.cast_input_dtype_enabled for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


class _Holder(torch.nn.Module):
    """Makes `model` a child module so functional_call can reparametrise it around any callable."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


LossTerm = Callable[["LLMRanker", dict, dict], dict]


class LLMRanker(L.LightningModule):
    def __init__(self, model, tokenizer, titles: list[str], prompt_cfg, scoring_cfg, optim_cfg,
                 pad_to_multiple_of: int | None = None, answers: list[str] | None = None):
        """`titles[i]`: what the prompt shows for item i; `answers[i]`: what the model emits for it, as it is
        (semantic-ID code strings, titles told apart), never cut to `scoring.max_answer_tokens`; None: the title, cut
        to `scoring.max_title_words` words and `scoring.max_answer_tokens` tokens (recsim.items.vocab)."""
        super().__init__()
        self.answers = answers
        self.pad_to_multiple_of = pad_to_multiple_of  # training batches' width (compiled shapes: fewer of them)
        self.model = model  # a peft PeftModel (LoRA injected into the base)
        self.tok = tokenizer
        self.titles = titles
        self.prompt_cfg = prompt_cfg
        self.scoring_cfg = scoring_cfg
        self.optim_cfg = optim_cfg
        self.loss_terms: list[LossTerm] = []  # extra loss terms a method adds (KL, EWC, ...)
        self.ce_temperature = 1.0  # L_e on logits / T (PESO's code trains with T = 0.8); scoring never divides
        self._answer_ids: dict[int, list[int]] = {}
        self._prompt_ids: dict[tuple, list[int]] = {}
        self._lora_layers = (None, [])  # (model, its LoRA layers): found once per model (run_decoder)
        self._scoring_view = (None, None)  # (decoder, its compiled view): scoring.compile (see _scoring_decoder)

    # ---- text -> tokens -------------------------------------------------------------------------
    @property
    def base(self):
        return self.model.get_base_model()

    def prompt_for(self, history) -> str:
        hist = list(history)[-self.prompt_cfg.max_history :]
        return history_prompt([self.titles[i] for i in hist], self.prompt_cfg.template, self.prompt_cfg.max_title_words,
                              self.prompt_cfg.get("item_separator"))

    def prompt_ids(self, history) -> list[int]:
        # a prompt depends only on the titles it shows: tokenise each distinct one once per process
        # (every epoch, the KL batches and scoring ask again for the same prompts)
        shown = tuple(history)[-self.prompt_cfg.max_history :]
        ids = self._prompt_ids.get(shown)
        if ids is None:
            ids = self.tok(self.prompt_for(shown), add_special_tokens=False).input_ids
            ids = self._prompt_ids[shown] = ids[-self.prompt_cfg.max_prompt_tokens :]  # safety net after the caps
        return ids

    def sample_length(self, sample: Sample) -> int:
        """Tokens of a training sample (prompt + answer): what length-grouped batching sorts by."""
        return len(self.prompt_ids(sample.history)) + len(self.answer_ids(sample.target))

    def answer_ids(self, item: int) -> list[int]:
        if item not in self._answer_ids:
            if self.answers is None:
                text = answer_text(self.titles[item], self.scoring_cfg.max_title_words)
                ids = self.tok(text, add_special_tokens=False).input_ids[: self.scoring_cfg.max_answer_tokens]
            else:  # identifiers made distinct by the vocabulary stay whole: a token cap could merge two of them
                ids = self.tok(self.answers[item], add_special_tokens=False).input_ids
            self._answer_ids[item] = ids + [self.tok.eos_token_id]
        return self._answer_ids[item]

    def collate(self, samples: list[Sample], width: int | None = None) -> dict:
        """Left-padded prompt+answer sequences; labels are -100 except on the answer tokens.

        `answer_row` / `answer_col` [M] locate the states that predict the answer tokens (column t predicts
        token t+1), in the order of a boolean mask over the labels: indices known on the host, so picking
        the answer states needs no device-to-host sync (a boolean mask's nonzero would, every step). `width`: pad
        to exactly that many columns (trainer.static_shapes: one shape a fit, for CUDA graphs)."""
        seqs, labels, answer_lens, rows, cols = [], [], [], [], []
        for s in samples:
            p, a = self.prompt_ids(s.history), self.answer_ids(s.target)
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
            answer_lens.append(len(a))
        needed, width = max(map(len, seqs)), width or max(map(len, seqs))
        if needed > width:
            raise ValueError(f"a batch {needed} tokens wide exceeds the fixed width {width}")
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        for b, answer in enumerate(answer_lens):  # left padding: a row's answer ends at the last column
            rows += [b] * answer
            cols += range(width - answer - 1, width - 1)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        label_t = torch.tensor([[-100] * (width - len(x)) + x for x in labels])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t,
                "user": torch.tensor([s.user for s in samples]),
                "answer_row": torch.tensor(rows, dtype=torch.long), "answer_col": torch.tensor(cols, dtype=torch.long)}

    def _left_pad(self, rows: list[list[int]]):
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    # ---- model passes ---------------------------------------------------------------------------
    def with_params(self, params: dict[str, torch.Tensor] | None, fn, *args, **kwargs):
        """Call `fn` as if `self.model`'s named parameters were `params` (e.g. a frozen anchor adapter).

        torch.func.functional_call swaps the tensors for the call only: no in-place copy, so tensors
        saved for the current step's backward pass stay valid.
        """
        if not params:
            return fn(*args, **kwargs)
        holder = _Holder(self.model, fn)
        return torch.func.functional_call(holder, {f"model.{k}": v for k, v in params.items()}, args, kwargs, strict=False)

    def _decode(self, input_ids, attention_mask, **kw):
        # no KV cache unless asked: building one copies every layer's keys and values, and under torch.compile
        # its per-layer state is a guard that recompiles each block until compilation gives up
        kw.setdefault("use_cache", False)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
        return self.run_decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kw)

    def run_decoder(self, decoder=None, **kw):
        """The decoder's forward pass, every caller's. Under autocast, peft's cast of each LoRA layer's input to
        the adapter's fp32 is switched off: autocast casts it straight back to bf16 for the LoRA matmuls, so the
        round trip is exact and only adds two activation-sized copies (and their backward) per adapted linear,
        ~23% of a scoring pass's GPU time on the H200 and ~840 kernel launches a training step. (In training the
        LoRA dropout then draws its mask on the bf16 tensor: the same distribution, not the same bits.) Without
        autocast the cast stays: a bf16 base and an fp32 adapter need it."""
        if self._lora_layers[0] is not self.model:
            self._lora_layers = (self.model, [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)])
        with no_lora_input_casts(self._lora_layers[1], active=torch.is_autocast_enabled(self.device.type)):
            return (self.base.get_decoder() if decoder is None else decoder)(**kw)

    def _scoring_decoder(self):
        """`scoring.compile`: the decoder the packed scoring pass runs, torch.compile'd (dynamic shapes) on first
        use: a compiled view of the same module and weights, so training and every other pass stay eager.
        Kept in a tuple: an nn.Module attribute would register the wrapper as a child (its parameters twice
        in the state dict)."""
        decoder = self.base.get_decoder()
        if not self.scoring_cfg.get("compile", False):
            return decoder
        if self._scoring_view[0] is not decoder:
            self._scoring_view = (decoder, torch.compile(decoder, dynamic=True))
        return self._scoring_view[1]

    def answer_logits(self, batch: dict) -> dict:
        """Logits at the positions that predict answer tokens: {"logits": [M, V], "targets": [M], "row": [M]}."""
        hidden = self._decode(batch["input_ids"], batch["attention_mask"]).last_hidden_state  # [B, L, H]
        if "answer_row" in batch:  # collate's host-side indices: no sync
            rows, cols = batch["answer_row"], batch["answer_col"]
            h, targets = hidden[rows, cols], batch["labels"][rows, cols + 1]
        else:  # a batch cut from other tensors (L_c's pool): the labels' mask
            shifted = batch["labels"][:, 1:]
            where = shifted != -100  # [B, L-1]
            h, targets = hidden[:, :-1][where], shifted[where]  # [M, H]
            rows = torch.arange(shifted.shape[0], device=shifted.device)[:, None].expand_as(shifted)[where]
        return {"logits": self.base.get_output_embeddings()(h).float(), "targets": targets, "row": rows}

    def compile_targets(self) -> list[torch.nn.Module]:
        """What `trainer.compile` compiles: the decoder's blocks, each on its own (they share one graph; the
        mask building and embedding around them stay eager), since the ranker calls the decoder itself."""
        decoder = self.base.get_decoder()
        blocks = getattr(decoder, "layers", None)
        return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else [decoder]

    def training_step(self, batch, batch_idx):
        out = self.answer_logits(batch)
        logits = out["logits"] if self.ce_temperature == 1.0 else out["logits"] / self.ce_temperature
        loss = F.cross_entropy(logits, out["targets"])  # L_e: NLL of the answer tokens
        logs = {"train/nll": loss.detach()}
        for term in self.loss_terms:
            for name, value in term(self, batch, out).items():
                loss = loss + value
                logs[f"train/{name}"] = value.detach()
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        # not fused=True: Lightning's mixed precision refuses gradient clipping with a fused optimiser
        # (on CUDA torch already batches the hundreds of LoRA tensors with its foreach kernels)
        opt = torch.optim.AdamW(params, lr=self.optim_cfg.lr, weight_decay=self.optim_cfg.weight_decay)
        if self.optim_cfg.get("scheduler", "constant") == "cosine":
            steps = max(1, self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def score_candidates(self, samples: list[Sample], candidates: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Scores [n, C] of each sample's candidate items (higher = more likely next)."""
        was_training = self.training
        self.eval()
        out = np.zeros(candidates.shape, dtype=np.float64)
        with self._fp32_scoring():
            for start in range(0, len(samples), batch_size):
                chunk = samples[start : start + batch_size]
                out[start : start + len(chunk)] = self._score_chunk(chunk, candidates[start : start + len(chunk)])
        self.train(was_training)
        return out

    @contextlib.contextmanager
    def _fp32_scoring(self):
        """`scoring.fp32`: the scoring passes in fp32 whatever the backbone's dtype. A bf16/fp16 base is upcast for
        them (exact) and cast back after (exact too: the same bits), autocast off; so the packed scores equal one
        fp32 pass per candidate (1e-5) on a GPU too. (bf16 autocast kept the ordered top-10 of 71-81% of users in
        a CPU measurement; `recsim.bench score bench.agreement=true` measures it on a GPU.)"""
        if not self.scoring_cfg.get("fp32", False):
            yield
            return
        low = [t for t in [*self.base.parameters(), *self.base.buffers()] if t.dtype in (torch.bfloat16, torch.float16)]
        dtypes = [t.dtype for t in low]
        for t in low:
            t.data = t.data.float()
        try:
            with torch.autocast(self.device.type, enabled=False):
                yield
        finally:
            for t, dtype in zip(low, dtypes):
                t.data = t.data.to(dtype)

    def _score_chunk(self, samples, cands: np.ndarray) -> np.ndarray:
        kernel = self.scoring_cfg.get("kernel", "packed")
        if kernel == "packed":
            return self._score_chunk_packed(samples, cands)
        if kernel == "kv_repeat":
            return self._score_chunk_kv_repeat(samples, cands)
        raise ValueError(f"scoring.kernel={kernel!r}: expected one of {', '.join(SCORING_KERNELS)}")

    def _packed_mask(self, seg: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] mask of packed sequences from their segment ids [B, L] (0 prompt, c+1 candidate c, -1 pad):
        the prompt is causal; a candidate sees the whole prompt and its own earlier tokens only."""
        L = seg.shape[1]
        idx = torch.arange(L, device=seg.device)
        q, k = seg[:, :, None], seg[:, None, :]
        allowed = (idx[:, None] >= idx[None, :]) & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)  # pad rows see themselves: an all-False row is NaN
        allowed = allowed[:, None]
        impl = getattr(self.base.config, "_attn_implementation", None) or "sdpa"
        if impl == "sdpa":  # torch SDPA: True = may attend; a bool mask is left alone by autocast
            return allowed
        if impl == "eager":  # eager attention adds the mask to the scores
            dtype = self.base.get_input_embeddings().weight.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        raise ValueError(f"scoring.kernel='packed' needs attention 'sdpa' or 'eager' (a custom 4D mask), "
                         f"not {impl!r}: use scoring.kernel=kv_repeat")

    def _score_chunk_packed(self, samples, cands: np.ndarray) -> np.ndarray:
        """One pass per user over prompt + cand_1 + ... + cand_C (right-padded), masked so candidates stay apart."""
        B, C = cands.shape
        prompts = [self.prompt_ids(s.history) for s in samples]
        answers = [[self.answer_ids(int(item)) for item in row] for row in cands]
        a_len = np.array([[len(a) for a in row] for row in answers])  # [B, C]
        p_len = np.array([len(p) for p in prompts])
        lengths = p_len + a_len.sum(1)
        width, dev = int(lengths.max()), self.device
        multiple = self._scoring_width_multiple()
        width = -(-width // multiple) * multiple  # padding columns are segment -1: no real token sees them
        ids = np.full((B, width), self.tok.pad_token_id, dtype=np.int64)
        seg = np.full((B, width), -1, dtype=np.int64)  # 0 prompt, c+1 candidate c, -1 padding
        pos = np.zeros((B, width), dtype=np.int64)
        for b in range(B):
            row = np.concatenate([prompts[b], *answers[b]])
            ids[b, : len(row)] = row
            seg[b, : lengths[b]] = np.repeat(np.arange(C + 1), np.concatenate([[p_len[b]], a_len[b]]))
            pos[b, : p_len[b]] = np.arange(p_len[b])
        # every candidate continues the prompt at positions P, P+1, ... as if it alone followed it
        start = p_len[:, None] + np.concatenate([np.zeros((B, 1), dtype=np.int64), a_len.cumsum(1)[:, :-1]], 1)
        # per answer token, in user-then-candidate order: its user, its offset inside its candidate, its column
        flat = a_len.ravel()
        tok_b = np.repeat(np.arange(B), a_len.sum(1))
        tok_off = np.arange(flat.sum()) - np.repeat(flat.cumsum() - flat, flat)
        tok_col = np.repeat(start.ravel(), flat) + tok_off
        pos[tok_b, tok_col] = np.repeat(p_len, a_len.sum(1)) + tok_off
        # token k of a candidate is predicted by the state before it; token 0 by the prompt's last token
        src = np.where(tok_off == 0, np.repeat(p_len - 1, a_len.sum(1)), tok_col - 1)
        to_dev = lambda x: torch.from_numpy(x).to(dev, non_blocking=True)
        input_ids, seg_t, positions = to_dev(ids), to_dev(seg), to_dev(pos)
        with self._scoring_autocast():
            hidden = self.run_decoder(self._scoring_decoder(), input_ids=input_ids,
                                      attention_mask=self._packed_mask(seg_t), position_ids=positions,
                                      use_cache=False).last_hidden_state
        h = hidden[to_dev(tok_b), to_dev(src)]  # [N, H]
        tgt = input_ids[to_dev(tok_b), to_dev(tok_col)]
        head = self.base.get_output_embeddings()
        if type(head) is torch.nn.Linear:  # fp32 logits under bf16 autocast too: a bf16 logit near 16 is off by 0.03
            head = lambda x, linear=head: fp32_logits(linear, x)
        token_lp = torch.empty(len(tgt), device=dev)
        rows = 2048  # bounds the [rows, V] fp32 logits block (400 MB at V = 49,152)
        with torch.autocast(dev.type, enabled=False):
            for r in range(0, len(tgt), rows):
                logits = head(h[r : r + rows]).float()
                token_lp[r : r + rows] = logits.gather(-1, tgt[r : r + rows, None])[:, 0] - logits.logsumexp(-1)
        # per-candidate sums in float64 (an fp32 sum of ~130 is only good to 1.5e-5): a candidate's tokens are
        # contiguous, so its sum is a difference of the cumulative sum at its ends (deterministic, on the device)
        lens = to_dev(flat)
        csum = torch.cat([token_lp.new_zeros(1, dtype=torch.float64), token_lp.double().cumsum(0)])
        ends = lens.cumsum(0)
        total = csum[ends] - csum[ends - lens]
        if self.scoring_cfg.normalize == "mean":
            total = total / lens.double()
        return total.view(B, C).cpu().numpy()

    def _scoring_width_multiple(self) -> int:
        """`scoring.pad_to_multiple_of` (auto: 64 on a GPU, 1 on CPU). On the H200 a batch of 256 users took ~1.1 s
        when its width was new and 0.67 s when it had been seen (attention plans and allocations are per shape),
        and packed widths differ in almost every batch; 64 leaves a handful of widths for ~5% more tokens."""
        value = self.scoring_cfg.get("pad_to_multiple_of", "auto")
        if value == "auto":
            return 64 if self.device.type == "cuda" else 1
        return int(value or 1)

    def _scoring_autocast(self):
        """`scoring.autocast`: bf16 autocast for the decoder's pass (auto: on a GPU). Off, an enclosing autocast
        (if any) still applies, a bf16 base runs in bf16 and the LoRA branch in the adapter's fp32; exact fp32
        scores: `scoring.fp32=true` (or backbone.dtype=float32), which turns autocast off."""
        mode = self.scoring_cfg.get("autocast", "auto")
        on = self.device.type == "cuda" if mode == "auto" else bool(mode)
        on = on and not self.scoring_cfg.get("fp32", False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def _score_chunk_kv_repeat(self, samples, cands: np.ndarray) -> np.ndarray:
        """The prompt once, its KV cache copied C times, then one pass over the C titles (the reference)."""
        B, C = cands.shape
        p_ids, p_mask = self._left_pad([self.prompt_ids(s.history) for s in samples])
        with self._scoring_autocast():
            first = self._decode(p_ids, p_mask, use_cache=True)
        cache = first.past_key_values if hasattr(first, "past_key_values") else first.cache
        cache.batch_repeat_interleave(C)  # share the prompt pass across the C candidates
        answers = [self.answer_ids(int(i)) for i in cands.reshape(-1)]
        width = max(map(len, answers))
        a_ids = torch.tensor([a + [self.tok.pad_token_id] * (width - len(a)) for a in answers], device=self.device)
        a_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=self.device)
        attn = torch.cat([p_mask.repeat_interleave(C, 0), a_mask], dim=1)
        positions = p_mask.sum(1).repeat_interleave(C)[:, None] + torch.arange(width, device=self.device)
        with self._scoring_autocast():
            second = self.run_decoder(input_ids=a_ids, attention_mask=attn, position_ids=positions, use_cache=False,
                                      **{_cache_kwarg(self.base.get_decoder()): cache})
        # token k of an answer is predicted by answer position k-1, token 0 by the prompt's last position
        h = torch.cat([first.last_hidden_state[:, -1:].repeat_interleave(C, 0), second.last_hidden_state[:, :-1]], 1)
        head = self.base.get_output_embeddings()
        token_lp = torch.zeros(a_ids.shape, device=self.device)
        rows = 256  # bounds the [rows, width, V] logits block on CPU
        for r in range(0, B * C, rows):
            logp = torch.log_softmax(head(h[r : r + rows]).float(), -1)
            token_lp[r : r + rows] = logp.gather(-1, a_ids[r : r + rows, :, None])[..., 0]
        token_lp = token_lp * a_mask
        total = token_lp.sum(1)
        if self.scoring_cfg.normalize == "mean":
            total = total / a_mask.sum(1)
        return total.view(B, C).double().cpu().numpy()

    @torch.no_grad()
    def generate_rankings(self, samples: list[Sample], candidates: np.ndarray, gen_cfg, seed: int,
                          batch_size: int = 8, generate: Callable | None = None) -> tuple[np.ndarray, dict]:
        """EvoRec's evaluation as its authors ran it: the prompt carries the candidates (in a seeded
        random order), the model greedily writes a `sep`-separated ranked list of titles, scored by exact
        match. Returns the positive's 0-based rank per sample (-1 when it is not in the list: every metric
        scores it 0) and counts of valid / invalid generated titles (invalid = not one of the candidates).

        Candidate titles equal after the cut to `max_title_words` are told apart by
        :func:`~recsim.models.prompts.distinct_titles` (more words, else a " (2)" suffix), so every shown
        title names one item. `generate(input_ids, attention_mask, max_new_tokens)` -> [B, L + new] ids
        replaces the model's own greedy `generate` (LSAT's two-adapter ensemble)."""
        was_training = self.training
        self.eval()
        C = candidates.shape[1]
        if generate is None:
            generate = lambda ids, mask, n: self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                                                do_sample=False, pad_token_id=self.tok.pad_token_id)
        lists = []
        stats = {"generated": 0, "invalid": 0, "empty_lists": 0}
        for start in range(0, len(samples), batch_size):
            chunk, cands = samples[start : start + batch_size], candidates[start : start + batch_size]
            prompts, shown = [], []
            for s, row in zip(chunk, cands):
                order = np.random.default_rng([seed, s.user, max(s.position, 0)]).permutation(C)
                titles = distinct_titles([self.titles[int(row[i])] for i in order], gen_cfg.max_title_words)
                shown.append({t: int(row[i]) for t, i in zip(titles, order)})
                hist = [self.titles[i] for i in list(s.history)[-self.prompt_cfg.max_history :]]
                prompts.append(candidate_list_prompt(hist, titles, gen_cfg.list_length, gen_cfg.separator,
                                                     max_title_words=self.prompt_cfg.max_title_words))
            ids, mask = self._left_pad([self.tok(p, add_special_tokens=False).input_ids for p in prompts])
            out = generate(ids, mask, gen_cfg.max_new_tokens)
            for i, title_to_item in enumerate(shown):
                text = self.tok.decode(out[i, ids.shape[1] :], skip_special_tokens=True)
                ranked = parse_ranked_list(text, gen_cfg.separator)[: gen_cfg.list_length]
                valid = [title_to_item[t] for t in ranked if t in title_to_item]
                stats["generated"] += len(ranked)
                stats["invalid"] += len(ranked) - len(valid)
                stats["empty_lists"] += not valid
                lists.append(valid)
        self.train(was_training)
        return ranks_from_lists(lists, [s.target for s in samples]), stats

    def _step(self, input_ids, attention_mask, positions, cache=None):
        """One decoder pass with the active adapter: (log-probs of the next token [B, V], the updated cache)."""
        kw = {_cache_kwarg(self.base.get_decoder()): cache} if cache is not None else {}
        out = self.run_decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               use_cache=True, **kw)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        logits = self.base.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
        return torch.log_softmax(logits, -1), cache

    @torch.no_grad()
    def ensemble_generate(self, input_ids, attention_mask, max_new_tokens: int, weights: dict[str, float]):
        """Greedy decoding on Σ_a w_a · log p_a(next token), one KV cache per adapter a (LSAT-EN in generation).

        `weights`: {adapter name: weight}; each adapter runs with `set_adapter`, the active one is restored.
        Like `generate(do_sample=False)`, a row that wrote EOS is padded with `pad_token_id` afterwards, and
        decoding stops once every row has. Returns [B, L + new] token ids.
        """
        if max_new_tokens < 1:
            return input_ids
        active = self.model.active_adapter
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        mask = attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        caches, logp = {}, None
        try:
            for name, w in weights.items():
                self.model.set_adapter(name)
                lp, caches[name] = self._step(input_ids, mask, positions)
                logp = w * lp if logp is None else logp + w * lp
            tokens, done = [], torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
            next_pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logp.argmax(-1))  # [B]
                tokens.append(nxt)
                done = done | (nxt == eos)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logp = None
                for name, w in weights.items():
                    self.model.set_adapter(name)
                    lp, caches[name] = self._step(nxt[:, None], mask, next_pos, caches[name])
                    logp = w * lp if logp is None else logp + w * lp
                next_pos = next_pos + 1
        finally:
            self.model.set_adapter(active)
        return torch.cat([input_ids, torch.stack(tokens, 1)], dim=1)

    @torch.no_grad()
    def layer_states(self, histories: list, pooling: str = "last", batch_size: int = 8) -> torch.Tensor:
        """Per-layer prompt representation [num_layers, n, H] (EvoRec's Locate, L2D's memory).

        pooling="last": the last prompt token (the state that would produce the answer);
        pooling="mean": mean over the prompt's real tokens (padding excluded).

        The state of layer l is its decoder block's output, taken by a forward hook: `hidden_states[-1]`
        of transformers 5 is the final-normed state, on another scale than the other layers' outputs.
        """
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling={pooling!r}: expected 'last' or 'mean'")
        was_training = self.training
        self.eval()
        outputs: list[torch.Tensor] = []  # block outputs of the current pass, in layer order
        collect = lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        hooks = [layer.register_forward_hook(collect) for layer in self.base.get_decoder().layers]
        chunks = []
        try:
            for start in range(0, len(histories), batch_size):
                ids, mask = self._left_pad([self.prompt_ids(h) for h in histories[start : start + batch_size]])
                outputs.clear()
                self._decode(ids, mask)
                stacked = torch.stack(outputs)  # [layers, B, L, H]
                if pooling == "last":
                    chunks.append(stacked[:, :, -1].float())
                else:
                    m = mask[None, :, :, None].to(stacked.dtype)
                    chunks.append(((stacked * m).sum(2) / m.sum(2)).float())
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        return torch.cat(chunks, dim=1)
