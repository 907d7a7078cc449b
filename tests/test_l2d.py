"""L2D latent decoding (recsim.decoders.latent): the memory, L2D-G and L2D-L on hand-made states, the search backends,
cold items, the settings lookup and its checks, LSAT's hidden state, and runs through recsim.runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import REPO, compose
from recsim.decoders import DECODERS, build_decoder, decoder_settings
from recsim.decoders.base import DECODER_CONF
from recsim.decoders.latent import (Memory, NearestRows, encode, item_means, kept_entries, local_items,
                                    memory_samples, stage_memory)
from recsim.schema import ConfigError, config_errors, validate

GEN = ["recipe=generative", "eval.ks=[1,3,5,10]"]
TINY = ["backbone=tiny_llama", "recipe=generative", "dataset=synthetic", "dataset.simulator.num_users=40",
        "trainer.progress_bar=false", "debug=smoke"]
CPU = SimpleNamespace(module=SimpleNamespace(device=torch.device("cpu")))


def on_memory(name: str, states, targets, overrides=(), num_items: int = 6):
    """A decoder fitted on a hand-made memory (no model: fit only needs the device and the catalogue size)."""
    decoder = build_decoder(name, compose(GEN + list(overrides)))
    states = torch.as_tensor(np.asarray(states, dtype=np.float32)).to(torch.float16)
    decoder.memory = Memory(states, torch.as_tensor(targets, dtype=torch.int64), {"model": "-"}, 0.0)
    decoder.num_items = num_items
    decoder.fit(SimpleNamespace(module=CPU.module, num_items=num_items), None)
    return decoder


def lists(decoder, queries) -> list[list[int]]:
    return decoder.lists(torch.tensor(queries, dtype=torch.float32)).tolist()


def random_memory(n=60, items=12, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(items, dim, generator=g) * 3
    targets = torch.arange(n) % items + 1
    states = centres[targets - 1] + torch.randn(n, dim, generator=g)
    return states.to(torch.float16).float(), targets  # fp16-exact, as the memory stores them


# ---- L2D-G ---------------------------------------------------------------------------------------------------
STATES = [[1, 0], [3, 0], [0, 2], [0, 4], [5, 5]]
TARGETS = [1, 1, 2, 2, 4]


def test_item_representation_is_the_mean_of_its_memory_states():
    items, means, counts = item_means(torch.tensor(STATES, dtype=torch.float16), torch.tensor(TARGETS))
    assert items.tolist() == [1, 2, 4] and counts.tolist() == [2, 2, 1]
    assert means.tolist() == [[2, 0], [0, 3], [5, 5]]


def test_global_ranks_by_distance_to_the_item_means():
    # from (2, 0.5): item 1 at 0.5, item 2 at sqrt(4 + 6.25) = 3.20, item 4 at sqrt(9 + 20.25) = 5.41; 3, 5, 6 cold
    decoder = on_memory("l2d_global", STATES, TARGETS)
    assert decoder.top_k() == 10 and decoder.ks() == [1, 3, 5, 10]  # top_k null = max(eval.ks)
    assert lists(decoder, [[2, 0.5]]) == [[1, 2, 4] + [-1] * 7]  # cold items are never listed
    assert lists(decoder, [[0, 3], [5, 5]])[0][0] == 2 and lists(decoder, [[5, 5]])[0][0] == 4


def test_a_state_equal_to_an_items_representation_ranks_it_first():
    states, targets = random_memory()
    items, means, _ = item_means(states, targets)
    for name in ("l2d_global", "l2d_local"):
        decoder = on_memory(name, states, targets, num_items=12)
        assert [row[0] for row in lists(decoder, means.tolist())] == items.tolist(), name
    # L2D-L's representation depends on the state: an entry that is its item's only one is its local mean
    single = on_memory("l2d_local", [[0, 0], [9, 9], [4, 1]], [1, 1, 2], ["decoder=l2d_local", "decoder.m=2"])
    assert lists(single, [[4, 1]])[0][0] == 2


# ---- L2D-L ---------------------------------------------------------------------------------------------------
LINE = [[0, 0], [10, 0], [1, 0], [20, 0]]  # items 1, 1, 2, 3
LINE_TARGETS = [1, 1, 2, 3]


def test_local_aggregation_by_hand():
    """From 0.2: the entries at distance 0.2 (item 1), 0.8 (item 2), 9.8 (item 1), 19.8 (item 3). M = 2: item 1's
    local mean is (0, 0) -> 0.2, item 2's (1, 0) -> 0.8; globally item 1's mean is (5, 0) -> 4.8, behind item 2."""
    q = [[0.2, 0]]
    assert lists(on_memory("l2d_global", LINE, LINE_TARGETS), q)[0][:3] == [2, 1, 3]
    local = lambda *o: lists(on_memory("l2d_local", LINE, LINE_TARGETS, ["decoder=l2d_local", *o]), q)[0]
    assert local("decoder.m=2")[:3] == [1, 2, 3]  # item 3 after, by its global distance
    assert local("decoder.m=2", "decoder.local_fallback=none")[:3] == [1, 2, -1]
    assert local("decoder.m=3")[:3] == [2, 1, 3]  # item 1's local mean is now (5, 0)
    assert local("decoder.m=3", "decoder.aggregation=count")[:3] == [1, 2, 3]  # 2 entries beat 1


def test_local_items_returns_each_items_local_mean_distance():
    states = torch.tensor(LINE, dtype=torch.float32)
    items, dist = local_items(torch.tensor([[0.2, 0.0]]), torch.tensor([[0, 2, 1, -1]]), states,
                              torch.tensor(LINE_TARGETS))
    assert items.tolist() == [[2, 1, -1, -1]]  # a -1 neighbour (an approximate index's gap) is no entry
    np.testing.assert_allclose(dist[0, :2].numpy(), [0.8, 4.8], rtol=1e-6)
    assert torch.isinf(dist[0, 2:]).all()


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_local_with_m_covering_the_memory_is_global(search):
    states, targets = random_memory(n=60, items=12)
    queries = torch.randn(25, 8, generator=torch.Generator().manual_seed(3)) * 3
    common = [f"decoder.search={search}", "decoder.top_k=12"]
    glob = on_memory("l2d_global", states, targets, ["decoder=l2d_global", *common], num_items=12)
    local = on_memory("l2d_local", states, targets, ["decoder=l2d_local", "decoder.m=1000", *common], num_items=12)
    assert glob.lists(queries).tolist() == local.lists(queries).tolist()
    assert (glob.lists(queries) > 0).all()  # all 12 items, each once
    assert all(len(set(row)) == 12 for row in glob.lists(queries).tolist())


def test_cosine_similarity_picks_neighbours_by_angle():
    # from (1, 0): entry (10, 1) is far in L2 but nearly parallel; (0, 1.5) is near but at 90 degrees
    states, targets = [[10, 1], [0, 1.5]], [1, 2]
    pick = lambda sim: lists(on_memory("l2d_local", states, targets, ["decoder=l2d_local", "decoder.m=1",
                                                                      f"decoder.similarity={sim}",
                                                                      "decoder.local_fallback=none"]), [[1, 0]])[0][0]
    assert (pick("l2"), pick("cosine")) == (2, 1)


# ---- memory --------------------------------------------------------------------------------------------------
def test_memory_ratio_keeps_the_stated_share_seeded():
    assert len(kept_entries(10, 0.3, 1, 0)) == 3 and len(kept_entries(1000, 0.3, 1, 0)) == 300
    assert len(kept_entries(7, 0.5, 1, 0)) == 4  # round half up: 3.5 -> 4
    assert len(kept_entries(100, 1e-6, 1, 0)) == 1  # never empty
    assert kept_entries(50, 1.0, 1, 0).tolist() == list(range(50))
    a, b = kept_entries(1000, 0.3, 1, 0), kept_entries(1000, 0.3, 1, 0)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and len(set(a)) == 300
    assert not np.array_equal(a, kept_entries(1000, 0.3, 2, 0))
    with pytest.raises(ValueError, match="memory_ratio=0"):
        kept_entries(10, 0, 1, 0)


def test_faiss_and_torch_search_agree():
    g = torch.Generator().manual_seed(0)
    base, queries = torch.randn(500, 16, generator=g), torch.randn(40, 16, generator=g)
    d_f, i_f = NearestRows(base, "faiss").search(queries, 10)
    d_t, i_t = NearestRows(base, "torch").search(queries, 10)
    assert torch.equal(i_f, i_t)
    np.testing.assert_allclose(d_f.numpy(), d_t.numpy(), rtol=1e-4, atol=1e-4)
    exact = torch.cdist(queries, base).topk(10, largest=False).indices
    assert torch.equal(i_t, exact)
    assert NearestRows(base, "torch").search(queries, 900)[1].shape == (40, 500)  # k cut to the rows there are
    for kind in ("ivf", "hnsw"):  # past approximate_above: an approximate index, most true neighbours found
        approx = NearestRows(base, "faiss", {"approximate_above": 100, "kind": kind, "nlist": 8, "nprobe": 4})
        assert type(approx.index).__name__ == {"ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}[kind]
        _, i_a = approx.search(queries, 10)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(i_a.tolist(), exact.tolist())])
        assert recall > 0.6, (kind, recall)


def test_decoders_agree_across_search_backends():
    states, targets = random_memory(n=80, items=10, seed=4)
    queries = torch.randn(20, 8, generator=torch.Generator().manual_seed(5)) * 3
    for name in ("l2d_global", "l2d_local"):
        got = [on_memory(name, states, targets, [f"decoder={name}", f"decoder.search={s}"], num_items=10)
               .lists(queries).tolist() for s in ("faiss", "torch")]
        assert got[0] == got[1], name


# ---- through the model: the memory of a stage, cold items, reuse ----------------------------------------------
@pytest.fixture(scope="module")
def pipeline():
    from recsim.methods import build_method
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runner import build_recommender

    cfg = compose(TINY)
    prepared = prepare_protocol(cfg)
    rec = build_recommender(cfg, prepared.data)
    method = build_method(cfg.method)
    method.setup(rec, prepared.protocol)
    return SimpleNamespace(cfg=cfg, rec=rec, method=method, protocol=prepared.protocol)


class Counting:
    """The method, with every state its decode_hidden hook computes counted."""

    def __init__(self, method):
        self.method, self.rows = method, 0

    def decode_hidden(self, rec):
        inner = self.method.decode_hidden(rec)

        def hidden(ids, mask):
            self.rows += len(ids)
            return inner(ids, mask)
        return hidden


def test_memory_holds_every_training_state_through_the_method(pipeline, tmp_path):
    p = pipeline
    stage = p.protocol.stages[1]
    settings = decoder_settings(p.cfg, "l2d_global")
    counting = Counting(p.method)
    p.rec.__dict__.pop("decoder_cache", None)
    memory = stage_memory(counting, p.rec, p.protocol, stage, tmp_path, settings, seed=1)
    samples = memory_samples(p.protocol, stage, "seen")
    assert len(samples) == sum(len(v) for v in stage.cumulative_targets.values()) == len(memory) == counting.rows
    assert len(memory_samples(p.protocol, stage, "stage")) == sum(len(v) for v in stage.new_targets.values())
    assert memory.states.dtype == torch.float16 and memory.targets.tolist() == [s.target for s in samples]
    # h_j: the final-normed last-layer state at the prompt's last token, one unpadded pass
    ranker = p.rec.module.eval()
    ids = torch.tensor([ranker.prompt_ids(samples[5].history)])
    with torch.no_grad():
        direct = ranker._decode(ids, torch.ones_like(ids)).last_hidden_state[0, -1]
    torch.testing.assert_close(memory.states[5].float(), direct, rtol=1e-3, atol=1e-4)  # float16's precision
    files = list(tmp_path.glob("l2d_memory-*.safetensors"))
    assert [f.name for f in files] == [f"l2d_memory-{memory.key}.safetensors"]

    # another process: the file is loaded, no state recomputed; another ratio is another memory
    p.rec.__dict__.pop("decoder_cache", None)
    again = Counting(p.method)
    loaded = stage_memory(again, p.rec, p.protocol, stage, tmp_path, settings, seed=1)
    assert loaded.reused and again.rows == 0 and torch.equal(loaded.states, memory.states)
    assert loaded.build_seconds == pytest.approx(memory.build_seconds)
    with open_dict(settings):
        settings.memory_ratio = 0.3
    part = stage_memory(again, p.rec, p.protocol, stage, tmp_path, settings, seed=1)
    assert len(part) == round(0.3 * len(samples)) == again.rows and len(list(tmp_path.glob("l2d_memory-*"))) == 2
    # other adapter weights: a stale file is not used
    lora = next(p_ for n, p_ in p.rec.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(0.5)
    try:
        p.rec.__dict__.pop("decoder_cache", None)
        assert not stage_memory(Counting(p.method), p.rec, p.protocol, stage, tmp_path, settings, seed=1).reused
    finally:
        with torch.no_grad():
            lora.sub_(0.5)
        p.rec.__dict__.pop("decoder_cache", None)


def test_cold_items_are_reported_and_never_listed(pipeline, tmp_path):
    """memory.samples=stage at the update: only the update window's targets have entries, most items are cold."""
    p = pipeline
    stage = p.protocol.stages[1]
    split = p.protocol.splits[stage.eval_split]
    samples = split.samples["U_A"] + split.samples["U_I"]
    for name in ("l2d_global", "l2d_local", "id_head"):
        cfg = compose(TINY + [f"decoder={name}", "decoder.memory.samples=stage", "decoder.top_k=50"])
        decoder = build_decoder(name, cfg)
        decoder.prepare(p.method, p.rec, p.protocol, stage, tmp_path)
        known = set(decoder.memory.targets.tolist())
        assert 0 < len(known) < p.rec.num_items
        ranks, counts = decoder.rank(p.method, p.rec, samples, None)
        cold = [s.target not in known for s in samples]
        assert counts["cold_targets"] == sum(cold) > 0
        rows = decoder.count_rows(counts)
        assert rows["cold_items"] == p.rec.num_items - len(known)
        assert rows["cold_target_share"] == pytest.approx(sum(cold) / len(samples))
        assert rows["memory_entries"] == len(decoder.memory) and rows["memory_seconds_per_100k"] > 0
        listed = decoder.lists(encode(decoder.hidden, p.rec.module, samples, 8)).numpy()
        real = listed[listed >= 0]
        assert ((real >= 1) & (real <= p.rec.num_items)).all()  # only real items ...
        assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in listed)  # ... each once
        if name != "id_head":  # the classifier has a logit for every class; L2D has no representation for cold items
            assert set(real.tolist()) <= known
            assert all(r == -1 for r, c in zip(ranks, cold) if c)
            assert rows["short_list_share"] == 1.0  # fewer items have entries than the 50 asked for
        else:
            assert rows["id_head_train_accuracy"] >= 0 and rows["short_list_share"] == 0.0


def test_rank_before_prepare_is_refused(pipeline):
    decoder = build_decoder("l2d_global", pipeline.cfg)
    with pytest.raises(RuntimeError, match="prepare"):
        decoder.rank(pipeline.method, pipeline.rec, [], None)


# ---- settings ------------------------------------------------------------------------------------------------
def test_settings_are_the_chosen_group_else_the_files_defaults():
    chosen = compose(GEN + ["decoder=l2d_local", "decoder.m=7", "decoder.memory_ratio=0.3"])
    assert decoder_settings(chosen, "l2d_local").m == 7 and decoder_settings(chosen, "l2d_local").memory_ratio == 0.3
    for name in ("l2d_global", "id_head"):  # the others keep their files' defaults
        assert decoder_settings(chosen, name) == OmegaConf.load(DECODER_CONF / f"{name}.yaml")
    assert decoder_settings(compose(GEN), "l2d_local").m == OmegaConf.load(DECODER_CONF / "l2d_local.yaml").m
    assert decoder_settings(compose(GEN), "beam").name == "beam"  # settings in recipe.beam
    # a config saved before a setting existed still has it
    old = compose(GEN + ["decoder=l2d_local", "decoder.m=7"])
    with open_dict(old):
        del old.decoder["aggregation"]
    assert decoder_settings(old, "l2d_local").aggregation == "mean" and decoder_settings(old, "l2d_local").m == 7


def test_a_chosen_group_joins_the_decoders_that_run():
    from recsim.runner import eval_decoders

    assert eval_decoders(compose(GEN)) == ["beam"]
    assert eval_decoders(compose(GEN + ["decoder=l2d_local"])) == ["beam", "l2d_local"]
    assert eval_decoders(compose(GEN + ["decoder=l2d_local", "eval.decoders=[l2d_local,id_head]"])) == \
        ["l2d_local", "id_head"]


@pytest.mark.parametrize("option", sorted(p.stem for p in DECODER_CONF.glob("*.yaml")))
def test_every_shipped_decoder_option_validates(option):
    assert option in DECODERS
    assert config_errors(compose(GEN + [f"decoder={option}"])) == []


@pytest.mark.parametrize("overrides,message", [
    (["decoder=l2d_local", "decoder.m=0"], "decoder.m=0: expected an integer >= 1"),
    (["decoder=l2d_local", "decoder.memory_ratio=1.5"], "decoder.memory_ratio=1.5: expected a number in (0, 1]"),
    (["decoder=l2d_global", "decoder.memory_ratio=0"], "decoder.memory_ratio=0: expected a number in (0, 1]"),
    (["decoder=l2d_local", "decoder.similarity=dot"], "decoder.similarity='dot': expected one of l2, cosine"),
    (["decoder=l2d_local", "decoder.aggregation=max"], "decoder.aggregation='max': expected one of mean, count"),
    (["decoder=l2d_local", "decoder.local_fallback=random"], "decoder.local_fallback='random': expected one of"),
    (["decoder=l2d_global", "decoder.memory.samples=all"], "decoder.memory.samples='all': expected one of seen, stage"),
    (["decoder=l2d_global", "decoder.search=annoy"], "decoder.search='annoy': expected one of auto, faiss, torch"),
    (["decoder=l2d_global", "decoder.index.kind=pq"], "decoder.index.kind='pq': expected one of ivf, hnsw"),
    (["decoder=l2d_global", "decoder.top_k=0"], "decoder.top_k=0: expected null or an integer >= 1"),
    (["decoder=id_head", "decoder.train.lr=0"], "decoder.train.lr=0: expected a number > 0"),
    (["decoder=id_head", "decoder.train.epochs=0"], "decoder.train.epochs=0: expected an integer >= 1"),
    (["+decoder.name=l2d"], "decoder.name='l2d': expected one of candidates, generation, beam, grounding, l2d_global"),
    (["eval.decoders=[l2d]"], "eval.decoders=['l2d']: expected a non-empty list of"),
    (["method=lsat", "decoder=l2d_global"], "method.combine='ensemble': expected merge with the latent decoders "
                                             "l2d_global"),
    (["method=lsat", "eval.decoders=[beam,id_head]"], "method.combine='ensemble': expected merge"),
])
def test_a_bad_setting_is_named_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(GEN + overrides))
    assert message in str(err.value)


def test_the_runner_refuses_a_bad_setting_before_writing(tmp_path):
    from recsim.runner import run

    with pytest.raises(ConfigError, match="decoder.m=0"):
        run(compose(TINY + ["decoder=l2d_local", "decoder.m=0"], output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert config_errors(compose(GEN + ["method=lsat", "method.combine=merge", "decoder=l2d_global"])) == []


def test_decoder_settings_leave_the_stage_0_key_alone():
    from recsim.runner import base_stage_key

    keys = [base_stage_key(compose(TINY + o)) for o in
            ([], ["decoder=l2d_local", "decoder.m=10"], ["decoder=l2d_local", "decoder.m=50",
                                                         "decoder.memory_ratio=0.3"], ["decoder=id_head"])]
    assert all(k == keys[0] for k in keys)


# ---- LSAT ----------------------------------------------------------------------------------------------------
def test_lsat_hidden_state_is_its_merge_and_refused_for_its_ensemble():
    from test_baselines_lsat import SHORT, lsat

    def states(hidden, rec):
        ids, mask = rec.module._left_pad([[5, 6, 7, 8], [9, 10]])
        with torch.no_grad():
            return hidden(ids, mask)[:, -1]

    rec, method = lsat()
    rec.module.eval()  # no LoRA dropout
    default = states(method.decode_hidden(rec), rec)  # before the first update: the long-term adapter alone
    rec.model.set_adapter(SHORT)
    short = states(lambda i, m: rec.module._decode(i, m).last_hidden_state, rec)
    rec.model.set_adapter("default")
    assert not torch.allclose(default, short)
    method.short_ready = True
    for w, want in ((1.0, default), (0.0, short)):  # the ensemble at an end of its grid is one adapter
        method.weight = w
        torch.testing.assert_close(states(method.decode_hidden(rec), rec), want)
    assert rec.model.active_adapter == "default"
    method.weight = 0.5
    with pytest.raises(ValueError, match="combine=merge"):
        method.decode_hidden(rec)
    rec, method = lsat(["method.combine=merge"], weight=1.0)
    rec.module.eval()
    last = lambda i, m: rec.module._decode(i, m).last_hidden_state
    default = states(last, rec)
    torch.testing.assert_close(states(method.decode_hidden(rec), rec), default)  # A, B = 1·long + 0·short
    method.weight = 0.5
    merged = states(method.decode_hidden(rec), rec)
    assert not torch.allclose(merged, default) and torch.equal(states(last, rec), default)  # the model untouched


# ---- runs ----------------------------------------------------------------------------------------------------
def test_a_run_reports_every_latent_decoder_and_keeps_its_memory(tmp_path):
    """The runner in this process (the fast variant of the command-line run below)."""
    from recsim.runner import run

    out = run(compose(TINY + ["trainer.base.max_steps=2", "trainer.update.max_steps=2", "trainer.max_train_samples=16",
                              "reuse_base_stage=false", "eval.validation=false", "eval.all_splits=false",
                              "eval.kl_after_update=false", "eval.n_boot=10", "eval.decoders=[l2d_global,id_head]",
                              "decoder=l2d_local", "decoder.m=5"], tmp_path / "run"))
    df = pd.read_csv(out / "results.csv")
    for name in ("l2d_global", "l2d_local", "id_head"):
        rows = df[(df.eval_mode == name) & (df.group == "all")]
        assert {"HR@10", "NDCG@10", "memory_entries", "memory_build_seconds", "cold_target_share"} <= set(rows.metric)
        assert set(rows.candidates) == {"all"} and set(rows.stage) == {0, 1}
    for stage in sorted((out / "stages").glob("[0-9][0-9]_*")):
        assert len(list(stage.glob("l2d_memory-*.safetensors"))) == 1  # one memory shared by the three
        assert len(list(stage.glob("id_head-*.safetensors"))) == 1
        assert json.loads((stage / "decoder.json").read_text())["decoder"]["m"] == 5


def cli(args, out: Path, cache: Path | None = None):
    env = {**os.environ, "WANDB_MODE": "disabled", **({"RECSIM_CACHE": str(cache)} if cache else {})}
    proc = subprocess.run([sys.executable, "-m", "recsim.run", *args, f"hydra.run.dir={out}"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(out / "results.csv")


@pytest.mark.slow
def test_command_line_run_with_beam_and_the_latent_decoders(tmp_path):
    df = cli(TINY + ["eval.n_boot=20", "eval.validation=false", "eval.decoders=[beam,l2d_global,l2d_local,id_head]"],
             tmp_path / "run")
    for name in ("beam", "l2d_global", "l2d_local", "id_head"):
        rows = df[df.eval_mode == name]
        assert {"HR@10", "NDCG@10", "invalid_share"} <= set(rows.metric), name
    assert set(df[df.eval_mode == "l2d_local"].metric) >= {"memory_entries", "memory_seconds_per_100k", "cold_items"}
    for stage in (tmp_path / "run" / "stages").glob("[0-9][0-9]_*"):
        assert list(stage.glob("l2d_memory-*.safetensors")), stage


@pytest.mark.slow
def test_a_shared_stage_0_is_decoded_again_under_other_decoder_settings(tmp_path):
    """Decoder settings are not in the stage-0 key, so a second run reuses the first run's stage 0: its rows must be
    decoded with the second run's settings. With M above the memory size L2D-L is L2D-G, which only a re-decoded
    stage 0 shows (the first run's M = 1 lists one item: not L2D-G)."""
    common = TINY + ["eval.n_boot=20", "eval.validation=false", "eval.decoders=[l2d_global]", "decoder=l2d_local",
                     "decoder.local_fallback=none"]
    stage0 = lambda df, mode: df[(df.stage == 0) & (df.eval_mode == mode) & df.metric.str.contains("@")] \
        .set_index(["split", "group", "metric"]).value
    first = cli(common + ["decoder.m=1"], tmp_path / "a", tmp_path / "cache")
    second = cli(common + ["decoder.m=100000"], tmp_path / "b", tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "base_stage").glob("*/DONE"))) == 1  # one stage 0, trained once
    assert not stage0(first, "l2d_local").equals(stage0(first, "l2d_global"))
    pd.testing.assert_series_equal(stage0(second, "l2d_local"), stage0(second, "l2d_global"), check_names=False)
