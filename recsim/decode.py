"""`python -m recsim.decode run_dir=<run> decoder=<name> [stages=-1|all] [split=…] [eval.batch_size=…]`: decode a
finished run's stage again, after the fact, with one decoder (recsim/decoders/), e.g. L2D on a beam-decoded run.

For each chosen stage:
    model     the model as it was after that stage: `recsim.runs.load_stage` (the run's own config.yaml, its protocol
              rebuilt from the data and checked against protocol.json, the stage's weights and method state)
    decoder   the `decoder` group chosen here (conf/decoder/<name>.yaml + `decoder.<key>` overrides) put into the run's
              config as `decoder`, with eval.decoders = [that decoder] and no full ranking
    decode    `recsim.runner.evaluate_stage`, the call the run made after that stage: the decoder's `prepare`, the
              splits the run scored (or `split=`), the same result rows, bootstrap CIs and per-user ranks
    write     <run_dir>/decode/<decoder>[_<suffix>]/stage_NN/: results.csv, ranks.npz, config.yaml (the config it
              was decoded under, with a `decode` node saying what, from where and how long), DONE; built in a
              temporary folder and renamed into place, so a folder without DONE is never left behind as complete

Choices:
- The run's settings a decode may change are the ones listed in recsim/conf/decode.yaml (how it decodes or
  reports: batch sizes, beam width, cut-offs, the device); null keeps the run's. Every other setting is the run's.
- The suffix: `tag=` if given, else a hash of the settings that differ from the decoder's defaults and from the run
  (none: no suffix), so a decode with other settings never replaces another's. Where the data or cache lie and the
  progress bar are left out of it.
- A complete output folder is not decoded again (its table is printed) unless force=true.
- Nothing the run wrote is overwritten. What a decoder derives from a stage is kept where a run with that decoder
  keeps it, in the stage's folder, and reused from there (L2D's memory, the ID head: fingerprinted files).
- A decode folder reads like a run for `recsim.tables` (config.yaml, results.csv, DONE): its rows carry the run's
  identity and cfg.* columns, plus `cfg.decode` (the output folder's name) and `cfg.<key>` of every setting changed
  here, so they are told apart from the run's own rows of the same decoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from recsim.schema import ConfigError, validate

DECODE_CONF = Path(__file__).resolve().parent / "conf" / "decode.yaml"
INFERENCE_SECTIONS = ("eval", "recipe", "trainer", "dataset", "paths")  # decode.yaml's run settings
UNHASHED = ("trainer.progress_bar", "dataset.data_dir", "paths.cache_dir")  # where things are, not what is decoded
IDENTITY = ("dataset", "method", "backbone", "recipe", "protocol", "seed")  # the runner's per-run columns


class DecodeError(ValueError):
    """A bad run_dir, stage, split or decoder for this run; raised before any model is built."""


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# ---- what is decoded ----------------------------------------------------------------------------------------
def finished_stages(run_dir: Path) -> dict[int, Path]:
    """{stage index: its folder} of the run's finished stages; a bad run_dir is refused."""
    from recsim.runs import stage_dirs

    if not run_dir.is_dir():
        raise DecodeError(f"run_dir={run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise DecodeError(f"run_dir={run_dir}: no config.yaml, not a recsim run directory")
    done = {int(p.name[:2]): p for p in stage_dirs(run_dir)}
    if not done:
        raise DecodeError(f"run_dir={run_dir}: no finished stage (stages/NN_name/DONE)")
    return done


def chosen_stages(stages, finished: dict[int, Path]) -> list[int]:
    """`stages`: the index of a finished stage (negative: from the end), a list of them, or `all`; in stage order."""
    indices = sorted(finished)
    if stages == "all":
        return indices
    given = stages if isinstance(stages, list) else [stages]
    if not given or not all(isinstance(s, int) and not isinstance(s, bool) for s in given):
        raise DecodeError(f"stages={stages!r}: expected an integer (negative: from the end), a list of them, or all")
    wanted = [indices[s] if -len(indices) <= s < 0 else s for s in given]
    missing = [s for s, w in zip(given, wanted) if w not in finished]
    if missing:
        raise DecodeError(f"stages={stages}: {missing} not a finished stage of this run (finished: {indices})")
    return sorted(set(wanted))


def inference_overrides(cfg: DictConfig) -> dict:
    """{dotted key: value} of decode.yaml's run settings given a value (null: the run's own). A key added to them
    with `+` is refused: decode.yaml lists what a decode may change."""
    shipped = OmegaConf.load(DECODE_CONF)
    declared = _leaves({s: OmegaConf.to_container(shipped[s]) for s in INFERENCE_SECTIONS})
    given = _leaves({s: OmegaConf.to_container(cfg[s], resolve=True) for s in INFERENCE_SECTIONS if s in cfg})
    extra = sorted(set(given) - set(declared))
    if extra:
        raise DecodeError(f"{', '.join(extra)}: not a setting a decode may change; the run's config decides it "
                          f"(those that may change: {', '.join(declared)})")
    return {k: v for k, v in given.items() if v is not None}


def dotlist(settings: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]  # JSON is YAML: lists, strings, null survive


def apply_decoder(cfg: DictConfig, decoder: dict) -> DictConfig:
    """The run's config set to decode with `decoder` alone (its group replaces the run's, never merges into it)."""
    with open_dict(cfg):
        cfg.decoder = decoder
        cfg.eval.decoders = [decoder["name"]]
        cfg.eval.full_ranking = False  # a classic model's full ranking is not this decoder's
    return cfg


def changed_settings(decoder: dict, run_cfg: DictConfig, overrides: dict) -> dict:
    """The decoder's settings that differ from conf/decoder/<name>.yaml, and the overrides that differ from the run."""
    from recsim.decoders.base import DECODER_CONF

    path = DECODER_CONF / f"{decoder['name']}.yaml"
    defaults = _leaves(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {"name": decoder["name"]}
    missing = object()
    changed = {f"decoder.{k}": v for k, v in _leaves(decoder).items() if defaults.get(k, missing) != v}
    changed.update({k: v for k, v in overrides.items()
                    if k not in UNHASHED and _plain(OmegaConf.select(run_cfg, k, default=missing)) != v})
    return changed


def output_name(name: str, changed: dict, tag: str | None) -> str:
    if tag:
        return f"{name}_{tag}"
    if not changed:
        return name
    return f"{name}_{hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def check_decoder(cfg: DictConfig, name: str) -> None:
    """The decoder exists and this run's model can be decoded by it (the recipe sections a decoder reads are the
    schema's check); evaluate_stage would skip an LLM decoder on a classic model without a word."""
    from recsim.decoders import DECODERS

    if name not in DECODERS:
        raise DecodeError(f"decoder={name}: not one of {', '.join(DECODERS)}")
    if DECODERS[name].llm_only and cfg.backbone.kind != "llm":
        raise DecodeError(f"decoder={name} needs an LLM backbone; this run's is {cfg.backbone.name} "
                          "(decoder=candidates ranks a classic model's candidates)")


def split_names(split) -> list[str] | None:
    if split is None:
        return None
    names = [split] if isinstance(split, str) else _plain(split)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DecodeError(f"split={split!r}: expected null, a split name or a non-empty list of names")
    return names


def decodable_splits(run_dir: Path, stage: int) -> list[str] | None:
    """The split names `split=` may name at `stage`, from the run's protocol.json (None: no protocol.json)."""
    path = run_dir / "protocol.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    own = next((s["eval_split"] for s in saved.get("stages", []) if s.get("index") == stage), None)
    valid = [n for n in saved.get("valid_splits", {}) if own is not None and n == f"{own}_valid"]
    return [*saved.get("splits", {}), *valid]


def restrict_splits(cfg: DictConfig, protocol, stage, names: list[str]):
    """The protocol with only the named splits, and a config that scores all of them: test splits by name, and the
    stage's own validation split (`<its split>_valid`), the one evaluate_stage scores."""
    valid = protocol.valid_splits.get(stage.eval_split)
    known = [*protocol.splits, *([valid.name] if valid is not None else [])]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DecodeError(f"split={names}: {', '.join(unknown)} not a split stage {stage.index} can decode "
                          f"(choose from {', '.join(known)})")
    tests = {n: s for n, s in protocol.splits.items() if n in names}
    valids = {stage.eval_split: valid} if valid is not None and valid.name in names else {}
    with open_dict(cfg):
        cfg.eval.all_splits, cfg.eval.validation = True, bool(valids)
    return dataclasses.replace(protocol, splits=tests, valid_splits=valids)


# ---- one stage ----------------------------------------------------------------------------------------------
def identity_columns(stage_dir: Path, cfg: DictConfig) -> dict:
    """The run's own per-run columns (identity and cfg.*), as its stage's results.csv has them."""
    import pandas as pd

    path = stage_dir / "results.csv"
    if path.is_file():
        frame = pd.read_csv(path, nrows=1, dtype=str, keep_default_na=False)  # cfg.* values as the run wrote them
        if len(frame):
            return {c: frame[c].iloc[0] for c in frame.columns if c in IDENTITY or c.startswith("cfg.")}
    return {"dataset": cfg.dataset.name, "method": cfg.method.name, "backbone": cfg.backbone.name,
            "recipe": cfg.recipe.name, "protocol": cfg.stage.name, "seed": cfg.seed}


def decode_stage(run_dir: Path, index: int, overrides: dict, decoder: dict, splits: list[str] | None, out: Path,
                 changed: dict, columns: dict) -> "pd.DataFrame":
    """Decode stage `index` of the run into `out` (atomically); returns its result rows, which carry `columns`."""
    import pandas as pd

    from recsim.results import RANKS_FILE, save_ranks, write_results
    from recsim.runner import evaluate_stage
    from recsim.runs import load_stage
    from recsim.utils.io import publish_dir, write_text

    try:
        loaded = load_stage(run_dir, index, dotlist(overrides))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # the data or protocol moved on since the run
        raise DecodeError(f"run_dir={run_dir}, stage {index}: {exc}") from None
    cfg = apply_decoder(loaded.cfg, decoder)
    protocol = restrict_splits(cfg, loaded.protocol, loaded.stage, splits) if splits else loaded.protocol
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp)  # anything written under the run's output dir lands in the decode
        start = time.perf_counter()
        rows, ranks = evaluate_stage(cfg, protocol, loaded.rec, loaded.method, loaded.stage,
                                     stage_dir=loaded.stage_dir)
        seconds = time.perf_counter() - start
        frame = pd.DataFrame([{**columns, **r} for r in rows])
        write_results(tmp / "results.csv", frame)
        save_ranks(tmp / RANKS_FILE, ranks)
        record = OmegaConf.to_container(cfg, resolve=True)
        record["paths"]["output_dir"] = str(out)
        record["decode"] = {"run_dir": str(run_dir), "stage": loaded.stage.index, "stage_name": loaded.stage.name,
                            "decoder": decoder["name"], "folder": out.parent.name, "overrides": overrides,
                            "changed": changed,
                            "splits": sorted(frame.split.unique().tolist()) if len(frame) else [],
                            "decode_seconds": seconds, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text(tmp / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record)))
        write_text(tmp / "DONE", "")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    return frame


def summary(frame, title: str, cfg: DictConfig) -> str:
    """A short markdown table per split: groups × the run's table metrics (mean [95% CI]), then the decoder's
    counts (invalid and short-list shares, L2D's memory figures)."""
    from recsim.results import frame_markdown

    metrics = [m for m in cfg.eval.table_metrics if m in set(frame.metric)]
    recall = sorted({m for m in frame.metric if m.startswith("Recall@")}, key=lambda m: int(m.split("@")[1]))
    metrics += recall[-1:]  # the deepest Recall the decoder's lists give
    lines = [f"## {title}", ""]
    for split, rows in frame.groupby("split", sort=False):
        shown = rows[rows.metric.isin(metrics)]
        texts = [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(shown.value, shown.ci_low, shown.ci_high)]
        table = shown.assign(text=texts).pivot_table(index="group", columns="metric", values="text", aggfunc="first")
        table = table[[m for m in metrics if m in table.columns]]
        counts = rows[rows.ci_low.isna() & ~rows.metric.isin(metrics)]
        lines += [f"### {split}", "", frame_markdown(table) if len(table) else "(no rows)", ""]
        if len(counts):
            lines += [", ".join(f"{m} = {v:.4g}" for m, v in zip(counts.metric, counts.value)), ""]
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------------------
def decode(cfg: DictConfig) -> list[Path]:
    """Every check first (run_dir, stage, settings, decoder, splits), then each chosen stage; the output folders."""
    import pandas as pd

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise DecodeError("run_dir=<a finished run's folder> is required")
    run_dir = Path(str(cfg.run_dir))
    finished = finished_stages(run_dir)
    stages = chosen_stages(_plain(cfg.stages), finished)
    splits = split_names(cfg.split)
    overrides = inference_overrides(cfg)
    decoder = OmegaConf.to_container(cfg.decoder, resolve=True)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    merged = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(dotlist(overrides)))
    validate(apply_decoder(merged, decoder))  # ConfigError naming the key, before any data or model
    check_decoder(merged, decoder["name"])
    for index in stages if splits else []:
        known = decodable_splits(run_dir, index)
        if known is not None and set(splits) - set(known):
            raise DecodeError(f"split={splits}: {', '.join(sorted(set(splits) - set(known)))} not a split stage "
                              f"{index} can decode (choose from {', '.join(known)})")
    changed = changed_settings(decoder, run_cfg, overrides)
    folder = run_dir / "decode" / output_name(decoder["name"], changed, cfg.tag)
    columns = {"cfg.decode": folder.name, **{f"cfg.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                                             for k, v in changed.items()}}
    outs = []
    for index in stages:
        out = folder / f"stage_{index:02d}"
        title = f"decoder={decoder['name']} on stage {index} ({finished[index].name[3:]}) of {run_dir}"
        if (out / "DONE").is_file() and not cfg.force:
            print(f"{out} is complete (force=true decodes it again)")
            frame = pd.read_csv(out / "results.csv")
        else:
            frame = decode_stage(run_dir, index, overrides, decoder, splits, out, changed,
                                 {**identity_columns(finished[index], run_cfg), **columns})
        print(summary(frame, title, merged))
        print(f"wrote {out}\n")
        outs.append(out)
    return outs


@hydra.main(version_base="1.3", config_path="conf", config_name="decode")
def main(cfg: DictConfig) -> None:
    try:
        decode(cfg)
    except (ConfigError, DecodeError) as exc:
        raise SystemExit(f"recsim.decode: {exc}") from None  # the message, without a traceback through Hydra


if __name__ == "__main__":
    sys.exit(main())
