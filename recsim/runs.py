"""Finished runs read back: `load_stage(run_dir, i)` rebuilds the model (and its method) as it was after stage i.

For decoders run after the fact, benchmarks and audits: the run's own resolved config.yaml, its protocol
rebuilt from the same data (the same users, stages and splits, checked against the run's protocol.json), the
method's state and the stage's adapters loaded exactly as a resumed run loads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@dataclass
class LoadedStage:
    cfg: DictConfig  # the run's resolved config
    rec: object  # LLMRecommender / SequentialRecommender with stage i's weights
    method: object  # the run's ContinualMethod with stage i's state (its inference hooks decode as it)
    protocol: object  # the run's protocol (stages, splits, candidates)
    stage: object  # StageData of stage i
    stage_dir: Path


def stage_dirs(run_dir: str | Path) -> list[Path]:
    """The finished stage folders of a run, in stage order."""
    return sorted(p for p in (Path(run_dir) / "stages").glob("[0-9][0-9]_*") if (p / "DONE").is_file())


def load_stage(run_dir: str | Path, index: int, overrides: list[str] | None = None) -> LoadedStage:
    """The model after stage `index` of the run in `run_dir` (negative: from the end, -1 = the last stage).
    `overrides`: dotted config overrides for inference-only settings (e.g. `eval.batch_size=64`, a device)."""
    from recsim.methods import build_method
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender, compute_device
    from recsim.utils.state import load_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: not a recsim run directory")
    done = stage_dirs(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir}: no finished stage (stages/NN_name/DONE)")
    names = {int(p.name[:2]): p for p in done}
    wanted = sorted(names)[index] if index < 0 else index
    if wanted not in names:
        raise ValueError(f"{run_dir}: stage {index} is not finished (finished: {sorted(names)})")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    prepared = prepare_protocol(cfg)
    saved = run_dir / "protocol.json"
    if saved.is_file():
        mine = json.loads(json.dumps(prepared.description, default=str))
        theirs = json.loads(saved.read_text())
        if mine.get("stages") != theirs.get("stages") or mine.get("splits") != theirs.get("splits"):
            raise RuntimeError(f"{run_dir}: the protocol rebuilt from today's data differs from the run's "
                               "protocol.json (the data or the protocol code changed since the run)")
    rec = build_recommender(cfg, prepared.data)
    method = build_method(cfg.method)
    method.setup(rec, prepared.protocol)
    stage_dir = names[wanted]
    method.load_state_dict(load_state(stage_dir))  # adapters a method adds exist before the weights are loaded
    rec.load(stage_dir)
    rec.module.to(compute_device(cfg))
    return LoadedStage(cfg, rec, method, prepared.protocol, prepared.protocol.stages[wanted], stage_dir)
