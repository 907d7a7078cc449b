"""PESO (Yoo et al., "Continual Low-Rank Adapters for LLM-based Generative Recommender Systems") and the
proximal terms its paper compares, on one evolving LoRA adapter.

Every method here shares one schedule, per stage t:
  1. v_t starts from v_{t-1} (the adapter as stage t-1 left it: nothing is reset or added);
  2. t >= 1: a frozen copy of what the term needs is taken from the model (`before_update`);
  3. fit L_t = L_ce(D_t) + λ·R(v_t; v_{t-1}) on stage t's new data; stage 0 trains without a term.
Methods (`method.name`) and their R:
  single_lora      none (= finetune under the paper's name; `lr_scale` and `ce_temperature` apply)
  peso             Σ_g KL(softmax(v_t^(g)) ‖ softmax(v_{t-1}^(g))), g over groups of LoRA parameters
  prox_l2          Σ_g ‖v_t^(g) − v_{t-1}^(g)‖²  (uniform, unweighted L2 to the previous adapter)
  prox_output_kl   KL(softmax(ΔW_t x) ‖ softmax(ΔW_{t-1} x)) of every LoRA module's output, ΔW x = s·B A x
  prox_orthogonal  Σ_{k<t} Σ_modules ‖A_t A_k^T‖²_F  (O-LoRA: away from the subspaces earlier stages used)

Choices where the paper is unclear, all in config:
- `granularity` (peso, prox_l2): what one group v^(g) is. `module` (the paper): A and B of one LoRA module
  flattened together; `matrix` (the authors' code): A and B each their own group; `layer`: every LoRA
  parameter of one transformer block (those outside blocks form one more group); `global`: one group.
- `reduction` (peso, prox_l2): `sum` (the paper's Σ_g) or `mean`: the sum divided by the number of LoRA
  modules, whatever the granularity. With `matrix` that is the authors' code exactly (their mean over
  modules of KL(A) + KL(B)), and λ weighs the same per module at every granularity.
- What v covers: the LoRA matrices (lora_A / lora_B) only. Embedding rows or whole embedding copies that
  train beside them (item_id.train_embeddings) are outside every term, as in the authors' code.
- prox_output_kl: each module's input x is taken by a forward hook in the training pass itself (no second
  model pass), before the LoRA dropout and detached: the term compares the two adapters as functions of
  the same input and constrains each module's own A, B (no gradient through x into lower blocks).
  Softmax over the output features; KL(new ‖ prev), the direction of PESO's term; the mean over the real
  (non-padding) tokens of the batch, then over the modules. Computed in fp32 and recomputed in backward
  (activation checkpointing), so it holds no [tokens, out_features] tensor per module between passes.
- prox_orthogonal: A_t is initialised from A_{t-1} here (one evolving adapter), unlike O-LoRA's fresh
  adapter per task, so the term is large at the start of an update and pushes A_t off its own past rows.
  Summed over modules and earlier stages, as O-LoRA does. The A of every earlier stage is method state.
- `lr_scale`: null keeps trainer.update.lr; a number sets the update lr to lr_scale × stage 0's lr
  (trainer.base.lr), the paper's "0.05–0.1 × the stage-1 rate".
- `ce_temperature`: L_ce on logits / T (the authors' code: T = 0.8), at every stage, stage 0 included,
  so a method with T ≠ 1 trains its own stage 0 instead of sharing the other methods' (shares_base_stage).
Each term logs `train/<term>` (λ·R, what joins the loss) and `train/<term>_raw` (R) every step.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer
from torch.utils.checkpoint import checkpoint

from recsim.backbones.lora import layer_of, lora_parameters
from recsim.methods.base import ContinualMethod, register

GRANULARITIES = ("module", "matrix", "layer", "global")
REDUCTIONS = ("sum", "mean")
_LORA_MATRIX = re.compile(r"\.lora_([AB])\.([^.]+)\.weight$")


def lora_matrices(model, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA A and B matrices (no token rows, no embedding copies), in model order."""
    return {n: p for n, p in lora_parameters(model, adapter).items()
            if (m := _LORA_MATRIX.search(n)) and m.group(2) == adapter}


def module_of(param_name: str) -> str:
    """`...q_proj.lora_A.default.weight` -> `...q_proj`: the LoRA module a matrix belongs to."""
    return _LORA_MATRIX.sub("", param_name)


def group_parameters(names, granularity: str) -> dict[str, list[str]]:
    """{group: parameter names in it} of LoRA matrix names, in their order (see the module doc)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"method.granularity={granularity!r}: expected one of {list(GRANULARITIES)}")
    groups: dict[str, list[str]] = {}
    for name in names:
        if granularity == "matrix":
            key = name
        elif granularity == "module":
            key = module_of(name)
        elif granularity == "layer":
            layer = layer_of(name)
            key = "outside_blocks" if layer is None else f"layer{layer}"
        else:
            key = "all"
        groups.setdefault(key, []).append(name)
    return groups


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def softmax_kl(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """KL(softmax(v_t) ‖ softmax(v_{t-1})) over all entries of one group (any shape, flattened)."""
    # KL = Σ_i p_i (log p_i − log q_i), p = softmax(v_t), q = softmax(v_{t-1}); both as log_softmax (no
    # exp overflow, no log 0). Locally ≈ ½ Var_q(Δ), Δ = v_t − v_{t-1}; gradient ≈ q ⊙ (Δ − E_q[Δ]).
    log_p = F.log_softmax(_at_least_fp32(current).reshape(-1), 0)
    log_q = F.log_softmax(_at_least_fp32(previous).reshape(-1), 0)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def squared_l2(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """‖v_t − v_{t-1}‖² over all entries of one group."""
    return (_at_least_fp32(current) - _at_least_fp32(previous)).pow(2).sum()


DISTANCES = {"softmax_kl": softmax_kl, "squared_l2": squared_l2}


def _log_raw(module, name: str, raw: torch.Tensor, batch: dict) -> None:
    if getattr(module, "_current_fx_name", None) == "training_step":  # a direct call has nowhere to log
        module.log(f"train/{name}_raw", raw.detach(), batch_size=batch["input_ids"].shape[0])


class ParameterProximity:
    """λ·R with R = reduce_g distance(v_t^(g), v_{t-1}^(g)) over groups of LoRA matrices (peso, prox_l2)."""

    def __init__(self, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], distance: str,
                 granularity: str, reduction: str, lam: float, name: str):
        if reduction not in REDUCTIONS:
            raise ValueError(f"method.reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
        missing = [n for n in params if n not in anchor]
        if missing:
            raise KeyError(f"the previous adapter has no {missing[0]!r}")
        self.groups = [([params[n] for n in names], [anchor[n] for n in names])
                       for names in group_parameters(list(params), granularity).values()]
        self.modules = len({module_of(n) for n in params})
        self.distance, self.reduction, self.lam, self.name = DISTANCES[distance], reduction, lam, name

    def raw(self) -> torch.Tensor:
        total = sum(self.distance(torch.cat([p.reshape(-1) for p in current]),
                                  torch.cat([a.reshape(-1) for a in previous]))
                    for current, previous in self.groups)
        return total / self.modules if self.reduction == "mean" else total

    def __call__(self, module, batch: dict, out: dict) -> dict:
        raw = self.raw()
        _log_raw(module, self.name, raw, batch)
        return {self.name: self.lam * raw}


def _output_kl(x, a, b, a_prev, b_prev, scaling: float, weight):
    """Σ_tokens w · KL(softmax(s·B A x) ‖ softmax(s·B_prev A_prev x)) of one LoRA module (fp32, no autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()  # [..., in]
        new = scaling * F.linear(F.linear(x, a.float()), b.float())  # [..., out]
        prev = scaling * F.linear(F.linear(x, a_prev.float()), b_prev.float())
        # KL(new ‖ prev) per token, over the output features
        kl = F.kl_div(F.log_softmax(prev, -1), F.log_softmax(new, -1), log_target=True, reduction="none").sum(-1)
        return (kl * weight).sum()


class LoRAOutputKL:
    """λ·R, R = mean over modules of the token mean of KL(softmax(ΔW_t x) ‖ softmax(ΔW_{t-1} x)).

    Forward hooks on every LoRA layer keep its input of the current training pass; `close` removes them."""

    def __init__(self, model, anchor: dict[str, torch.Tensor], lam: float, adapter: str = "default",
                 name: str = "output_kl"):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if not self.layers:
            raise ValueError(f"method=prox_output_kl: the model has no LoRA layer of adapter {adapter!r}")
        self.previous = {n: (anchor[f"{n}.lora_A.{adapter}.weight"], anchor[f"{n}.lora_B.{adapter}.weight"])
                         for n, _ in self.layers}
        self.adapter, self.lam, self.name = adapter, lam, name
        self.inputs: dict[str, torch.Tensor] = {}
        self.hooks = [m.register_forward_hook(self._keeper(n)) for n, m in self.layers]

    def _keeper(self, name: str):
        def keep(module, args, output):
            if torch.is_grad_enabled():  # training passes only, never scoring
                self.inputs[name] = args[0].detach()
        return keep

    def raw(self, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"]  # [B, L]
        total = 0.0
        for name, layer in self.layers:
            x = self.inputs.pop(name, None)  # [B, L, in]
            if x is None:
                raise RuntimeError(f"prox_output_kl: no input of {name} was seen in this step's forward pass")
            if x.shape[:-1] == mask.shape:
                weight = mask.float() / mask.sum()  # [B, L]: the mean over real tokens
            else:  # a layer fed other rows (e.g. a LoRA head on the answer states): the mean over them all
                weight = torch.full(x.shape[:-1], 1.0 / x.shape[:-1].numel(), device=x.device)
            a_prev, b_prev = self.previous[name]
            total = total + checkpoint(_output_kl, x, layer.lora_A[self.adapter].weight,
                                       layer.lora_B[self.adapter].weight, a_prev, b_prev,
                                       float(layer.scaling[self.adapter]), weight, use_reentrant=False)
        return total / len(self.layers)

    def __call__(self, module, batch: dict, out: dict) -> dict:
        raw = self.raw(batch)
        _log_raw(module, self.name, raw, batch)
        return {self.name: self.lam * raw}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.inputs = [], {}


def orthogonality(current_a: dict[str, torch.Tensor], earlier_a: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Σ_k Σ_modules ‖A_t A_k^T‖²_F (A [r, in]) over the A matrices of every earlier stage k."""
    total = 0.0
    for name, a in current_a.items():
        stacked = torch.cat([_at_least_fp32(e[name]) for e in earlier_a])  # [K·r, in]
        total = total + (_at_least_fp32(a) @ stacked.T).pow(2).sum()  # [r, K·r]
    return total


class OrthogonalityPenalty:
    def __init__(self, current_a: dict[str, torch.Tensor], earlier_a: list[dict[str, torch.Tensor]], lam: float,
                 name: str = "orthogonal"):
        self.current_a, self.earlier_a, self.lam, self.name = current_a, earlier_a, lam, name

    def __call__(self, module, batch: dict, out: dict) -> dict:
        raw = orthogonality(self.current_a, self.earlier_a)
        _log_raw(module, self.name, raw, batch)
        return {self.name: self.lam * raw}


class EvolvingLoRA(ContinualMethod):
    """The schedule every method of this module shares (see the module doc); subclasses say which term."""

    uses_lam = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lr_scale = cfg.get("lr_scale")
        if self.lr_scale is not None and not (isinstance(self.lr_scale, (int, float)) and self.lr_scale > 0):
            raise ValueError(f"method.lr_scale={self.lr_scale!r}: expected null or a number > 0")
        self.ce_temperature = float(cfg.get("ce_temperature", 1.0))
        if not self.ce_temperature > 0:
            raise ValueError(f"method.ce_temperature={self.ce_temperature}: expected a number > 0")
        if self.uses_lam and not (isinstance(cfg.lam, (int, float)) and cfg.lam >= 0):
            raise ValueError(f"method.lam={cfg.lam!r}: expected a number >= 0")
        # stage 0 is trained with L_ce(logits / T): another stage 0 than the shared one when T != 1
        self.shares_base_stage = self.ce_temperature == 1.0
        self.base_lr: float | None = None
        self.term = None

    def setup(self, rec, protocol):
        super().setup(rec, protocol)
        self.base_lr = float(rec.schedule(0)[0]["lr"])
        if self.ce_temperature != 1.0:
            if getattr(rec, "kind", None) != "llm":
                raise ValueError(f"method.ce_temperature={self.ce_temperature}: only LLM backbones have it (1.0 here)")
            rec.module.ce_temperature = self.ce_temperature

    def update_optim(self, optim, stage):
        if stage.index == 0 or self.lr_scale is None:
            return optim
        return OmegaConf.merge(optim, {"lr": float(self.lr_scale) * self.base_lr})

    def make_term(self, rec, stage):
        """The stage's loss term (t >= 1, λ > 0), or None."""
        return None

    def before_update(self, stage, rec, samples):
        super().before_update(stage, rec, samples)
        if stage.index > 0 and (not self.uses_lam or self.cfg.lam > 0):
            self.term = self.make_term(rec, stage)
            if self.term is not None:
                rec.add_loss_term(self.term)

    def after_update(self, stage, rec):
        if hasattr(self.term, "close"):
            self.term.close()
        self.term = None
        super().after_update(stage, rec)


def _previous_adapter(rec) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]:
    """(v_t's LoRA matrices, a detached copy of them = v_{t-1}, the adapter as the previous stage left it)."""
    params = lora_matrices(rec.model)
    if not params:
        raise ValueError("this method regularises LoRA matrices: the model has none (backbone.kind=llm needed)")
    return params, {n: p.detach().clone() for n, p in params.items()}


@register
class SingleLoRA(EvolvingLoRA):
    name = "single_lora"
    uses_lam = False


@register
class PESO(EvolvingLoRA):
    name = "peso"
    distance, term_name = "softmax_kl", "peso_kl"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.granularity not in GRANULARITIES:
            raise ValueError(f"method.granularity={cfg.granularity!r}: expected one of {list(GRANULARITIES)}")
        if cfg.reduction not in REDUCTIONS:
            raise ValueError(f"method.reduction={cfg.reduction!r}: expected one of {list(REDUCTIONS)}")

    def make_term(self, rec, stage):
        params, anchor = _previous_adapter(rec)
        return ParameterProximity(params, anchor, self.distance, self.cfg.granularity, self.cfg.reduction,
                                  self.cfg.lam, self.term_name)


@register
class ProxL2(PESO):
    name = "prox_l2"
    distance, term_name = "squared_l2", "prox_l2"


@register
class ProxOutputKL(EvolvingLoRA):
    name = "prox_output_kl"

    def make_term(self, rec, stage):
        _, anchor = _previous_adapter(rec)
        return LoRAOutputKL(rec.model, anchor, self.cfg.lam)


@register
class ProxOrthogonal(EvolvingLoRA):
    name = "prox_orthogonal"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.earlier_a: dict[str, dict[str, torch.Tensor]] = {}  # {str(stage k): {A name: A at the end of k}}

    def before_update(self, stage, rec, samples):
        if stage.index > 0:  # the model as stage t-1 left it: record its A (a shared stage 0 records nothing)
            self.earlier_a[str(stage.index - 1)] = {n: p.detach().clone() for n, p in lora_matrices(rec.model).items()
                                                    if ".lora_A." in n}
        super().before_update(stage, rec, samples)

    def make_term(self, rec, stage):
        current = {n: p for n, p in lora_matrices(rec.model).items() if ".lora_A." in n}
        device = next(iter(current.values())).device
        earlier = [{n: a.to(device) for n, a in self.earlier_a[k].items()}
                   for k in sorted(self.earlier_a, key=int) if int(k) < stage.index]
        return OrthogonalityPenalty(current, earlier, self.cfg.lam)

    def state_dict(self) -> dict:
        return {"earlier_A": self.earlier_a}

    def load_state_dict(self, state: dict) -> None:
        self.earlier_a = {k: dict(v) for k, v in state.get("earlier_A", {}).items()}
