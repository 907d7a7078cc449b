"""`python -m recsim.decode`: a finished run decoded again after the fact.

Fast tests (no model): the checks that stop a bad run_dir / stages / split / setting / decoder before any work, the
output folder's name, and the atomic write (a failing decode leaves nothing behind; a finished one is complete), on a
hand-made run folder with the decode itself stubbed. Slow tests: a tiny generative run trained once through
`python -m recsim.run`, then decoded through `python -m recsim.decode` (subprocesses): beam at stages 0 and -1 gives
the run's own rows, CIs and per-user ranks; the run's files are untouched; a complete folder is not decoded again;
the latent decoders through a Hydra sweep.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from recsim.decode import (DecodeError, changed_settings, chosen_stages, decode, inference_overrides,
                           output_name)
from recsim.schema import ConfigError

TINY = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "recipe=generative",
        "eval.n_boot=20", "trainer.progress_bar=false"]


def compose_decode(overrides: list[str]):
    """The config `python -m recsim.decode <overrides>` sees."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="decode", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture()
def fake_run(tmp_path):
    """A run folder as the runner leaves it, without weights: config.yaml, two finished stages (one results row
    each, for the identity columns), an unfinished third."""
    run = tmp_path / "run"
    cfg = compose(TINY, run)
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for name in ("00_base", "01_update1", "02_update2"):
        (run / "stages" / name).mkdir(parents=True)
        pd.DataFrame([{"dataset": "synthetic", "method": "finetune", "backbone": "tiny_llama", "recipe": "generative",
                       "protocol": "two_period", "seed": 1, "cfg.recipe": "generative"}]).to_csv(
            run / "stages" / name / "results.csv", index=False)
    for name in ("00_base", "01_update1"):
        (run / "stages" / name / "DONE").write_text("")
    return run


# ---- checks before any work ---------------------------------------------------------------------------------
def test_stages_resolve_from_the_end_and_unfinished_ones_are_refused(fake_run):
    finished = {0: Path("a"), 1: Path("b")}
    assert chosen_stages(-1, finished) == [1] and chosen_stages(0, finished) == [0]
    assert chosen_stages("all", finished) == [0, 1] and chosen_stages([-1, 0, 1], finished) == [0, 1]
    with pytest.raises(DecodeError, match=r"stages=2: \[2\] not a finished stage of this run \(finished: \[0, 1\]\)"):
        chosen_stages(2, finished)
    with pytest.raises(DecodeError, match=r"stages=-3"):
        chosen_stages(-3, finished)
    with pytest.raises(DecodeError, match="stages='last': expected an integer"):
        chosen_stages("last", finished)
    # the unfinished stage 02 of the folder is not decodable
    with pytest.raises(DecodeError, match=r"\[2\] not a finished stage"):
        decode(compose_decode([f"run_dir={fake_run}", "decoder=beam", "stages=2"]))


@pytest.mark.parametrize("make, message", [
    (lambda run: run.parent / "nowhere", "no such directory"),
    (lambda run: run / "stages", "no config.yaml, not a recsim run directory"),
])
def test_a_bad_run_dir_is_refused(fake_run, make, message):
    with pytest.raises(DecodeError, match=message):
        decode(compose_decode([f"run_dir={make(fake_run)}", "decoder=beam"]))


def test_a_run_without_finished_stages_is_refused(fake_run):
    for done in fake_run.glob("stages/*/DONE"):
        done.unlink()
    with pytest.raises(DecodeError, match=r"no finished stage \(stages/NN_name/DONE\)"):
        decode(compose_decode([f"run_dir={fake_run}", "decoder=beam"]))


def test_a_missing_run_dir_or_decoder_is_refused(fake_run):
    with pytest.raises(DecodeError, match="run_dir=<a finished run's folder> is required"):
        decode(compose_decode(["decoder=beam"]))
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises((ConfigCompositionException, MissingConfigException), match="decoder"):
        compose_decode([f"run_dir={fake_run}"])  # the group is required: Hydra lists the options
    with pytest.raises((ConfigCompositionException, MissingConfigException), match="nope"):
        compose_decode([f"run_dir={fake_run}", "decoder=nope"])


def test_settings_are_checked_before_work(fake_run):
    base = [f"run_dir={fake_run}"]
    with pytest.raises(ConfigError, match="eval.batch_size='abc': expected an integer >= 1"):
        decode(compose_decode(base + ["decoder=beam", "eval.batch_size=abc"]))
    with pytest.raises(ConfigError, match="decoder.m=0: expected an integer >= 1"):
        decode(compose_decode(base + ["decoder=l2d_local", "decoder.m=0"]))
    # a run setting decode.yaml does not list is the run's: added with `+`, it is refused by name
    with pytest.raises(DecodeError, match="eval.negatives: not a setting a decode may change"):
        decode(compose_decode(base + ["decoder=beam", "+eval.negatives=3"]))
    with pytest.raises(DecodeError, match=r"split=\['nope'\]: nope not a split stage 1 can decode"):
        # stage 1's splits, read from the run's protocol.json
        (fake_run / "protocol.json").write_text('{"stages": [{"index": 1, "eval_split": "round1"}], '
                                                '"splits": {"round1": {}}, "valid_splits": {"round1_valid": {}}}')
        decode(compose_decode(base + ["decoder=beam", "split=nope"]))


def test_a_decoder_the_run_cannot_use_is_refused(fake_run):
    ranking = compose([t for t in TINY if not t.startswith("recipe")], fake_run)  # recipe=candidate_ranking
    (fake_run / "config.yaml").write_text(OmegaConf.to_yaml(ranking, resolve=True))
    with pytest.raises(ConfigError, match="recipe.beam is missing"):
        decode(compose_decode([f"run_dir={fake_run}", "decoder=beam"]))
    sasrec = compose([t for t in TINY if not t.startswith("backbone")] + ["backbone=sasrec"], fake_run)
    (fake_run / "config.yaml").write_text(OmegaConf.to_yaml(sasrec, resolve=True))
    with pytest.raises(DecodeError, match="decoder=l2d_global needs an LLM backbone"):
        decode(compose_decode([f"run_dir={fake_run}", "decoder=l2d_global"]))


# ---- where the output goes ----------------------------------------------------------------------------------
def test_the_output_folder_is_named_by_the_settings_that_differ(fake_run):
    run_cfg = OmegaConf.load(fake_run / "config.yaml")
    cfg = compose_decode([f"run_dir={fake_run}", "decoder=l2d_local"])
    decoder = OmegaConf.to_container(cfg.decoder)
    assert changed_settings(decoder, run_cfg, inference_overrides(cfg)) == {}
    assert output_name("l2d_local", {}, None) == "l2d_local"
    # an override equal to the run's value, and where things are, change nothing
    same = compose_decode([f"run_dir={fake_run}", "decoder=l2d_local", f"eval.batch_size={run_cfg.eval.batch_size}",
                           "trainer.progress_bar=true", "dataset.data_dir=/elsewhere"])
    assert inference_overrides(same)["dataset.data_dir"] == "/elsewhere"
    assert changed_settings(decoder, run_cfg, inference_overrides(same)) == {}
    other = compose_decode([f"run_dir={fake_run}", "decoder=l2d_local", "decoder.m=10", "eval.batch_size=3"])
    changed = changed_settings(OmegaConf.to_container(other.decoder), run_cfg, inference_overrides(other))
    assert changed == {"decoder.m": 10, "eval.batch_size": 3}
    name = output_name("l2d_local", changed, None)
    assert name.startswith("l2d_local_") and len(name) == len("l2d_local_") + 8
    assert name != output_name("l2d_local", {"decoder.m": 11, "eval.batch_size": 3}, None)
    assert output_name("l2d_local", changed, "m10") == "l2d_local_m10"


# ---- atomic output ------------------------------------------------------------------------------------------
def _stub_stage(monkeypatch, fake_run, evaluate):
    """load_stage and evaluate_stage replaced: the decode's own bookkeeping, without a model."""
    import recsim.runner
    import recsim.runs

    def load_stage(run_dir, index, overrides=None):
        cfg = OmegaConf.merge(OmegaConf.load(Path(run_dir) / "config.yaml"), OmegaConf.from_dotlist(overrides or []))
        folder = sorted((Path(run_dir) / "stages").glob(f"{index:02d}_*"))[0]
        stage = SimpleNamespace(index=index, name=folder.name[3:], eval_split="round1")
        return SimpleNamespace(cfg=cfg, rec=None, method=None, protocol=None, stage=stage, stage_dir=folder)

    monkeypatch.setattr(recsim.runs, "load_stage", load_stage)
    monkeypatch.setattr(recsim.runner, "evaluate_stage", evaluate)


ROW = {"eval_mode": "beam", "candidates": "all", "stage": 1, "stage_name": "update1", "split": "round1",
       "group": "all", "metric": "HR@1", "value": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n_users": 4}


def test_a_failing_decode_leaves_no_output(fake_run, monkeypatch):
    def evaluate(cfg, protocol, rec, method, stage, stage_dir=None):
        (Path(cfg.paths.output_dir) / "half.csv").write_text("half")  # written into the temporary folder ...
        raise RuntimeError("decoder broke")  # ... then the decode fails

    _stub_stage(monkeypatch, fake_run, evaluate)
    with pytest.raises(RuntimeError, match="decoder broke"):
        decode(compose_decode([f"run_dir={fake_run}", "decoder=beam"]))
    assert list((fake_run / "decode" / "beam").iterdir()) == []  # no stage folder, no temporary one


def test_a_finished_decode_is_complete_and_not_redone(fake_run, monkeypatch, capsys):
    calls = []

    def evaluate(cfg, protocol, rec, method, stage, stage_dir=None):
        calls.append((list(cfg.eval.decoders), cfg.decoder.name, cfg.eval.full_ranking, stage_dir))
        return [ROW], {("beam", "round1", "all"): (np.array([3, 5, 7, 9]), np.array([0, -1, 4, 2]))}

    _stub_stage(monkeypatch, fake_run, evaluate)
    [out] = decode(compose_decode([f"run_dir={fake_run}", "decoder=beam", "eval.batch_size=3"]))
    assert calls == [(["beam"], "beam", False, fake_run / "stages" / "01_update1")]
    assert out.parent.name.startswith("beam_") and out.name == "stage_01"
    assert sorted(p.name for p in out.iterdir()) == ["DONE", "config.yaml", "ranks.npz", "results.csv"]
    frame = pd.read_csv(out / "results.csv")
    # the run's identity and cfg.* columns, and what this decode changed
    assert frame["method"].tolist() == ["finetune"] and frame["cfg.recipe"].tolist() == ["generative"]
    assert frame["cfg.decode"].tolist() == [out.parent.name] and frame["cfg.eval.batch_size"].tolist() == [3]
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.decode.stage == 1 and saved.decode.changed == {"eval.batch_size": 3}
    assert saved.eval.batch_size == 3 and saved.decoder.name == "beam" and saved.paths.output_dir == str(out)
    assert "HR@1" in capsys.readouterr().out
    decode(compose_decode([f"run_dir={fake_run}", "decoder=beam", "eval.batch_size=3"]))
    assert len(calls) == 1 and "is complete" in capsys.readouterr().out
    decode(compose_decode([f"run_dir={fake_run}", "decoder=beam", "eval.batch_size=3", "force=true"]))
    assert len(calls) == 2 and (out / "DONE").is_file()


# ---- end to end ---------------------------------------------------------------------------------------------
def _cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and "decode" not in p.relative_to(run).parts}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_cli") / "run"
    _cli("recsim.run", TINY + ["eval.decoders=[beam]", "reuse_base_stage=false", f"hydra.run.dir={out}"])
    return out


@pytest.mark.slow
def test_beam_decode_reproduces_the_run_at_stages_0_and_last(finished_run):
    from recsim.results import load_ranks

    before = _digests(finished_run)
    proc = _cli("recsim.decode", [f"run_dir={finished_run}", "decoder=beam", "stages=[0,-1]"])
    assert "decoder=beam on stage 0" in proc.stdout and "decoder=beam on stage 1" in proc.stdout
    keys = ["eval_mode", "candidates", "stage", "stage_name", "split", "group", "metric"]
    for index, stage in ((0, "00_base"), (1, "01_update1")):
        out = finished_run / "decode" / "beam" / f"stage_{index:02d}"
        assert (out / "DONE").is_file()
        mine = pd.read_csv(out / "results.csv")
        theirs = pd.read_csv(finished_run / "stages" / stage / "results.csv")
        theirs = theirs[theirs.eval_mode == "beam"]
        assert len(mine) == len(theirs) > 0 and set(mine.split) == {"round1", "round1_valid"}
        both = mine.merge(theirs, on=keys, suffixes=("", "_run"), validate="one_to_one")
        assert len(both) == len(theirs)
        for col in ("value", "ci_low", "ci_high", "n_users"):  # the decode is deterministic: the same numbers
            assert np.allclose(both[col], both[f"{col}_run"], equal_nan=True, rtol=0, atol=0), col
        assert (mine["cfg.decode"] == "beam").all() and (mine.seed == theirs.seed.iloc[0]).all()
        ranks, run_ranks = load_ranks(out / "ranks.npz"), load_ranks(finished_run / "stages" / stage / "ranks.npz")
        assert set(ranks) == {k for k in run_ranks if k[0] == "beam"}
        for key, (users, r) in ranks.items():
            assert np.array_equal(users, run_ranks[key][0]) and np.array_equal(r, run_ranks[key][1])
    assert _digests(finished_run) == before  # nothing the run wrote changed
    again = _cli("recsim.decode", [f"run_dir={finished_run}", "decoder=beam", "stages=0"])
    assert "is complete" in again.stdout


@pytest.mark.slow
def test_latent_decoders_through_a_sweep(finished_run):
    before = _digests(finished_run)
    _cli("recsim.decode", ["-m", f"run_dir={finished_run}", "decoder=l2d_global,l2d_local", "split=round1",
                           f"hydra.sweep.dir={finished_run.parent / 'sweep'}"])
    for name in ("l2d_global", "l2d_local"):
        frame = pd.read_csv(finished_run / "decode" / name / "stage_01" / "results.csv")
        assert set(frame.eval_mode) == {name} and set(frame.split) == {"round1"}
        assert {"HR@10", "NDCG@10", "memory_entries", "cold_target_share"} <= set(frame.metric)
    # the memory is kept where a run with L2D keeps it, in the stage folder; nothing else of the run changed
    assert list((finished_run / "stages" / "01_update1").glob("l2d_memory-*.safetensors"))
    assert {k: v for k, v in _digests(finished_run).items() if "l2d_memory-" not in k} == before
