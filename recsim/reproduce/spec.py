"""Table specs and scales: loading and checking ``experiments/*.yaml`` and ``experiments/scales.yaml``.

A *table spec* is one YAML file in ``experiments/`` (see experiments/README.md): the runs of one table
of a paper (name + Hydra overrides), the metrics, user groups and efficiency figures it reports, and the
paper's own numbers. ``scales.yaml`` holds the scales (backbone, user sample, budgets, seeds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

import recsim

DEFAULT_EXPERIMENTS = Path(recsim.__file__).resolve().parents[1] / "experiments"
SCALES_FILE = "scales.yaml"
DEFAULT_OUT = Path("outputs/reproduce")

# recsim efficiency metric -> (paper_numbers key, recsim units per paper unit, unit, column label,
# reduction over the update stages). Paper tables give parameters in millions and time in minutes.
EFFICIENCY = {
    "changed_params": ("changed_params_M", 1e6, "M", "params changed (M)", "max"),
    "trainable_params": ("trainable_params_M", 1e6, "M", "trainable params (M)", "max"),
    "update_seconds": ("update_min", 60.0, "min", "update time (min, all rounds)", "sum"),
    "train_samples": ("train_samples", 1.0, "", "train samples (all rounds)", "sum"),
    "peak_mem_mb": ("peak_mem_mb", 1.0, "MB", "peak memory (MB)", "max"),
    "adapter_bytes": ("adapter_MB", 1e6, "MB", "adapters kept (MB, last stage)", "max"),
}
SPEC_KEYS = {"title", "paper", "dataset", "metrics", "groups", "efficiency", "eval_mode", "runs",
             "paper_numbers", "note", "overrides", "radar_metrics", "paper_claims", "order",
             "stage_curve"}  # fmt: skip
RUN_KEYS = {"name", "label", "overrides", "paper_source", "eval_mode", "reads", "backbone"}
RESERVED = ("dataset=", "seed=", "hydra.run.dir=")  # set by reproduce itself
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a run name is a directory name


class SpecError(ValueError):
    """A table spec or scales.yaml is malformed; the message names the file."""


# ------------------------------------------------------------------------------------------ specs


@dataclass
class RunSpec:
    name: str
    label: str
    overrides: list[str]  # spec-wide overrides first, then the run's own
    paper_source: str | None = None
    eval_mode: str | None = None  # the decoder whose rows this row reads; None: the spec's
    reads: str | None = None  # another run of the spec whose directories this row reads (no run of its own):
    # one trained model, a row per decoder
    backbone: str | None = None  # a backbone in place of the scale's (and its backbone.* settings): a classic
    # baseline (sasrec, gru4rec, alpharec) beside the scale's LLM

    @property
    def source(self) -> str:
        """The run name whose directories hold this row's results."""
        return self.reads or self.name


@dataclass
class Spec:
    key: str  # file stem: the name used by --tables and in plot file names
    path: Path
    title: str
    paper: str
    datasets: list[str]
    metrics: list[str]
    groups: list[str]
    efficiency: list[str]
    eval_mode: str
    runs: list[RunSpec]
    paper_numbers: dict[str, dict[str, float | None]]
    note: str = ""
    radar_metrics: list[str] = field(default_factory=list)
    paper_claims: list[str] = field(default_factory=list)
    order: int = 100  # position in TABLES.md (then the file name)
    stage_curve: str | None = None  # a metric plotted per stage (each stage's model on its own split), per run

    def paper_value(self, run: str, dataset: str, key: str) -> float | None:
        """The paper's number for ``key`` (``U_A/NDCG@3`` or an efficiency key), dataset-qualified first."""
        numbers = self.paper_numbers.get(run, {})
        value = numbers.get(f"{dataset}/{key}", numbers.get(key))
        return None if value is None else float(value)


@dataclass
class Scale:
    name: str
    description: str
    overrides: list[str]
    seeds: list[int]
    warning: str = ""


def _str_list(value, what: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SpecError(f"{path}: {what} must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_spec(path: str | Path) -> Spec:
    """One table spec, checked: required keys, run names, paper_numbers keys, efficiency metrics."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a table spec is a mapping, got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    missing = {"title", "paper", "dataset", "metrics", "groups", "runs"} - set(raw)
    if unknown or missing:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    common = _str_list(raw.get("overrides"), "overrides", path)
    runs, seen = [], set()
    for entry in raw["runs"] or []:
        if not isinstance(entry, dict) or not ({"name", "overrides"} <= set(entry) or {"name", "reads"} <= set(entry)) \
                or set(entry) - RUN_KEYS:
            raise SpecError(f"{path}: a run is {{name, overrides | reads[, label, paper_source, eval_mode, "
                            f"backbone]}}, got {entry!r}")
        name = str(entry["name"])
        if not NAME_RE.match(name) or name in seen:
            raise SpecError(f"{path}: run name {name!r} is repeated or not a valid directory name")
        seen.add(name)
        if "reads" in entry and "overrides" in entry:
            raise SpecError(f"{path}: run {name}: `reads` takes another run's directories, so no overrides of its own")
        own = _str_list(entry.get("overrides"), f"run {name}: overrides", path)
        reserved = [o for o in common + own if o.lstrip("+~").startswith(RESERVED)]
        if reserved:
            raise SpecError(f"{path}: run {name}: {reserved} are set by reproduce (dataset, seed, run dir)")
        runs.append(RunSpec(name, str(entry.get("label") or name), common + own, entry.get("paper_source"),
                            entry.get("eval_mode"), entry.get("reads"), entry.get("backbone")))
    if not runs:
        raise SpecError(f"{path}: no runs")
    owners = {r.name: r for r in runs if r.reads is None}
    for r in runs:
        if r.reads is not None and r.reads not in owners:
            raise SpecError(f"{path}: run {r.name} reads {r.reads!r}, not a run of this spec with overrides of its "
                            f"own ({sorted(owners)})")
        if r.reads is not None:
            r.overrides = owners[r.reads].overrides
    spec = Spec(
        key=path.stem, path=path, title=str(raw["title"]), paper=str(raw["paper"]).strip(),
        datasets=_str_list(raw["dataset"], "dataset", path), metrics=_str_list(raw["metrics"], "metrics", path),
        groups=_str_list(raw["groups"], "groups", path),
        efficiency=_str_list(raw.get("efficiency"), "efficiency", path),
        eval_mode=str(raw.get("eval_mode", "candidates")), runs=runs,
        paper_numbers=raw.get("paper_numbers") or {}, note=str(raw.get("note") or "").strip(),
        radar_metrics=_str_list(raw.get("radar_metrics"), "radar_metrics", path),
        paper_claims=_str_list(raw.get("paper_claims"), "paper_claims", path), order=int(raw.get("order", 100)),
        stage_curve=raw.get("stage_curve"),
    )  # fmt: skip
    for r in runs:  # candidates (and full, for models that rank all) are scored by default; other decoders are opt-in
        mode = r.eval_mode or spec.eval_mode
        if mode not in ("candidates", "full") and not any(
            o.startswith(("eval.decoders=", "eval.modes=", "decoder=")) and mode in o for o in r.overrides
        ):
            raise SpecError(f"{path}: run {r.name}: eval_mode {mode} needs eval.decoders=[...,{mode}] (or "
                            f"decoder={mode}) in its overrides (and run names of their own: that is another setting)")
    bad_eff = [e for e in spec.efficiency if e not in EFFICIENCY]
    if bad_eff:
        raise SpecError(f"{path}: efficiency {bad_eff} unknown; known: {sorted(EFFICIENCY)}")
    _check_paper_numbers(spec)
    return spec


def _check_paper_numbers(spec: Spec) -> None:
    """paper_numbers: {run: {key: number|null}}; key = [<dataset>/]<group>/<metric> or an efficiency key."""
    names = {r.name for r in spec.runs}
    allowed = {f"{g}/{m}" for g in spec.groups for m in spec.metrics} | {EFFICIENCY[e][0] for e in spec.efficiency}
    if not isinstance(spec.paper_numbers, dict):
        raise SpecError(f"{spec.path}: paper_numbers must map run names to numbers")
    for run, numbers in spec.paper_numbers.items():
        if run not in names:
            raise SpecError(f"{spec.path}: paper_numbers names run {run!r}, not one of the runs {sorted(names)}")
        if not isinstance(numbers, dict):
            raise SpecError(f"{spec.path}: paper_numbers[{run}] must be a mapping")
        for key, value in numbers.items():
            first, _, rest = str(key).partition("/")
            plain = rest if first in spec.datasets and rest else str(key)
            if plain not in allowed:
                raise SpecError(
                    f"{spec.path}: paper_numbers[{run}] key {key!r} is not [<dataset>/]<group>/<metric> of"
                    f" this spec nor an efficiency key; allowed: {sorted(allowed)}"
                )
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SpecError(f"{spec.path}: paper_numbers[{run}][{key}] = {value!r} is not a number or null")


def load_specs(experiments: str | Path) -> list[Spec]:
    """Every spec in ``experiments`` (all *.yaml but scales.yaml) by ``order`` then name, checked together."""
    folder = Path(experiments)
    paths = sorted(p for p in folder.glob("*.yaml") if p.name != SCALES_FILE)
    if not paths:
        raise SpecError(f"{folder}: no table specs (*.yaml besides {SCALES_FILE})")
    specs = sorted((load_spec(p) for p in paths), key=lambda s: (s.order, s.key))
    check_shared_runs(specs)
    return specs


def check_shared_runs(specs: Sequence[Spec]) -> None:
    """On each dataset a run name stands for one set of overrides, and one set of overrides for one name:
    the directory ``<dataset>/<name>_s<seed>`` is then the same computation whichever spec asks for it."""
    by_name: dict[tuple, tuple] = {}
    by_overrides: dict[tuple, tuple] = {}
    for spec in specs:
        for run in spec.runs:
            if run.reads is not None:  # it owns no directory
                continue
            canon = tuple(sorted([*run.overrides, *([f"backbone={run.backbone}"] if run.backbone else [])]))
            for ds in spec.datasets:
                where = (spec.path.name, run.name)
                old = by_name.setdefault((ds, run.name), (canon, where))
                if old[0] != canon:
                    raise SpecError(
                        f"run {run.name!r} on {ds} has overrides {list(canon)} in {where[0]} but {list(old[0])}"
                        f" in {old[1][0]}: one name, one setting (rename one of them)"
                    )
                other = by_overrides.setdefault((ds, canon), (run.name, where))
                if other[0] != run.name:
                    raise SpecError(
                        f"{where[0]} run {run.name!r} and {other[1][0]} run {other[0]!r} have the same"
                        f" overrides on {ds}: give them one name so the run is computed once"
                    )


def load_scales(experiments: str | Path) -> dict[str, Scale]:
    path = Path(experiments) / SCALES_FILE
    if not path.is_file():
        raise SpecError(f"{path}: missing (the scales of reproduce)")
    raw = yaml.safe_load(path.read_text()) or {}
    scales = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not {"overrides", "seeds", "description"} <= set(entry):
            raise SpecError(f"{path}: scale {name!r} needs description, overrides and seeds")
        seeds = entry["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SpecError(f"{path}: scale {name!r}: seeds must be a non-empty list of integers")
        scales[name] = Scale(name, str(entry["description"]).strip(), _str_list(entry["overrides"], "overrides", path),
                             seeds, str(entry.get("warning") or "").strip())
    return scales
