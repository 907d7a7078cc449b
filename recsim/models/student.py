"""The distillation student (`backbone.kind: student`): RecLLM-Adapter's recommendation adapter, preference
aggregator and ranking head, plus a small explanation decoder. The seed (../shared/papers/README.md §4) describes
the parts and gives 8 heads, d = 256 and the loss; no reference code exists, so every other choice is recsim's,
stated here and exposed in conf/backbone/student.yaml.

The recommender, for a left-padded history h_1..h_L (newest last, padding 0):

    behaviour    b_l = E_id[h_l] + E_pos[L - l]                 (learned item ids; positions counted from the newest,
                                                                  so extra left padding changes nothing)
    metadata     m_l = W_m z_{h_l}                               (z: frozen MiniLM title embedding, projected to d)
    adapter      a_l = LN(b_l + MHA(Q = b, K = m, V = m)_l),  r_l = LN(a_l + FFN(a_l))
                 cross-attention with the behaviour sequence as queries over the metadata of the same interactions
                 (8 heads, d = 256); padded keys are masked
    aggregator   α = softmax_l(w^T tanh(W r_l + c)) over the real positions,  u = Σ_l α_l r_l
                 (the seed weights interactions by behaviour signals such as dwell time or rating; recsim's data has
                 none, so the weights are learned attention over the interactions)
    ranking head s(u, i) = u · v_i,  v_i = E_id[i] + W_m z_i    (a dot product with the item's id + metadata vector;
                 no MLP, so the whole catalogue is one matrix product and `score_all` is cheap)

The explanation decoder is a few-layer LlamaForCausalLM built from a config (random init, `decoder.*` widths) over
the teacher's tokenizer (`decoder.tokenizer`, SmolLM2's by default: the tokenizer of tiny_llama and smollm2_135m;
method=distill refuses a teacher whose tokenizer does not contain it). It is conditioned on two prefix embeddings,
[P_u, P_i] = [W_u u, W_i v_i], followed by the explanation's tokens; L_gen is the cross-entropy of those tokens
(EOS included) given the prefix, and its gradient reaches u and v_i (one multi-task model, as the seed's joint loss).

Training (`StudentModule.training_step`), the seed's loss with every weight in method=distill's config:

    L = w_rec · L_rec + w_gen · L_gen + w_kl · KL(p_teacher ‖ p_student)
    L_rec = mean over the negatives of -log σ(s⁺ - s⁻)                           (BPR)
    p = softmax(scores / T) over a sample's candidate list (positive + negatives); KL ×T² only with `t_squared`

With distillation targets (`set_distillation`: each training sample's candidate list, the teacher's scores on it and
the teacher's explanation of the target), BPR uses that list's negatives. Without (the student under another
method), BPR draws `backbone.negatives` uniform negatives per positive at every step, and only L_rec trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from recsim.models.llm_ranker import _cache_kwarg
from recsim.models.sequential import collate_samples
from recsim.protocols.base import EncodedData, Sample

ENCODERS = ("minilm",)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "student_meta.json"


# ---------------------------------------------------------------------------------------------- losses


def bpr_loss(positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean over samples and negatives of -log σ(s⁺ - s⁻): positive [B], negatives [B, M]."""
    return F.softplus(negatives - positive[:, None]).mean()  # -log σ(x) = softplus(-x)


def distillation_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float,
                    t_squared: bool = False) -> torch.Tensor:
    """KL(p_teacher ‖ p_student), p = softmax(scores / T) over each row's candidates [B, C], averaged over rows;
    ×T² with `t_squared` (Hinton et al.'s scaling, which keeps the soft gradients' size as T changes)."""
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    # kl_div(input = log q, target = log p) = Σ p (log p - log q); batchmean divides by the rows
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2 if t_squared else kl


@dataclass(frozen=True)
class DistillLoss:
    """The weights of L = rec · L_rec + gen · L_gen + kl · KL and the KL's temperature (method=distill's config)."""

    rec: float = 1.0
    gen: float = 0.3
    kl: float = 0.5
    temperature: float = 0.8
    t_squared: bool = False

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight · term over the terms present (a batch without teacher text has no `gen`)."""
        return sum(getattr(self, name) * value for name, value in terms.items())


@dataclass
class SoftTargets:
    """What the teacher says about a list of training samples, row by row: each sample's candidates (column 0 its
    target), the teacher's scores on them, and its explanation of the target (None: not explained)."""

    candidates: np.ndarray  # [n, C] int64
    teacher_scores: np.ndarray  # [n, C] float
    explanations: list[str | None]


def sample_key(sample: Sample) -> tuple[int, int, int]:
    return sample.user, sample.position, sample.target


# ---------------------------------------------------------------------------------------------- the model


class RecommendationAdapter(nn.Module):
    """Cross-attention of the behaviour sequence (queries) over the item-metadata embeddings of the same
    interactions (keys and values), then a feed-forward block; both post-norm residuals."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_attention, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, behaviour: torch.Tensor, metadata: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """behaviour, metadata [B, L, d]; padding [B, L] (True: no item) -> [B, L, d]."""
        attended, _ = self.attention(behaviour, metadata, metadata, key_padding_mask=padding, need_weights=False)
        a = self.norm_attention(behaviour + self.dropout(attended))
        return self.norm_ffn(a + self.dropout(self.ffn(a)))


class PreferenceAggregator(nn.Module):
    """u = Σ_l α_l r_l with α = softmax over the real positions of w^T tanh(W r_l + c)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Linear(dim, dim)
        self.weight = nn.Linear(dim, 1, bias=False)

    def forward(self, states: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        logits = self.weight(torch.tanh(self.project(states))).squeeze(-1)  # [B, L]
        alpha = logits.masked_fill(padding, float("-inf")).softmax(-1)  # [B, L]
        return torch.einsum("bl,bld->bd", alpha, states)  # [B, d]


class StudentNet(nn.Module):
    """Adapter + aggregator + dot-product ranking head over `text` [N + 1, e] (row 0 padding; frozen, not saved)."""

    def __init__(self, text: torch.Tensor, dim: int = 256, heads: int = 8, ffn: int = 512, dropout: float = 0.1,
                 max_len: int = 20):
        super().__init__()
        if text.ndim != 2 or len(text) < 2:
            raise ValueError(f"item text embeddings must be [N + 1, e] (row 0 padding), got {tuple(text.shape)}")
        if dim % heads:
            raise ValueError(f"backbone.heads={heads} must divide backbone.dim={dim}")
        self.num_items, self.dim, self.max_len = text.shape[0] - 1, dim, max_len
        frozen = text.detach().float().clone()
        frozen[0] = 0
        self.register_buffer("text", frozen, persistent=False)  # z_i: rebuilt from the embedding cache
        self.metadata = nn.Linear(frozen.shape[1], dim)  # W_m
        self.item_id = nn.Embedding(self.num_items + 1, dim, padding_idx=0)  # E_id
        self.position = nn.Embedding(max_len, dim)  # E_pos, 0 = the newest item
        nn.init.normal_(self.item_id.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        with torch.no_grad():
            self.item_id.weight[0].zero_()
        self.adapter = RecommendationAdapter(dim, heads, ffn, dropout)
        self.aggregator = PreferenceAggregator(dim)
        self.dropout = nn.Dropout(dropout)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """v_i = E_id[i] + W_m z_i: [..., d]."""
        return self.item_id(items) + self.metadata(self.text[items])

    def user_vector(self, history: torch.Tensor) -> torch.Tensor:
        """u [B, d] of left-padded histories [B, L] (L <= max_len)."""
        if history.shape[1] > self.max_len:
            raise ValueError(f"a history of {history.shape[1]} columns exceeds backbone.max_len={self.max_len}")
        padding = history == 0  # [B, L]
        padding = padding & ~padding.all(1, keepdim=True)  # an empty history (never a protocol's) attends to padding
        newest_first = torch.arange(history.shape[1] - 1, -1, -1, device=history.device)  # [L]
        behaviour = self.dropout(self.item_id(history) + self.position(newest_first))  # b: [B, L, d]
        metadata = self.dropout(self.metadata(self.text[history]))  # m: [B, L, d]
        return self.aggregator(self.adapter(behaviour, metadata, padding), padding)

    def score(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """s(u, i) [B, C] of candidates [B, C] (item 0: -inf)."""
        scores = torch.einsum("bd,bcd->bc", self.user_vector(history), self.item_vectors(items))
        return scores.masked_fill(items == 0, float("-inf"))

    def score_all(self, history: torch.Tensor) -> torch.Tensor:
        """s(u, i) for every item [B, N + 1] (column 0 -inf)."""
        table = self.item_vectors(torch.arange(self.num_items + 1, device=history.device))
        scores = self.user_vector(history) @ table.T
        scores[:, 0] = float("-inf")
        return scores


class ExplanationDecoder(nn.Module):
    """A small LlamaForCausalLM (random init) writing an explanation after the prefix [W_u u, W_i v_i]."""

    PREFIX = 2  # prefix embeddings: the user, the item

    def __init__(self, dim: int, vocab_size: int, pad_id: int, eos_id: int, hidden: int = 128, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, intermediate: int = 256, max_positions: int = 256):
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=pad_id,
                             eos_token_id=eos_id, bos_token_id=None)
        self.lm = LlamaForCausalLM(config)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.user_prefix, self.item_prefix = nn.Linear(dim, hidden), nn.Linear(dim, hidden)

    def prefix(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.user_prefix(user), self.item_prefix(item)], dim=1)  # [B, 2, H]

    def loss(self, user: torch.Tensor, item: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean CE per token of right-padded `text` [B, T] (mask [B, T]) after the prefix of (user, item) [B, d]."""
        embeds = torch.cat([self.prefix(user, item), self.lm.get_input_embeddings()(text)], dim=1)  # [B, 2 + T, H]
        attention = torch.cat([mask.new_ones(len(text), self.PREFIX), mask], dim=1)
        labels = torch.cat([text.new_full((len(text), self.PREFIX), -100), text.masked_fill(mask == 0, -100)], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss  # position t predicts t + 1

    @torch.no_grad()
    def generate(self, user: torch.Tensor, item: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of the prefix with a KV cache, each row cut before its first EOS (a finished row
        is fed padding until every row has finished). Every prefix has the same length: no padding, no mask."""
        out = self.lm(inputs_embeds=self.prefix(user, item), use_cache=True, logits_to_keep=1)
        done = torch.zeros(len(user), dtype=torch.bool, device=user.device)
        tokens = []
        for step in range(int(max_new_tokens)):
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, self.pad_id)  # [B]
            tokens.append(nxt)
            done = done | (nxt == self.eos_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
            out = self.lm(input_ids=nxt[:, None], use_cache=True, **{_cache_kwarg(self.lm): cache})
        rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(len(user))]
        return [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]


class StudentModule(L.LightningModule):
    """Trains the ranking model and the decoder with the combined loss (module docstring)."""

    def __init__(self, net: StudentNet, decoder: ExplanationDecoder, lr: float = 1e-3, weight_decay: float = 0.0,
                 negatives: int = 29):
        super().__init__()
        self.net, self.decoder = net, decoder
        self.lr, self.weight_decay, self.negatives = lr, weight_decay, int(negatives)
        self.loss = DistillLoss()
        self.generator = torch.Generator().manual_seed(0)

    def on_train_start(self) -> None:
        # the plain-BPR negatives follow the global RNG, which the runner seeds per stage
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))

    def sample_negatives(self, target: torch.Tensor) -> torch.Tensor:
        """`negatives` items per target [B, M], uniform over 1..N without the target."""
        n = self.net.num_items
        draw = torch.randint(1, n, (len(target), self.negatives), generator=self.generator).to(target.device)
        return draw + (draw >= target[:, None]).long()

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """The raw terms present in the batch: rec always, kl with teacher scores, gen with teacher text."""
        history, target = batch["history"], batch["target"]
        items = batch.get("candidates")
        if items is None:
            items = torch.cat([target[:, None], self.sample_negatives(target)], dim=1)  # [B, 1 + M]
        user = self.net.user_vector(history)  # [B, d]
        scores = torch.einsum("bd,bcd->bc", user, self.net.item_vectors(items))  # [B, C]
        terms = {"rec": bpr_loss(scores[:, 0], scores[:, 1:])}
        if "teacher" in batch:
            terms["kl"] = distillation_kl(batch["teacher"], scores, self.loss.temperature, self.loss.t_squared)
        rows = batch.get("has_text")
        if rows is not None and bool(rows.any()):
            terms["gen"] = self.decoder.loss(user[rows], self.net.item_vectors(target[rows]), batch["text"][rows],
                                             batch["text_mask"][rows])
        return terms

    def training_step(self, batch, batch_idx):
        terms = self.loss_terms(batch)
        loss = self.loss.combine(terms)
        logs = {f"train/{name}": value.detach() for name, value in terms.items()}
        logs.update({f"train/{name}_weighted": getattr(self.loss, name) * value.detach() for name, value in terms.items()})
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=self.weight_decay)


# ---------------------------------------------------------------------------------------------- the recommender


def text_embeddings(cfg, titles: list[str]) -> torch.Tensor:
    """MiniLM title embeddings [N + 1, 384] through recsim.items' cached item embeddings."""
    from recsim.items.vocab import item_embeddings

    encoder = cfg.backbone.encoder
    if encoder not in ENCODERS:
        raise ValueError(f"backbone.encoder={encoder!r}: expected one of {', '.join(ENCODERS)}")
    view = OmegaConf.create({"item_id": {"encoder": encoder}, "backbone": {"name": cfg.backbone.name}})
    return torch.from_numpy(item_embeddings(view, titles, Path(cfg.paths.cache_dir)))


def model_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied weights once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class StudentRecommender:
    """The student behind the interface the runner and the methods see (recsim.models.recommender): candidate
    scoring, full ranking, save/load; plus `explain` and the distillation targets method=distill hands it.
    `text` injects title embeddings [N + 1, e] (tests); by default they are MiniLM's. `tokenizer` likewise."""

    kind = "student"
    can_rank_all = True

    def __init__(self, cfg, data: EncodedData, cache_dir: str | Path, seed: int, text: torch.Tensor | None = None,
                 tokenizer=None):
        from recsim.backbones.llm import load_tokenizer

        bb, dec = cfg.backbone, cfg.backbone.decoder
        self.cfg, self.num_items = cfg, data.num_items
        self.tokenizer = load_tokenizer(dec.tokenizer, cache_dir) if tokenizer is None else tokenizer
        text = text_embeddings(cfg, data.titles) if text is None else text
        if text.shape[0] != data.num_items + 1:
            raise ValueError(f"title embeddings have {text.shape[0]} rows for {data.num_items} items + padding")
        with torch.random.fork_rng():
            torch.manual_seed(bb.seed if bb.get("seed") is not None else seed)
            net = StudentNet(text, dim=bb.dim, heads=bb.heads, ffn=bb.ffn, dropout=bb.dropout, max_len=bb.max_len)
            decoder = ExplanationDecoder(bb.dim, len(self.tokenizer), self.tokenizer.pad_token_id,
                                         self.tokenizer.eos_token_id, hidden=dec.hidden, layers=dec.layers,
                                         heads=dec.heads, kv_heads=dec.kv_heads, intermediate=dec.intermediate,
                                         max_positions=dec.max_positions)
        self.module = StudentModule(net, decoder, lr=bb.lr, weight_decay=bb.weight_decay, negatives=bb.negatives)
        self.initial = {k: v.clone() for k, v in self.module.state_dict().items()}
        self._targets: dict[tuple, tuple[np.ndarray, np.ndarray, list[int] | None]] = {}

    # ---- what the runner calls ----------------------------------------------------------------
    @property
    def history_shown(self) -> int:
        return int(self.cfg.backbone.max_len)

    def schedule(self, stage_index: int, validated: bool = True):
        """(optimiser settings, batch size): the backbone's, at every stage (no early stopping)."""
        bb = self.cfg.backbone
        return OmegaConf.create({"lr": bb.lr, "epochs": bb.epochs, "max_steps": None}), bb.batch_size

    def set_optim(self, optim) -> None:
        self.module.lr = optim["lr"]

    def set_trainable(self, layers=None, adapter=None) -> int:
        for p in self.module.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in self.module.parameters())

    def reset_to_initial(self) -> None:
        self.module.load_state_dict(self.initial)

    def add_loss_term(self, term) -> None:
        raise ValueError("this method adds loss terms to an LLM; the student (backbone.kind=student) is not one")

    def clear_loss_terms(self) -> None:
        pass

    def tracked_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    # ---- distillation targets ----------------------------------------------------------------
    def set_distillation(self, samples: list[Sample], targets: SoftTargets, loss: DistillLoss) -> None:
        """Train `samples` on `targets` (row i belongs to samples[i]) with the weights of `loss`. Explanations are
        tokenised once here: each cut to its first `decoder.max_text_tokens` - 1 tokens, EOS appended."""
        if not (len(samples) == len(targets.candidates) == len(targets.teacher_scores) == len(targets.explanations)):
            raise ValueError(f"{len(samples)} samples but {len(targets.candidates)} rows of distillation targets")
        cap = int(self.cfg.backbone.decoder.max_text_tokens) - 1
        self._targets = {}
        for s, cands, scores, text in zip(samples, targets.candidates, targets.teacher_scores, targets.explanations):
            if int(cands[0]) != s.target:
                raise ValueError(f"distillation candidates of user {s.user} at {s.position}: column 0 must be the "
                                 f"target {s.target}, got {int(cands[0])}")
            ids = None
            if text is not None:
                ids = self.tokenizer(text, add_special_tokens=False).input_ids[:cap] + [self.tokenizer.eos_token_id]
            self._targets[sample_key(s)] = (np.asarray(cands, dtype=np.int64), np.asarray(scores, np.float32), ids)
        self.module.loss = loss

    def clear_distillation(self) -> None:
        self._targets = {}
        self.module.loss = DistillLoss()

    def collate(self, samples: list[Sample]) -> dict:
        """collate_samples' batch, plus with distillation targets: candidates [B, C], teacher [B, C], and the
        explanations right-padded as text [B, T] / text_mask [B, T] with has_text [B]."""
        batch = collate_samples(samples, self.cfg.backbone.max_len)
        found = [self._targets.get(sample_key(s)) for s in samples]
        if not any(f is not None for f in found):
            return batch
        if not all(f is not None for f in found):
            raise ValueError("a batch mixes samples with and without distillation targets: set_distillation must "
                             "cover every sample the fit trains on")
        batch["candidates"] = torch.from_numpy(np.stack([f[0] for f in found]))
        batch["teacher"] = torch.from_numpy(np.stack([f[1] for f in found]))
        texts = [f[2] or [] for f in found]
        width = max(1, max(map(len, texts)))
        pad = self.tokenizer.pad_token_id
        batch["text"] = torch.tensor([t + [pad] * (width - len(t)) for t in texts], dtype=torch.long)
        batch["text_mask"] = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts], dtype=torch.long)
        batch["has_text"] = torch.tensor([bool(t) for t in texts])
        return batch

    # ---- inference ---------------------------------------------------------------------------
    def _eval(self, fn):
        module = self.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            module.train(was_training)

    def _histories(self, samples: list[Sample]) -> torch.Tensor:
        return collate_samples(samples, self.cfg.backbone.max_len)["history"].to(self.module.device)

    def score_candidates(self, samples: list[Sample], candidates: np.ndarray, batch_size: int) -> np.ndarray:
        """Scores [n, C] (float64) of each sample's candidates, `batch_size` samples a pass."""
        out = np.zeros(np.shape(candidates), dtype=np.float64)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            items = torch.as_tensor(np.asarray(candidates[start : start + len(chunk)]), device=self.module.device)
            out[start : start + len(chunk)] = self._eval(lambda: self.module.net.score(self._histories(chunk), items)
                                                         .double().cpu().numpy())
        return out

    def score_all(self, samples: list[Sample]) -> np.ndarray:
        return self._eval(lambda: self.module.net.score_all(self._histories(samples)).double().cpu().numpy())

    def explain(self, samples: list[Sample], items: list[int], max_new_tokens: int, batch_size: int = 64) -> list[str]:
        """The decoder's greedy explanation of items[i] for samples[i] (the user's history), as text."""
        if len(samples) != len(items):
            raise ValueError(f"explain: {len(samples)} samples but {len(items)} items")
        texts = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            chosen = torch.as_tensor([int(i) for i in items[start : start + len(chunk)]], device=self.module.device)

            def write():
                net = self.module.net
                return self.module.decoder.generate(net.user_vector(self._histories(chunk)), net.item_vectors(chosen),
                                                    max_new_tokens)

            texts += [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self._eval(write)]
        return texts

    # ---- stage folders -----------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """safetensors (no pickle) and what the load checks: the catalogue and tokenizer sizes."""
        import safetensors.torch

        safetensors.torch.save_model(self.module, str(folder / WEIGHTS_FILE))  # the tied decoder head once
        meta = {"backbone": self.cfg.backbone.name, "num_items": self.num_items, "vocab_size": len(self.tokenizer)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))

    def load(self, folder: Path) -> None:
        import safetensors.torch

        path, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
        if not path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: a student stage holds {WEIGHTS_FILE} and {META_FILE}; delete the "
                                    "folder to recompute that stage")
        meta = json.loads(meta_path.read_text())
        mine = {"num_items": self.num_items, "vocab_size": len(self.tokenizer)}
        if any(meta.get(k) != v for k, v in mine.items()):
            raise RuntimeError(f"{folder}: saved for {meta}, this student has {mine}")
        safetensors.torch.load_model(self.module, str(path), device=str(self.module.device))

