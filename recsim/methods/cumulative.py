"""Cumulative LoRA: every stage adds a LoRA adapter, earlier ones are frozen, inference sums all of them.
The baselines of PESO (Yoo et al., "Continual Low-Rank Adapters for LLM-based Generative Recommender
Systems", ../shared/papers/README.md §2): SumLoRA, SD-LoRA (Wu et al., ICLR 2025) and InfLoRA (Liang & Li, CVPR 2024).

Common to all three (stage t ≥ 1; stage 0 trains "default" like every method, shared with them):
    add adapter stage{t}; freeze every earlier adapter; activate all of them: W = W0 + Σ_k ΔW_k
    train stage{t} (SD-LoRA: and the magnitudes) on the variant's data
Every decoder (candidate scoring, generation, beam search) then decodes with the sum, since every adapter is
active in the model. New adapters are LoRA only (recsim.backbones.adapters): item-token rows and embedding
copies, where the item vocabulary trains them, stay "default"'s and are frozen after stage 0.

`method.variant` (recsim's reading; PESO names the four variants but does not define them precisely):
  all / latest: the new adapter trains on every target up to stage t (stage.cumulative_targets, like retrain)
    or on stage t's new targets only (stage.new_targets);
  *_inherit: the new adapter starts from the previous one instead of a fresh LoRA init. A full copy keeps the
    frozen previous adapter in the sum, so the model at the stage's start would count ΔW_{t-1} twice
    (W0 + … + 2 ΔW_{t-1}): a jump the training first has to undo; and every function-preserving way to copy
    both matrices amounts to dropping the previous adapter from the sum (a single evolving LoRA). So
    `inherit_init: increment` (default) copies A (the previous adapter's input subspace) and starts B at 0:
    the model is unchanged at the stage's start, and since A and the function are the previous adapter's, the
    first gradient step on B_t is the one the previous adapter's B would take: the new adapter continues the
    previous one's learning, as an increment. `inherit_init: copy` is the literal reading (A and B copied,
    ΔW_{t-1} counted twice at the start).

SumLoRA, `method.form`:
  plain:      W = W0 + Σ_k (α/r) B_k A_k (the paper's sum);
  directions: the PESO authors' code: an adapter, once frozen, enters as (α/r) (B_k/‖B_k‖_F)(A_k/‖A_k‖_F) per
              module (its A and B rescaled once when it is frozen, at the start of the next stage).
SD-LoRA: W = W0 + Σ_{k<t} α_k (B_k A_k)/‖B_k A_k‖_F + ΔW_t, per module; frozen directions, learnable α_k.
  When adapter k is frozen, its B is divided by ‖B_k A_k‖_F and its peft `scaling` becomes a learnable 0-dim
  α_k = ‖B_k A_k‖_F · α/r (function unchanged); the α's are parameters of `rec.module.sdlora_magnitudes`, so the
  optimiser trains them (with the update's weight decay). The current adapter trains as a plain LoRA: its
  magnitude is ‖B_t A_t‖ itself (the same function class as α_t·direction), and it is split into direction and
  α_t when the next stage freezes it. Saved peft files hold the normalised B; the α's are in the method state.
InfLoRA (A = peft's lora_A, the down-projection; the paper calls the designed matrix B):
  stage t: for every LoRA module collect its inputs x on a seeded subsample (`input_samples`) of the stage's
    training samples (real tokens only, dropout off), C = Σ x xᵀ; Q = an orthonormal basis of the complement
    of the memory M (earlier stages' input subspace); A_t = the top-r eigenvectors of Qᵀ C Q mapped back by Q
    (= the top-r left singular vectors of the projected inputs (I − M Mᵀ) X), rows orthonormal, frozen;
    B_t = 0, trained. Fewer than r complement directions left: the missing rows of A_t are 0.
  after stage t: extend M with GPM's rule (DualGPM's base rule): with the stage's inputs collected again on the
    trained model, add the fewest top eigenvectors of the residual Qᵀ C Q for which
    tr(Mᵀ C M) + Σ_{i≤k} λ_i ≥ `threshold` · tr(C). (DualGPM's switch to storing the complement once M
    exceeds half the dimension saves memory only; not implemented.)
  Stage 0 ("default", a plain LoRA) enters M at the start of stage 1 from stage 0's training samples: the model
    is then exactly the one after stage 0, so this equals collecting them right after stage 0, and it works
    when stage 0 was shared from another method's run. `variant`: all | latest (no inherit: A is designed).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from recsim.backbones.adapters import Adapters
from recsim.methods.base import ContinualMethod, register
from recsim.protocols.base import make_samples

log = logging.getLogger(__name__)
VARIANTS = {"all": ("all", False), "latest": ("latest", False),  # variant -> (data, inherit)
            "all_inherit": ("all", True), "latest_inherit": ("latest", True)}
INHERIT_INIT = ("increment", "copy")
FORMS = ("plain", "directions")


def adapter_name(stage_index: int) -> str:
    return "default" if stage_index == 0 else f"stage{stage_index}"


def lora_layers(model) -> dict[str, LoraLayer]:
    """peft's LoRA layers by module name, in the model's order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


class CumulativeLoRA(ContinualMethod):
    variants = tuple(VARIANTS)

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        if getattr(rec, "kind", None) != "llm":
            raise ValueError(f"method={self.name} needs an LLM backbone (backbone.kind=llm)")
        if self.cfg.variant not in self.variants:
            raise ValueError(f"method.variant={self.cfg.variant!r}: expected one of {list(self.variants)}")
        if self.inherit and self.cfg.inherit_init not in INHERIT_INIT:
            raise ValueError(f"method.inherit_init={self.cfg.inherit_init!r}: expected one of {list(INHERIT_INIT)}")
        self.adapters = Adapters(rec.model)
        self.layers = lora_layers(rec.model)
        self.stack = ["default"]  # the adapters in the sum, oldest first

    @property
    def data(self) -> str:
        return VARIANTS[self.cfg.variant][0]

    @property
    def inherit(self) -> bool:
        return VARIANTS[self.cfg.variant][1]

    def training_samples(self, stage, rec):
        if stage.index == 0:
            return super().training_samples(stage, rec)
        targets = stage.cumulative_targets if self.data == "all" else stage.new_targets
        return make_samples(stage.sequences, targets, self.protocol.window)

    def before_update(self, stage, rec, samples):
        if stage.index == 0:
            return super().before_update(stage, rec, samples)
        name, previous = adapter_name(stage.index), self.stack[-1]
        self.prepare(stage, rec, samples)
        self.adapters.add(name, seed=self.cfg.seed * 1000 + stage.index)
        if self.inherit:
            self.adapters.copy(previous, name)
            if self.cfg.inherit_init == "increment":
                with torch.no_grad():
                    for layer in self.layers.values():
                        layer.lora_B[name].weight.zero_()
        self.init_adapter(rec, name)
        self.on_freeze(rec, previous)  # after the copy: an inherited adapter starts from the trained one
        self.stack.append(name)
        self.adapters.activate(*self.stack)  # W = W0 + Σ_k ΔW_k
        self.adapters.trainable(name)  # every other parameter frozen
        self.also_train(rec, name)

    def after_update(self, stage, rec):
        super().after_update(stage, rec)
        if stage.index > 0:  # stage 0 is every method's (shared): its figures must not depend on who trained it
            self.report.update({"adapter_bytes": self.stored_bytes(), "adapters": len(self.stack)})

    # ---- what each method changes --------------------------------------------------------------
    def prepare(self, stage, rec, samples) -> None:
        """Before the new adapter exists (InfLoRA collects inputs on the model as it is)."""

    def init_adapter(self, rec, name: str) -> None:
        """The new adapter's initial weights, after the fresh init or the inherited copy."""

    def on_freeze(self, rec, name: str) -> None:
        """`name` stops training for good: reshape how it enters the sum (the model may change)."""

    def also_train(self, rec, name: str) -> None:
        """requires_grad changes on top of "only the new adapter trains"."""

    def stored_bytes(self) -> int:
        return self.adapters.bytes(self.stack)

    # ---- inference -----------------------------------------------------------------------------
    def score_candidates(self, rec, samples, candidates, batch_size):
        # every adapter is active in the model, so the plain scoring is the method's. Overridden all the same: the
        # runner's KL(before ‖ after) anchors on the previous stage's "lora_" tensors only, which lack the new
        # adapter (and SD-LoRA's magnitudes), so it would not describe this update; the runner skips it for a
        # method with its own scoring.
        return rec.score_candidates(samples, candidates, batch_size)

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"adapters": list(self.stack)}

    def load_state_dict(self, state: dict) -> None:
        """Re-creates the adapters of the saved stack (their weights are loaded into them next)."""
        self.stack = list(state.get("adapters", ["default"]))
        for name in self.stack:
            if name not in self.adapters.names():
                self.adapters.add(name)
        self.adapters.activate(*self.stack)


@register
class SumLoRA(CumulativeLoRA):
    name = "sumlora"

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        if self.cfg.form not in FORMS:
            raise ValueError(f"method.form={self.cfg.form!r}: expected one of {list(FORMS)}")

    @torch.no_grad()
    def on_freeze(self, rec, name):
        if self.cfg.form != "directions":
            return
        for layer in self.layers.values():  # (α/r) (B/‖B‖_F)(A/‖A‖_F): direction only
            for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                norm = weight.double().norm()
                if norm > 0:  # an untouched B (0) has no direction: it stays 0
                    weight.copy_((weight.double() / norm).to(weight.dtype))


def delta_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F without forming B A: ‖BA‖² = tr(BᵀB · A Aᵀ) (r × r)."""
    a, b = a.double(), b.double()
    return ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()


@register
class SDLoRA(CumulativeLoRA):
    name = "sdlora"

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        rec.module.sdlora_magnitudes = torch.nn.ParameterDict()  # on the module: the optimiser finds them
        self.magnitudes = rec.module.sdlora_magnitudes
        self.module_names = list(self.layers)

    @staticmethod
    def key(adapter: str, index: int) -> str:
        return f"{adapter}:{index}"  # a ParameterDict key cannot hold the module name's dots

    def _install(self, adapter: str, values: torch.Tensor) -> None:
        """α_k of every module ([modules]) as learnable 0-dim parameters, used by peft's forward as `scaling`."""
        for i, layer in enumerate(self.layers.values()):
            weight = layer.lora_B[adapter].weight
            alpha = torch.nn.Parameter(values[i].detach().clone().float().to(weight.device), requires_grad=False)
            self.magnitudes[self.key(adapter, i)] = alpha
            layer.scaling[adapter] = alpha  # forward: result + lora_B(lora_A(x)) * scaling

    @torch.no_grad()
    def on_freeze(self, rec, name):
        # Ā_k = B_k A_k / ‖B_k A_k‖_F with α_k = ‖B_k A_k‖_F · scaling: the same ΔW, now direction × magnitude
        alphas = []
        for layer in self.layers.values():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            norm = delta_norm(a, b)
            if norm > 0:  # a zero delta has no direction: α = 0 and B stays 0
                b.copy_((b.double() / norm).to(b.dtype))
            alphas.append(norm * float(layer.scaling[name]))
        self._install(name, torch.stack(alphas))

    def also_train(self, rec, name):
        for alpha in self.magnitudes.values():  # every frozen direction's magnitude
            alpha.requires_grad_(True)

    def stored_bytes(self):
        return super().stored_bytes() + sum(p.numel() * p.element_size() for p in self.magnitudes.values())

    def after_update(self, stage, rec):
        super().after_update(stage, rec)
        for alpha in self.magnitudes.values():
            alpha.requires_grad_(False)  # trainable only inside an update

    def state_dict(self):
        n = len(self.module_names)
        return {**super().state_dict(), "modules": self.module_names,
                "magnitudes": {a: torch.stack([self.magnitudes[self.key(a, i)].detach().cpu() for i in range(n)])
                               for a in self.stack if self.key(a, 0) in self.magnitudes}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        saved = state.get("magnitudes", {})
        if saved and list(state.get("modules", [])) != self.module_names:
            raise RuntimeError("method=sdlora: the saved magnitudes belong to other LoRA modules than this model's")
        for adapter, values in saved.items():
            self._install(adapter, torch.as_tensor(values))  # frozen until an update trains them


@register
class InfLoRA(CumulativeLoRA):
    name = "inflora"
    variants = ("all", "latest")

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        if not 0 < float(self.cfg.threshold) <= 1:
            raise ValueError(f"method.threshold={self.cfg.threshold}: expected a number in (0, 1]")
        self.bases: dict[str, torch.Tensor] = {}  # module -> M [in, k], orthonormal columns (float64, CPU)
        self.memory_stages: list[int] = []  # stages whose inputs are in M
        self._inputs = None  # this stage's subsample: its inputs design A_t, then extend M
        self._design = None  # {module: C} of those inputs, until A_t is set

    @property
    def inherit(self) -> bool:
        return False

    @property
    def data(self) -> str:
        return self.cfg.variant

    def input_subsample(self, samples, stage_index: int):
        cap = self.cfg.input_samples
        if cap and len(samples) > cap:
            keep = np.random.default_rng([self.cfg.seed, stage_index]).choice(len(samples), cap, replace=False)
            samples = [samples[i] for i in sorted(keep)]
        return samples

    def prepare(self, stage, rec, samples):
        if 0 not in self.memory_stages:  # stage 0's inputs, on the model as stage 0 left it
            first = self.protocol.stages[0]
            self.extend_memory(rec, self.input_subsample(super().training_samples(first, rec), 0), 0)
        self._inputs = self.input_subsample(samples, stage.index)
        self._design = input_covariances(rec.module, self.layers, self._inputs, self.cfg.input_batch_size)

    @torch.no_grad()
    def init_adapter(self, rec, name):
        short = []
        for module, layer in self.layers.items():
            a = layer.lora_A[name].weight  # [r, in]
            designed = design_down_projection(self._design[module], self.bases.get(module), a.shape[0])
            a.copy_(designed.to(device=a.device, dtype=a.dtype))
            layer.lora_B[name].weight.zero_()
            if not designed.abs().sum(1).all():
                short.append(module)
        if short:
            log.warning("InfLoRA %s: %d modules have fewer than r directions left outside M (e.g. %s): their "
                        "missing rows of A are 0", name, len(short), short[0])
        self._design = None

    def also_train(self, rec, name):
        for layer in self.layers.values():
            layer.lora_A[name].weight.requires_grad_(False)  # A designed and frozen; only B trains

    def after_update(self, stage, rec):
        if stage.index > 0:
            self.extend_memory(rec, self._inputs, stage.index)
        super().after_update(stage, rec)
        if stage.index > 0:
            self.report["inflora_memory_dims"] = int(sum(b.shape[1] for b in self.bases.values()))  # Σ_modules dim M

    def extend_memory(self, rec, samples, stage_index: int) -> None:
        covs = input_covariances(rec.module, self.layers, samples, self.cfg.input_batch_size)
        for module, cov in covs.items():
            self.bases[module] = extend_basis(cov, self.bases.get(module), float(self.cfg.threshold)).cpu()
        self.memory_stages.append(stage_index)

    def state_dict(self):
        return {**super().state_dict(), "bases": dict(self.bases), "memory_stages": list(self.memory_stages)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bases = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in state.get("bases", {}).items()}
        self.memory_stages = [int(s) for s in state.get("memory_stages", [])]


# ---- InfLoRA's linear algebra (float64) -------------------------------------------------------------
@torch.no_grad()
def input_covariances(module, layers: dict[str, LoraLayer], samples, batch_size: int) -> dict[str, torch.Tensor]:
    """C = Σ_tokens x xᵀ ([in, in], float64) of every LoRA layer's input over the samples' real tokens (prompt and
    answer, padding left out), dropout off: the model as it infers now."""
    covs: dict[str, torch.Tensor] = {}
    current = {}

    def hook(name):
        def collect(_, args):
            x = args[0][current["mask"]].float()  # [tokens, in]
            c = x.T @ x
            covs[name] = c if name not in covs else covs[name] + c
        return collect

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(samples), batch_size):
            batch = module.collate(samples[start : start + batch_size])
            ids, mask = batch["input_ids"].to(module.device), batch["attention_mask"].to(module.device)
            current["mask"] = mask.bool()
            module._decode(ids, mask)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {k: v.double() for k, v in covs.items()}


def complement_basis(basis: torch.Tensor | None, dim: int, device) -> torch.Tensor:
    """Orthonormal columns spanning the complement of span(basis) ([dim, dim − k])."""
    if basis is None or basis.shape[1] == 0:
        return torch.eye(dim, dtype=torch.float64, device=device)
    m = basis.to(device=device, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(torch.eye(dim, dtype=torch.float64, device=device) - m @ m.T)
    return vectors[:, values > 0.5]  # I − M Mᵀ has eigenvalue 1 off M, 0 on it


def _residual_eigen(cov: torch.Tensor, basis: torch.Tensor | None):
    """Eigenpairs of the covariance restricted to the complement of M, largest first, mapped back to [in, ·]."""
    q = complement_basis(basis, cov.shape[0], cov.device)
    values, vectors = torch.linalg.eigh(q.T @ cov @ q)
    order = torch.argsort(values, descending=True)
    return values[order].clamp(min=0), q @ vectors[:, order]


def design_down_projection(cov: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """A_t [rank, in]: the top principal directions of the inputs projected off M; rows past the complement's
    dimension are 0."""
    _, directions = _residual_eigen(cov, basis)  # [in, in − k]
    a = torch.zeros(rank, cov.shape[0], dtype=torch.float64, device=cov.device)
    take = min(rank, directions.shape[1])
    a[:take] = directions[:, :take].T
    return a


def extend_basis(cov: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """GPM: M plus the fewest residual directions k with tr(Mᵀ C M) + Σ_{i≤k} λ_i ≥ threshold · tr(C)."""
    dim = cov.shape[0]
    basis = torch.zeros(dim, 0, dtype=torch.float64) if basis is None else basis.to(torch.float64)
    m = basis.to(cov.device)
    total = torch.trace(cov)
    kept = torch.trace(m.T @ cov @ m) if m.shape[1] else torch.zeros((), dtype=torch.float64, device=cov.device)
    if total <= 0 or kept >= threshold * total or m.shape[1] == dim:
        return basis
    values, directions = _residual_eigen(cov, m)
    reached = kept + torch.cumsum(values, 0) >= threshold * total * (1 - 1e-12)
    k = int(reached.nonzero()[0]) + 1 if reached.any() else values.numel()
    return torch.cat([m, directions[:, :k]], 1).cpu()
