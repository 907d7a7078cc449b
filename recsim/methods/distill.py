"""method=distill: a small explaining student (backbone=student, recsim.models.student) learns from a trained LLM
recommender, the teacher (RecLLM-Adapter's knowledge distillation, as the seed describes it; no reference code).

    L = 1.0 · L_rec(BPR) + 0.3 · L_gen(CE of the teacher's explanation) + 0.5 · KL(p_teacher ‖ p_student),
    p = softmax(scores / T) over each training sample's candidate list, T = 0.8          (method.loss.*)

Every stage trains the student like `finetune` (stage 0 on everything up to its cut, later stages on the new
window), distilling the one teacher stage `teacher.stage` (default -1, the teacher run's last) of `teacher.run_dir`.

Choices the seed leaves open:
- Soft targets: each training sample's list is its target plus `method.negatives` items the user had not touched
  up to the target, drawn once per sample (seeded by the run's seed, the user and the position) as the protocol
  draws test candidates; the teacher scores the list (through its method, so LSAT's ensemble scores as itself).
  The protocol's own 1 + 29 draws exist only for test and validation targets, which no stage trains on.
- KL without the T² factor by default (the seed's formula has none); `method.loss.t_squared=true` adds it.
- L_gen's targets: the teacher's explanation of each training sample's target item (recsim.explain.teacher), at
  most `explanation.max_samples` a stage (a seeded subset; the others train without L_gen); an empty one counts as
  none.
- Teacher scores and explanations are computed once per stage and cached in the run
  (`distill/stageNN-<fingerprint>.{json,safetensors}`), keyed by the teacher stage's weight files, the samples, the
  candidate lists and the explanation settings; a resumed or repeated run reads them back.
- The teacher must be a finished run of an LLM recommender on the same dataset (every dataset key but the data's
  folder) and the same protocol (`stage`), so no test or validation target of the student was ever a training
  target of the teacher; its tokenizer must contain the student decoder's (`backbone.decoder.tokenizer`). Anything
  else stops the run before any training with an error naming `teacher.run_dir` (or the setting at fault).
- With a continual protocol the teacher is one fixed stage: with teacher.stage=-1, the student's earlier stages
  learn from a teacher that has also seen later windows (never a test target). Compare the students' last stage.
- Loading the teacher, scoring and generating run inside a saved-and-restored RNG state, so a cache hit (no
  teacher loaded) trains the very same student as a miss.

Efficiency (`method.efficiency`): after the last stage, in this process, `requests` requests per model (one user:
rank the 1 + eval.negatives candidates, then explain the top one) after `warmup` untimed ones, on the run's device;
latency median / p90 / mean, and memory = the model's parameters and buffers + the peak memory a request adds (CPU:
the rise of the process's resident high-water mark, reset before each model; GPU: torch's peak allocated above
what was allocated before). -> <run>/efficiency/distill.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from recsim.methods.base import ContinualMethod, register
from recsim.models.student import DistillLoss, SoftTargets, model_bytes
from recsim.protocols.base import Sample
from recsim.protocols.candidates import _crc, draw_negatives
from recsim.utils.io import write_json

log = logging.getLogger(__name__)

CACHE_FOLDER = "distill"
EFFICIENCY_FILE = Path("efficiency") / "distill.json"
FREE_DATASET_KEYS = ("data_dir",)  # where the data lies changes nothing the teacher learnt


# ---------------------------------------------------------------------------------------------- the teacher run


@dataclass(frozen=True)
class TeacherRun:
    run_dir: Path
    cfg: DictConfig  # the teacher run's resolved config.yaml
    stage_index: int  # absolute index of the distilled stage
    stage_dir: Path


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _differences(theirs: dict, mine: dict) -> list[str]:
    a, b = _flat(theirs), _flat(mine)
    return [f"{k}: teacher {a.get(k)!r}, student {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_teacher_run(cfg) -> TeacherRun:
    """The teacher named by `cfg.teacher`, checked from its files alone (nothing is loaded): a finished recsim run
    of an LLM recommender, with the stage `teacher.stage`, on this run's dataset and protocol."""
    from recsim.protocols.holdout import stage_key
    from recsim.runs import stage_dirs

    teacher = cfg.get("teacher") or {}
    where = teacher.get("run_dir")
    if not where:
        raise ValueError("teacher.run_dir is not set: method=distill needs teacher.run_dir=<the folder of a finished "
                         "recsim run of an LLM recommender> (e.g. outputs/runs/<date>_finetune_...)")
    run_dir = Path(str(where)).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"teacher.run_dir={where}: no such folder")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"teacher.run_dir={where}: no config.yaml there, not a recsim run folder")
    if not (run_dir / "DONE").is_file():
        raise RuntimeError(f"teacher.run_dir={where}: the run is not finished (no DONE file); finish it first "
                           "(rerunning its command resumes it)")
    theirs = OmegaConf.load(run_dir / "config.yaml")
    if OmegaConf.select(theirs, "backbone.kind") != "llm":
        raise ValueError(f"teacher.run_dir={where}: its backbone {OmegaConf.select(theirs, 'backbone.name')!r} is "
                         f"kind {OmegaConf.select(theirs, 'backbone.kind')!r}; the teacher must be an LLM recommender "
                         "(it writes the explanations)")
    finished = stage_dirs(run_dir)
    index = int(teacher.get("stage", -1))
    if not -len(finished) <= index < len(finished):
        raise ValueError(f"teacher.stage={index}: teacher.run_dir={where} has {len(finished)} finished stage(s) "
                         f"({', '.join(p.name for p in finished)})")
    stage_dir = finished[index]
    plain = lambda node: OmegaConf.to_container(node, resolve=True)
    strip = lambda d: {k: v for k, v in d.items() if k not in FREE_DATASET_KEYS}
    for name, theirs_node, mine_node in (("dataset", strip(plain(theirs.dataset)), strip(plain(cfg.dataset))),
                                         ("stage", stage_key(plain(theirs.stage)), stage_key(plain(cfg.stage)))):
        diff = [f"{name}.{d}" for d in _differences(theirs_node, mine_node)]
        if diff:
            reason = ("another dataset" if name == "dataset" else
                      "another protocol, whose training data may hold this run's test or validation targets")
            raise ValueError(f"teacher.run_dir={where}: the teacher was trained on {reason} ({'; '.join(diff)})")
    return TeacherRun(run_dir, theirs, int(stage_dir.name[:2]), stage_dir)


def teacher_fingerprint(run: TeacherRun, memo_dir) -> dict:
    """What the teacher stage's model is: the hashes of its adapter and method-state files."""
    from recsim.data.cache import content_hash

    files = sorted(p for p in run.stage_dir.rglob("*") if p.is_file()
                   and (p.relative_to(run.stage_dir).parts[0] == "adapter" or p.name.startswith("method_")))
    return {"run_dir": str(run.run_dir.resolve()), "stage": run.stage_dir.name,
            "files": {str(p.relative_to(run.stage_dir)): content_hash(p, memo_dir) for p in files}}


@contextlib.contextmanager
def preserved_rng():
    """Whatever runs inside leaves python's, numpy's and torch's RNG states as they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# ---------------------------------------------------------------------------------------------- soft targets


def training_candidates(samples: list[Sample], data, negatives: int, seed: int) -> np.ndarray:
    """[n, 1 + negatives]: each sample's target, then `negatives` distinct items the user had not touched up to
    and including the target, uniform over the catalogue, seeded by (seed, user id, position)."""
    rows = np.zeros((len(samples), 1 + negatives), dtype=np.int64)
    salt = _crc("distill")
    for i, s in enumerate(samples):
        seen = set(data.sequences[s.user][: s.position + 1].tolist()) | {s.target}
        if data.num_items - len(seen) < negatives:
            raise ValueError(f"method.negatives={negatives}: user {data.user_ids[s.user]!r} has touched {len(seen)} of "
                             f"{data.num_items} items by position {s.position}")
        rng = np.random.default_rng([seed, salt, _crc(data.user_ids[s.user]), s.position])
        rows[i, 0], rows[i, 1:] = s.target, draw_negatives(rng, seen, data.num_items, negatives)
    return rows


def _samples_digest(samples: list[Sample]) -> str:
    text = json.dumps([[s.user, s.position, s.target, list(s.history)] for s in samples])
    return hashlib.sha1(text.encode()).hexdigest()


def load_cached(path: Path, key: str) -> SoftTargets | None:
    import safetensors.numpy

    meta, arrays = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (meta.is_file() and arrays.is_file()):
        return None
    saved = json.loads(meta.read_text())
    if saved.get("key") != key:
        return None
    tensors = safetensors.numpy.load_file(str(arrays))
    return SoftTargets(tensors["candidates"], tensors["teacher_scores"], saved["explanations"])


def save_cached(path: Path, key: str, material: dict, targets: SoftTargets) -> None:
    """The arrays first, then the JSON (the entry counts only once its JSON, written last, is in place)."""
    import safetensors.numpy

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = path.with_suffix(".safetensors")
    tmp = arrays.with_name(arrays.name + f".tmp{os.getpid()}")
    safetensors.numpy.save_file({"candidates": np.ascontiguousarray(targets.candidates),
                                 "teacher_scores": np.ascontiguousarray(targets.teacher_scores)}, str(tmp))
    os.replace(tmp, arrays)
    write_json(path.with_suffix(".json"), {"key": key, "material": material, "explanations": targets.explanations})


# ---------------------------------------------------------------------------------------------- efficiency


def _trim_heap() -> None:
    """glibc: give free heap pages back to the OS (recsim keeps freed blocks, recsim.utils.resources), so a block's
    allocations fault in pages the high-water mark sees. Elsewhere nothing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """The peak memory a block adds above what was in use when it started (MB): on a GPU torch's max allocated;
    on Linux the rise of the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs) after
    glibc's heap has returned its free pages (malloc_trim), so memory the block reuses from earlier work counts too."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base, self.kind = torch.cuda.memory_allocated(self.device), "gpu_allocated"
        else:
            _trim_heap()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base, self.kind = _status_kb("VmRSS") * 1024, "cpu_rss_high_water"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kb("VmHWM") * 1024
        self.extra_mb = max(0, peak - self.base) / 2**20
        return False


def time_requests(request, samples: list[Sample], candidates: np.ndarray, warmup: int, n: int,
                  device: torch.device) -> dict:
    """`request(sample, candidates [C]) -> explanation` on `warmup` users, then timed on the next `n` (cyclic)."""
    from recsim.bench.timing import timed

    for i in range(warmup):
        request(samples[i % len(samples)], candidates[i % len(samples)])
    seconds, texts = [], []
    with PeakMemory(device) as memory:
        for i in range(warmup, warmup + n):
            text, took = timed(lambda j=i % len(samples): request(samples[j], candidates[j]), device)
            seconds.append(took)
            texts.append(text)
    ms = np.array(seconds) * 1000
    return {"latency_ms": {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                           "mean": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max()),
                           "runs": ms.round(3).tolist()},
            "request_extra_mb": memory.extra_mb, "memory_kind": memory.kind, "texts": texts}


# ---------------------------------------------------------------------------------------------- the method


@register
class Distill(ContinualMethod):
    name = "distill"
    shares_base_stage = False  # stage 0 learns from the teacher

    def __init__(self, cfg):
        super().__init__(cfg)
        self.teacher_run: TeacherRun | None = None
        self.teacher = None  # recsim.runs.LoadedStage, loaded at the first stage that needs it
        self.run_cfg = None

    def setup(self, rec, protocol) -> None:
        super().setup(rec, protocol)
        if getattr(rec, "kind", None) != "student":
            raise ValueError(f"method=distill trains the student: set backbone=student (this run's backbone is "
                             f"{rec.cfg.backbone.name!r}, kind {getattr(rec, 'kind', None)!r})")
        self.run_cfg = rec.cfg
        self.teacher_run = check_teacher_run(rec.cfg)

    @property
    def loss(self) -> DistillLoss:
        return DistillLoss(**OmegaConf.to_container(self.cfg.loss, resolve=True))

    def _teacher(self, rec):
        """The teacher stage, loaded once (on this run's device), checked against this run's items and tokenizer."""
        if self.teacher is not None:
            return self.teacher
        from recsim.runs import load_stage

        run = self.teacher_run
        with preserved_rng():
            loaded = load_stage(run.run_dir, run.stage_index,
                                [f"trainer.accelerator={self.run_cfg.trainer.accelerator}",
                                 f"paths.cache_dir={self.run_cfg.paths.cache_dir}"])
        if list(loaded.protocol.data.item_ids) != list(self.protocol.data.item_ids):
            raise ValueError(f"teacher.run_dir={run.run_dir}: the teacher's catalogue differs from this run's "
                             f"({loaded.protocol.data.num_items} vs {self.protocol.data.num_items} items, or other ids)")
        theirs, mine = loaded.rec.tokenizer.get_vocab(), rec.tokenizer.get_vocab()
        if any(theirs.get(token) != i for token, i in mine.items()):
            raise ValueError(f"backbone.decoder.tokenizer: the student's tokenizer is not the teacher's "
                             f"({loaded.cfg.backbone.name}, teacher.run_dir={run.run_dir}); set it to the teacher's")
        self.teacher = loaded
        return loaded

    def _explained_rows(self, stage, n: int) -> list[int]:
        cap = self.cfg.explanation.get("max_samples")
        if cap is None or cap >= n:
            return list(range(n))
        return sorted(np.random.default_rng([int(self.cfg.seed), stage.index]).choice(n, int(cap), replace=False)
                      .tolist())

    def soft_targets(self, stage, rec, samples: list[Sample]) -> SoftTargets:
        """The teacher's scores on each sample's candidate list and its explanations of the targets (cached)."""
        candidates = training_candidates(samples, self.protocol.data, int(self.cfg.negatives), int(self.cfg.seed))
        rows = self._explained_rows(stage, len(samples))
        explanation = OmegaConf.to_container(self.cfg.explanation, resolve=True)
        material = {"teacher": teacher_fingerprint(self.teacher_run, self.run_cfg.paths.cache_dir),
                    "samples": _samples_digest(samples), "candidates": hashlib.sha1(candidates.tobytes()).hexdigest(),
                    "explained_rows": hashlib.sha1(json.dumps(rows).encode()).hexdigest(), "explanation": explanation}
        key = hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(self.run_cfg.paths.output_dir) / CACHE_FOLDER / f"stage{stage.index:02d}-{key}"
        cached = load_cached(path, key)
        self.report["distill_cache"] = "hit" if cached is not None else "miss"
        if cached is not None:
            log.info("distill: teacher scores and explanations of stage %s read from %s", stage.name, path)
            return cached
        from recsim.explain.teacher import generate_explanations

        with preserved_rng():
            teacher = self._teacher(rec)
            scores = teacher.method.score_candidates(teacher.rec, samples, candidates, int(self.cfg.teacher_batch_size))
            written = generate_explanations(teacher.rec, [samples[i] for i in rows], [samples[i].target for i in rows],
                                            self.cfg.explanation, method=teacher.method)
        explanations: list[str | None] = [None] * len(samples)
        for i, text in zip(rows, written):
            explanations[i] = text or None  # an empty reason teaches nothing
        targets = SoftTargets(candidates, np.asarray(scores, dtype=np.float64), explanations)
        save_cached(path, key, material, targets)
        return targets

    def before_update(self, stage, rec, samples):
        super().before_update(stage, rec, samples)
        targets = self.soft_targets(stage, rec, samples)
        rec.set_distillation(samples, targets, self.loss)
        self.report.update({"teacher_run": str(self.teacher_run.run_dir), "teacher_stage": self.teacher_run.stage_dir.name,
                            "explained_samples": sum(t is not None for t in targets.explanations)})

    def after_update(self, stage, rec):
        rec.clear_distillation()
        if stage.index == self.protocol.stages[-1].index and self.cfg.efficiency.enabled:
            start = time.perf_counter()
            with preserved_rng():
                self.measure_efficiency(stage, rec)
            # not the update's work: left out of its update_seconds (recsim.runner.fit_stage)
            self.report["offline_seconds"] = self.report.get("offline_seconds", 0.0) + time.perf_counter() - start
        if stage.index == self.protocol.stages[-1].index:
            self.teacher = None  # the last use of the teacher: free it

    def measure_efficiency(self, stage, rec) -> dict:
        """Teacher vs student per request, in this process (module docstring) -> <run>/efficiency/distill.json."""
        from recsim.explain.teacher import explanation_settings, generate_explanations
        from recsim.runner import compute_device

        split = self.protocol.splits[stage.eval_split]
        samples = [s for g in split.samples for s in split.samples[g]]
        candidates = np.concatenate([split.candidates[g] for g in split.samples if len(split.samples[g])])
        if not samples:
            log.warning("distill: the split %s has no users to time requests on", split.name)
            return {}
        device = compute_device(self.run_cfg)
        teacher = self._teacher(rec)
        settings = explanation_settings(self.cfg.explanation)
        new_tokens = int(settings.max_new_tokens)

        def teacher_request(sample, cands):
            scores = teacher.method.score_candidates(teacher.rec, [sample], cands[None], 1)[0]
            top = int(cands[int(np.argmax(scores))])
            return generate_explanations(teacher.rec, [sample], [top], settings, method=teacher.method)[0]

        def student_request(sample, cands):
            scores = rec.score_candidates([sample], cands[None], 1)[0]
            return rec.explain([sample], [int(cands[int(np.argmax(scores))])], new_tokens)[0]

        n, warmup = int(self.cfg.efficiency.requests), int(self.cfg.efficiency.warmup)
        figures = {}
        for name, model, request, tokenizer in (("teacher", teacher.rec.module, teacher_request, teacher.rec.tokenizer),
                                                ("student", rec.module, student_request, rec.tokenizer)):
            was_training = model.training
            model.eval()
            timing = time_requests(request, samples, candidates, warmup, n, device)
            model.train(was_training)
            texts = timing.pop("texts")
            weights_mb = model_bytes(model) / 2**20
            figures[name] = {"backbone": (teacher.cfg if name == "teacher" else self.run_cfg).backbone.name,
                             "parameters": sum(p.numel() for p in model.parameters()), "model_mb": weights_mb,
                             **timing, "peak_mb": weights_mb + timing["request_extra_mb"],
                             # generation stops at EOS: how much each model wrote bears on its latency
                             "mean_tokens_written": float(np.mean([len(tokenizer(t, add_special_tokens=False).input_ids)
                                                                   for t in texts]))}
        t, s = figures["teacher"], figures["student"]
        result = {"stage": stage.index, "stage_name": stage.name, "split": split.name, "device": str(device),
                  "teacher_run": str(self.teacher_run.run_dir), "teacher_stage": self.teacher_run.stage_dir.name,
                  "torch_threads": torch.get_num_threads(), "requests": n, "warmup": warmup,
                  "candidates_per_request": int(candidates.shape[1]), "max_new_tokens": new_tokens,
                  "request": "rank the candidates of one user, then explain the top one",
                  "memory": "model_mb = parameters + buffers; request_extra_mb = peak memory a request adds above "
                            "what was in use before (memory_kind); peak_mb = their sum",
                  "teacher": t, "student": s,
                  "ratios": {"latency_teacher_over_student": t["latency_ms"]["median"] / s["latency_ms"]["median"],
                             "memory_student_over_teacher": s["peak_mb"] / t["peak_mb"],
                             "parameters_student_over_teacher": s["parameters"] / t["parameters"]}}
        path = Path(self.run_cfg.paths.output_dir) / EFFICIENCY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        log.info("distill efficiency (%s): teacher %.1f ms, student %.1f ms per request -> %s", device,
                 t["latency_ms"]["median"], s["latency_ms"]["median"], path)
        return result

    def state_dict(self) -> dict:
        run = self.teacher_run
        return {"teacher_run": str(run.run_dir.resolve()) if run else None,
                "teacher_stage": run.stage_dir.name if run else None}
