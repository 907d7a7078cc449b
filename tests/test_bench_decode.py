"""`python -m recsim.bench decode`: every decoder's row and figures on a fresh tiny model (beam, grounding, candidates,
L2D-G, L2D-L, the ID head: speed-ups against beam@10, the memory built once outside the timed region), a decoder
that is not registered skipped, a finished tiny run's stage through bench.run_dir (its figures against the decoder
called directly), and bad bench.* values.

The CLI's `main` is called in this process (the subprocess path is the one tests/test_bench.py runs), so the
imports are paid once for the whole file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import compose
from recsim.bench.__main__ import main
from recsim.bench.decode import DECODERS, LONG_LIST
from recsim.bench.settings import DEFAULTS, split_overrides
from recsim.schema import ConfigError

TINY = ["backbone=tiny_llama", "recipe=generative", "dataset=synthetic", "dataset.simulator.num_users=40",
        "trainer.progress_bar=false"]


def decode(args: list[str], capsys, out) -> tuple[dict, str]:
    assert main(["decode", *args, f"bench.out={out}"]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-stage tiny generative run, a few optimiser steps per stage, candidates scoring only."""
    from recsim.runner import run

    out = tmp_path_factory.mktemp("decode") / "run"
    run(compose(TINY + ["debug=smoke", "trainer.base.max_steps=2", "trainer.update.max_steps=2",
                        "trainer.max_train_samples=16", "reuse_base_stage=false", "eval.validation=false",
                        "eval.all_splits=false", "eval.kl_after_update=false", "eval.full_ranking=false",
                        "eval.n_boot=10", "eval.negatives=4"], out))
    return out


def test_every_decoder_has_a_row_and_its_figures(tmp_path, capsys):
    record, printed = decode(TINY + ["bench.users=3", "bench.warmup=0", "bench.repeats=2"], capsys,
                             tmp_path / "decode.json")
    f = record["figures"]
    assert [r["label"] for r in f["decoders"]] == [label for label, _, _ in DECODERS] == DEFAULTS["decoders"]
    assert f["users"] == 3 and f["repeats"] == 2 and f["beam_size"] == 10 and f["model"].startswith("fresh")
    for r in f["decoders"]:
        assert any(line.startswith(r["label"] + " ") for line in printed.splitlines()), r["label"]
        assert len(r["seconds"]) == 2 and r["ms_per_user_min"] <= r["ms_per_user"] <= r["ms_per_user_max"]
        assert r["users_per_s"] == pytest.approx(3 / np.median(r["seconds"]))
        assert r["ms_per_user"] == pytest.approx(1000 * np.median(r["seconds"]) / 3)
        assert r["same_ranks_every_repeat"] and r["peak_mem_mb"] > 0 and r["setup_seconds"] > 0
        assert {"Recall@10", "NDCG@10"} <= set(r["metrics"])
    by = {r["label"]: r for r in f["decoders"]}
    assert by["beam@10"]["speedup_vs_beam10"] == 1.0
    assert by["grounding"]["speedup_vs_beam10"] == pytest.approx(by["beam@10"]["ms_per_user"]
                                                                 / by["grounding"]["ms_per_user"])
    assert (by["beam@10"]["pool"], by["candidates"]["pool"]) == ("all", "1+29")
    # the override reached the decoder: only the top-20 beam lists 20 items, so only it has Recall@20 ...
    assert "Recall@20" in by["beam@20"]["metrics"] and "Recall@20" not in by["beam@10"]["metrics"]
    # ... and its first 10 are the top-10 beam's (the top-10 search stops only once no alive beam can beat them)
    assert by["beam@20"]["metrics"]["NDCG@10"] == by["beam@10"]["metrics"]["NDCG@10"]
    for label in ("beam@10", "beam@20"):
        b = by[label]["beam"]
        assert b["steps"] > 0 and b["hypotheses_per_user"] >= by[label]["listed_per_user"] > 0
        assert by[label]["counts"]["invalid_share"] == 0  # a trie cannot list a non-item
        assert 0 < b["trie_share"] < 1
        assert b["trie_share"] == pytest.approx(b["trie_seconds"] / (b["trie_seconds"] + b["model_seconds"]
                                                                     + b["search_seconds"]))
        # the timer's parts are inside the decoder's wall time
        assert b["trie_seconds"] + b["model_seconds"] + b["search_seconds"] <= np.mean(by[label]["seconds"])
        assert f"{label} search" in printed
    assert by["grounding"]["beam"] is None and by["candidates"]["beam"] is None
    assert record["config"]["backbone"] == "tiny_llama"
    # the latent decoders: the speed-up column is beam@10's median time over theirs, printed beside Recall@20 / @50
    for label in ("grounding", "l2d_global", "l2d_local", "id_head"):
        r = by[label]
        assert r["speedup_vs_beam10"] == pytest.approx(by["beam@10"]["ms_per_user"] / r["ms_per_user"])
        assert r["list_length"] == LONG_LIST and {"Recall@20", "Recall@50", "NDCG@50"} <= set(r["metrics"])
        row = next(line for line in printed.splitlines() if line.startswith(label + " "))
        assert row.split()[-1] == f"{r['speedup_vs_beam10']:.3g}x"
        assert f"{r['metrics']['Recall@20']:.4f}" in row and f"{r['metrics']['Recall@50']:.4f}" in row
    assert "Recall@50" not in by["beam@20"]["metrics"]
    # one memory (stage 0's training samples), built by the first latent decoder's prepare, outside the timed region
    memories = [by[label]["memory"] for label in ("l2d_global", "l2d_local", "id_head")]
    assert all(m["built_by"] == "l2d_global" for m in memories) and len({m["entries"] for m in memories}) == 1
    m = memories[0]
    assert m["entries"] > 0 and m["build_seconds"] > 0
    assert m["seconds_per_100k"] == pytest.approx(m["build_seconds"] / m["entries"] * 1e5)
    assert by["l2d_global"]["prepare_seconds"] >= m["build_seconds"]  # prepare = the build + the item means
    assert by["beam@10"]["memory"] is None and "l2d_global memory" in printed and "built by l2d_global" in printed
    # a random-weight backbone: its quality is flagged as meaningless, in the JSON and the table
    assert f["random_weights"] is True and "Recall and NDCG are meaningless" in printed


def test_decoder_settings_reach_their_own_entry_only():
    from recsim.bench.decode import decoder_config

    cfg = compose(TINY + ["decoder=l2d_local", "decoder.m=3"])
    local = decoder_config(cfg, "l2d_local", {"decoder.top_k": LONG_LIST}).decoder
    assert (local.name, local.m, local.top_k) == ("l2d_local", 3, LONG_LIST)  # the chosen group, then the entry's
    other = decoder_config(cfg, "l2d_global", {"decoder.top_k": LONG_LIST}).decoder
    assert other.name == "l2d_global" and "m" not in other and other.top_k == LONG_LIST  # conf/decoder defaults
    assert cfg.decoder.top_k is None  # the composed config itself is left alone


def test_a_decoder_not_registered_is_skipped_and_the_others_run(tmp_path, capsys, monkeypatch):
    import recsim.decoders

    monkeypatch.delitem(recsim.decoders.DECODERS, "id_head")  # as before the ID head existed
    record, printed = decode(TINY + ["bench.users=2", "bench.warmup=0", "bench.repeats=1",
                                     "bench.decoders=[beam@10,id_head]"], capsys, tmp_path / "skip.json")
    beam, head = record["figures"]["decoders"]
    assert beam["label"] == "beam@10" and beam["speedup_vs_beam10"] == 1.0
    assert head == {"label": "id_head", "decoder": "id_head", "skipped": head["skipped"]}
    assert "'id_head' is not registered" in head["skipped"] and "skipping id_head" in printed
    with pytest.raises(SystemExit, match="every selected decoder was skipped"):
        main(["decode", *TINY, "bench.users=2", "bench.decoders=[id_head]", f"bench.out={tmp_path / 'none.json'}"])


def test_a_finished_run_stage_is_decoded_as_the_decoder_ranks_it(finished_run, tmp_path, capsys):
    from recsim.decoders import build_decoder
    from recsim.eval.metrics import per_user_metrics
    from recsim.runs import load_stage

    # only recipe.beam.* differs from the run: carried; recipe=generative agrees with the run: accepted
    record, printed = decode(["recipe=generative", "recipe.beam.beam_size=4", f"bench.run_dir={finished_run}",
                              "bench.stage=-1", "bench.decoders=[beam@10]", "bench.users=4", "bench.warmup=1",
                              "bench.repeats=1"], capsys, tmp_path / "run.json")
    f = record["figures"]
    loaded = load_stage(finished_run, -1, ["recipe.beam.beam_size=4"])
    assert f["stage"] == loaded.stage.index == 1 and f["beam_size"] == 4 and f["run_dir"] == str(finished_run)
    assert record["config"]["backbone"] == "tiny_llama" and record["config"]["dataset"] == "synthetic"
    assert f"stage 1 ({loaded.stage.name})" in printed and [r["label"] for r in f["decoders"]] == ["beam@10"]
    # reference: the decoder itself on the same first users of stage 0's test split
    split = loaded.protocol.splits[loaded.protocol.stages[0].eval_split]
    samples = [s for g, group in split.samples.items() for s in group][:4]
    ranks, _ = build_decoder("beam", loaded.cfg).rank(loaded.method, loaded.rec, samples, None)
    want = per_user_metrics(ranks, [10])
    got = f["decoders"][0]["metrics"]
    assert got["Recall@10"] == pytest.approx(want["Recall@10"].mean())
    assert got["NDCG@10"] == pytest.approx(want["NDCG@10"].mean())


def test_a_finished_run_refuses_overrides_that_change_the_model(finished_run):
    with pytest.raises(SystemExit, match="dataset.simulator.num_users=50"):
        main(["decode", "dataset.simulator.num_users=50", f"bench.run_dir={finished_run}"])
    with pytest.raises(SystemExit, match=r"bench.run_dir / bench.stage: .*stage 5 is not finished"):
        main(["decode", f"bench.run_dir={finished_run}", "bench.stage=5"])


@pytest.mark.parametrize("override, message", [
    ("bench.decoders=[beam@5]", "bench.decoders=['beam@5']: expected a non-empty list of beam@10, beam@20"),
    ("bench.decoders=[]", "bench.decoders=[]: expected a non-empty list"),
    ("bench.repeats=0", "bench.repeats=0: expected an integer >= 1"),
    ("bench.stage=last", "bench.stage='last': expected an integer"),
    ("bench.run_dir=''", "bench.run_dir='': expected null or a non-empty string"),
])
def test_bad_bench_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError) as err:
        split_overrides([override])
    assert message in str(err.value)


def test_bad_model_choices_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="bench.stage=0 needs bench.run_dir"):
        main(["decode", *TINY, "bench.stage=0"])
    with pytest.raises(SystemExit, match="bench.run_dir=.*no config.yaml"):
        main(["decode", *TINY, f"bench.run_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="recipe.beam.top_k needs recipe.beam"):  # candidate_ranking has no beam
        main(["decode", "backbone=tiny_llama", "dataset=synthetic", "dataset.simulator.num_users=40",
              "bench.decoders=[beam@10]", "bench.users=2"])
