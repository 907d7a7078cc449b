"""method=distill and the student (recsim.models.student, recsim.methods.distill, recsim.explain.teacher): the
adapter's shape and its masking of padded history, BPR and the temperature KL by hand, the combined loss's weights,
distillation lowering the student-teacher KL, greedy explanations, the teacher-run checks, and runs end to end."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from recsim.methods.distill import check_teacher_run, training_candidates
from recsim.models.student import (DistillLoss, PreferenceAggregator, RecommendationAdapter, SoftTargets,
                                   StudentRecommender, bpr_loss, distillation_kl)
from recsim.protocols.base import EncodedData, make_samples

SMALL = ["backbone=student", "backbone.dim=16", "backbone.heads=8", "backbone.ffn=32", "backbone.max_len=6",
         "backbone.dropout=0.0", "backbone.decoder.hidden=16", "backbone.decoder.heads=2", "backbone.decoder.kv_heads=1",
         "backbone.decoder.layers=1", "backbone.decoder.intermediate=32", "trainer.accelerator=cpu",
         "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def tokenizer():
    from recsim.backbones.llm import load_tokenizer

    return load_tokenizer(compose(["backbone=student"]).backbone.decoder.tokenizer, os.environ["RECSIM_CACHE"])


def planted_data(groups: int = 3, per_group: int = 6, users: int = 24, length: int = 6, seed: int = 0):
    """Each user's items come from one group only; titles name the group."""
    rng = np.random.default_rng(seed)
    seqs = {u: rng.choice(per_group, length, replace=False) + 1 + (u % groups) * per_group for u in range(users)}
    n = groups * per_group
    titles = ["<pad>"] + [f"group {(i - 1) // per_group} item {i}" for i in range(1, n + 1)]
    data = EncodedData("planted", seqs, {u: np.arange(length) for u in seqs}, titles, [""] + titles[1:],
                       [f"u{u}" for u in seqs])
    return data, make_samples(seqs, {u: list(range(1, length)) for u in seqs}, window=20)


def student(data, tokenizer, overrides=()) -> StudentRecommender:
    cfg = compose([*SMALL, *overrides])
    text = torch.from_numpy(np.random.default_rng(7).normal(size=(data.num_items + 1, 8))).float()
    return StudentRecommender(cfg, data, os.environ["RECSIM_CACHE"], 0, text=text, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------- the adapter


def test_adapter_shape_and_padded_keys_change_nothing():
    torch.manual_seed(0)
    adapter = RecommendationAdapter(dim=16, heads=8, ffn=32, dropout=0.0).eval()
    behaviour, metadata = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    padding = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = adapter(behaviour, metadata, padding)
    assert out.shape == (2, 5, 16)
    noisy = metadata.clone()
    noisy[0, :2] = 100 * torch.randn(2, 16)  # garbage at the padded keys of row 0
    torch.testing.assert_close(adapter(behaviour, noisy, padding), out)
    # the control: the same garbage unmasked does change the output
    assert not torch.allclose(adapter(behaviour, noisy, torch.zeros_like(padding)), out)


def test_aggregator_ignores_padded_states():
    torch.manual_seed(0)
    aggregate = PreferenceAggregator(16)
    states = torch.randn(1, 4, 16)
    padding = torch.tensor([[True, False, False, False]])
    noisy = states.clone()
    noisy[0, 0] = 50.0
    torch.testing.assert_close(aggregate(noisy, padding), aggregate(states, padding))
    assert not torch.allclose(aggregate(noisy, torch.zeros_like(padding)), aggregate(states, padding))


def test_user_vector_shape_and_left_padding_changes_nothing(tokenizer):
    data, _ = planted_data()
    net = student(data, tokenizer).module.net.eval()
    with torch.no_grad():
        short = net.user_vector(torch.tensor([[3, 5]]))
        padded = net.user_vector(torch.tensor([[0, 0, 3, 5], [0, 0, 0, 3]]))
        full = net.user_vector(torch.tensor([[0, 0, 0, 0, 3, 5]]))
    assert short.shape == (1, 16) and padded.shape == (2, 16)
    torch.testing.assert_close(padded[:1], short)
    torch.testing.assert_close(full, short)
    assert not torch.allclose(padded[1], short[0])  # another history, another user


# ---------------------------------------------------------------------------------------------- the losses


def test_bpr_by_hand():
    # -log σ(2 - 1) = softplus(-1) = 0.313262, -log σ(2 - 3) = softplus(1) = 1.313262
    assert float(bpr_loss(torch.tensor([2.0]), torch.tensor([[1.0, 3.0]]))) == pytest.approx(0.8132617, abs=1e-6)


def test_temperature_kl_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # row 1 at T = 0.5: p = softmax([2, 0]) = [0.880797, 0.119203], q = [0.5, 0.5]: KL = 0.327813; row 2: KL = 0
    assert float(distillation_kl(teacher, student, 0.5)) == pytest.approx(0.327813 / 2, abs=1e-6)
    assert float(distillation_kl(teacher, student, 0.5, t_squared=True)) == pytest.approx(0.327813 / 2 * 0.25,
                                                                                          abs=1e-6)
    # T = 1, uniform teacher vs student softmax([1, 0, -1]) = [0.665241, 0.244728, 0.090031]: KL = 0.308994
    kl = distillation_kl(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, -1.0]]), 1.0)
    assert float(kl) == pytest.approx(0.308994, abs=1e-6)
    assert float(distillation_kl(student, teacher, 0.5)) != pytest.approx(float(distillation_kl(teacher, student, 0.5)))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_combined_loss_weights_are_the_configs(tokenizer):
    loss = DistillLoss(**OmegaConf.to_container(compose(["method=distill"]).method.loss))
    assert (loss.rec, loss.gen, loss.kl, loss.temperature, loss.t_squared) == (1.0, 0.3, 0.5, 0.8, False)
    assert float(loss.combine({"rec": torch.tensor(2.0), "gen": torch.tensor(10.0), "kl": torch.tensor(4.0)})) == \
        pytest.approx(2 + 3 + 2)
    assert float(loss.combine({"rec": torch.tensor(2.0)})) == 2.0  # a term absent from the batch adds nothing
    # the training step's loss is that sum over the batch's raw terms
    data, samples = planted_data()
    rec = student(data, tokenizer)
    samples = samples[:4]
    cands = training_candidates(samples, data, 5, seed=0)
    rec.set_distillation(samples, SoftTargets(cands, np.random.default_rng(0).normal(size=cands.shape),
                                              ["a reason", None, "another reason", "x"]), loss)
    batch = rec.collate(samples)
    assert batch["has_text"].tolist() == [True, False, True, True] and batch["candidates"].shape == (4, 6)
    torch.manual_seed(0)
    terms = rec.module.loss_terms(batch)
    assert set(terms) == {"rec", "kl", "gen"}
    torch.manual_seed(0)
    total = rec.module.training_step(batch, 0)
    torch.testing.assert_close(total, terms["rec"] + 0.3 * terms["gen"] + 0.5 * terms["kl"])
    with pytest.raises(ValueError, match="mixes samples with and without"):
        rec.collate(planted_data()[1][:8])


def test_training_candidates_are_the_target_and_unseen_items_seeded():
    data, samples = planted_data(groups=3, per_group=10)
    rows = training_candidates(samples, data, 9, seed=3)
    assert rows.shape == (len(samples), 10) and (rows[:, 0] == [s.target for s in samples]).all()
    for s, row in zip(samples, rows):
        assert len(set(row.tolist())) == 10 and not set(row[1:]) & set(data.sequences[s.user][: s.position + 1])
    assert np.array_equal(rows, training_candidates(samples, data, 9, seed=3))
    assert not np.array_equal(rows, training_candidates(samples, data, 9, seed=4))


# ---------------------------------------------------------------------------------------------- distillation


def fit(rec, samples, tmp_path, tag: str, epochs: int = 40) -> None:
    import lightning

    from recsim.runner import train

    lightning.seed_everything(0, verbose=False)
    optim = OmegaConf.create({"lr": 1e-2, "epochs": epochs, "max_steps": None})
    train(rec.cfg, rec, samples, optim, 64, 0, tmp_path, tag)


def kl_to(rec, samples, targets: SoftTargets) -> float:
    scores = rec.score_candidates(samples, targets.candidates, 64)
    return float(distillation_kl(torch.from_numpy(targets.teacher_scores), torch.from_numpy(scores), 0.8))


def test_distillation_lowers_the_student_teacher_kl(tokenizer, tmp_path):
    """A fixed teacher that prefers some negatives over the target: the KL term pulls the student to it, BPR alone
    does not."""
    data, samples = planted_data()
    cands = training_candidates(samples, data, 7, seed=0)
    teacher = 3 * np.random.default_rng(1).normal(size=cands.shape)
    targets = SoftTargets(cands, teacher, [None] * len(samples))
    after = {}
    for name, loss in (("distill", DistillLoss(rec=0.0, gen=0.0, kl=1.0)), ("bpr", DistillLoss(kl=0.0, gen=0.0))):
        rec = student(data, tokenizer)
        before = kl_to(rec, samples, targets)
        rec.set_distillation(samples, targets, loss)
        fit(rec, samples, tmp_path, name)
        after[name] = kl_to(rec, samples, targets)
    assert after["distill"] < 0.5 * before, (before, after)
    assert after["distill"] < 0.5 * after["bpr"], (before, after)


def test_scoring_paths_agree_and_save_load_round_trips(tokenizer, tmp_path):
    data, samples = planted_data()
    rec = student(data, tokenizer)
    cands = training_candidates(samples, data, 5, seed=0)
    full = rec.score_all(samples)
    assert full.shape == (len(samples), data.num_items + 1) and np.isneginf(full[:, 0]).all()
    np.testing.assert_allclose(rec.score_candidates(samples, cands, 7), np.take_along_axis(full, cands, 1), rtol=1e-5,
                               atol=1e-6)
    rec.save(tmp_path)
    other = student(data, tokenizer, ["backbone.seed=5"])
    assert not np.allclose(other.score_all(samples)[:, 1:], full[:, 1:])
    other.load(tmp_path)
    np.testing.assert_array_equal(other.score_all(samples), full)
    assert other.explain(samples[:3], [1, 2, 3], 6) == rec.explain(samples[:3], [1, 2, 3], 6)


def test_explanations_are_greedy_generation_from_the_prefix(tokenizer):
    data, samples = planted_data()
    rec = student(data, tokenizer)
    decoder, net = rec.module.decoder.eval(), rec.module.net.eval()
    with torch.no_grad():
        history = rec.collate(samples[:3])["history"]
        user, item = net.user_vector(history), net.item_vectors(torch.tensor([2, 4, 6]))
        prefix = decoder.prefix(user, item)
        reference = decoder.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(3, 2, dtype=torch.long),
                                        max_new_tokens=7, do_sample=False, eos_token_id=decoder.eos_id,
                                        pad_token_id=decoder.pad_id).tolist()
    written = decoder.generate(user, item, 7)
    assert [r[: len(w)] for r, w in zip(reference, written)] == written and all(len(w) <= 7 for w in written)
    texts = rec.explain(samples[:3], [2, 4, 6], 7)
    assert texts == [tokenizer.decode(w, skip_special_tokens=True).strip() for w in written]


def test_the_teacher_text_is_what_the_decoder_learns(tokenizer, tmp_path):
    """L_gen alone, one explanation for every sample: the decoder ends up writing it."""
    data, samples = planted_data(users=6)
    rec = student(data, tokenizer)
    reason = " it matches the group"
    cands = training_candidates(samples, data, 3, seed=0)
    rec.set_distillation(samples, SoftTargets(cands, np.zeros(cands.shape), [reason] * len(samples)),
                         DistillLoss(rec=0.0, gen=1.0, kl=0.0))
    fit(rec, samples, tmp_path, "gen", epochs=60)
    assert rec.explain(samples[:2], [s.target for s in samples[:2]], 12) == [reason.strip()] * 2


# ---------------------------------------------------------------------------------------------- teacher explanations


def test_explanation_prompt_by_hand():
    from recsim.explain.teacher import explanation_prompt, explanation_settings

    settings = explanation_settings(OmegaConf.create({"prompt": "H:\n{history}\nI: {item}", "max_history": 2,
                                                      "max_title_words": 2}))
    text = explanation_prompt(["Old Thing Here", "Red Lipstick Matte", "Blue Boots"], "Green Hat Large", settings)
    assert text == "H:\n1. Red Lipstick\n2. Blue Boots\nI: Green Hat"
    with pytest.raises(ValueError, match=r"containing \{item\}"):
        explanation_settings(OmegaConf.create({"prompt": "{history} only"}))


def test_teacher_explanations_are_batched_greedy_and_deduplicated():
    from recsim.decoders.grounding import free_generation
    from recsim.explain.teacher import explanation_prompt, explanation_settings, first_line, generate_explanations
    from recsim.models.recommender import LLMRecommender

    data, samples = planted_data()
    cfg = compose(["backbone=tiny_llama"])
    rec = LLMRecommender(cfg, data, os.environ["RECSIM_CACHE"], seed=0)
    chosen = [samples[0], samples[5], samples[0], samples[9]]
    items = [3, 7, 3, 11]
    settings = OmegaConf.create({"max_new_tokens": 6, "batch_size": 2})
    texts = generate_explanations(rec, chosen, items, settings)
    assert len(texts) == 4 and texts[0] == texts[2] and all(isinstance(t, str) for t in texts)
    assert generate_explanations(rec, chosen, items, settings) == texts
    full = explanation_settings(settings)
    prompt = explanation_prompt([data.titles[i] for i in samples[5].history], data.titles[7], full)
    ids = rec.tokenizer(prompt, add_special_tokens=False).input_ids
    written = free_generation(rec.module, [ids], 6, 1)[0]
    assert texts[1] == first_line(rec.tokenizer.decode(written, skip_special_tokens=True))


# ---------------------------------------------------------------------------------------------- the teacher run


def fake_run(folder, overrides, done: bool = True, stages=("00_base",)):
    """A run folder as recsim writes one: its resolved config.yaml, finished stages, DONE."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose(overrides), resolve=True))
    for name in stages:
        (folder / "stages" / name).mkdir(parents=True)
        (folder / "stages" / name / "DONE").write_text("")
    if done:
        (folder / "DONE").write_text("")
    return folder


def student_cfg(run_dir, *overrides):
    return compose(["backbone=student", "method=distill", f"teacher.run_dir={run_dir}", *overrides])


def test_a_finished_llm_run_on_the_same_data_is_accepted(tmp_path):
    run = fake_run(tmp_path / "t", ["backbone=tiny_llama"], stages=("00_base", "01_update1"))
    assert check_teacher_run(student_cfg(run)).stage_dir.name == "01_update1"
    assert check_teacher_run(student_cfg(run, "teacher.stage=0")).stage_index == 0


@pytest.mark.parametrize("teacher, done, student, message", [
    (None, True, [], "teacher.run_dir=.*: no such folder"),
    (["backbone=tiny_llama"], False, [], "the run is not finished"),
    (["backbone=sasrec"], True, [], "the teacher must be an LLM recommender"),
    (["backbone=tiny_llama"], True, ["teacher.stage=3"], "teacher.stage=3: .* has 1 finished stage"),
    (["backbone=tiny_llama", "dataset.simulator.num_users=50"], True, [], "another dataset .*simulator.num_users"),
    (["backbone=tiny_llama", "stage=leave_one_out"], True, [], "another protocol"),
], ids=["missing", "unfinished", "not_an_llm", "no_such_stage", "other_dataset", "other_protocol"])
def test_bad_teacher_runs_are_refused_naming_teacher_run_dir(tmp_path, teacher, done, student, message):
    run = tmp_path / "t" if teacher is None else fake_run(tmp_path / "t", teacher, done=done)
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError), match=message):
        check_teacher_run(student_cfg(run, *student))


def test_config_errors_name_teacher_run_dir_and_the_backbone():
    from recsim.schema import config_errors

    for student in (["backbone=student"], []):  # method=distill chooses the student backbone itself
        assert config_errors(compose([*student, "method=distill"])) == [
            "teacher.run_dir=null: expected the folder of a finished recsim run of an LLM recommender (method=distill "
            "distils it)"]
    assert config_errors(compose(["method=distill", "teacher.run_dir=/x"])) == []
    assert config_errors(compose(["method=distill", "backbone=tiny_llama", "teacher.run_dir=/x"])) == [
        "backbone.kind='llm': expected student with method=distill (backbone=student)"]
    assert config_errors(compose(["backbone=student", "method=distill", "teacher.run_dir=/x",
                                  "method.loss.temperature=0"])) == ["method.loss.temperature=0: expected a number > 0"]
    errors = config_errors(compose(["backbone=student", "method=distill", "teacher.run_dir=/x", "backbone.heads=3",
                                    "method.explanation.prompt=why"]))  # relations, once every key has its type
    assert "backbone.heads=3: expected a divisor of backbone.dim=256" in errors
    assert "method.explanation.prompt='why': expected a string containing {item}" in errors


def test_an_unfinished_teacher_stops_the_run_before_any_training(tmp_path):
    from recsim.runner import run

    teacher = fake_run(tmp_path / "t", ["backbone=tiny_llama", "dataset.simulator.num_users=40"], done=False)
    out = tmp_path / "student"
    cfg = compose(["backbone=student", "method=distill", f"teacher.run_dir={teacher}", "trainer.accelerator=cpu",
                   "dataset.simulator.num_users=40"], out)
    with pytest.raises(RuntimeError, match=f"teacher.run_dir={teacher}: the run is not finished"):
        run(cfg)
    assert not (out / "stages").exists() and not (out / "logs").exists()


# ---------------------------------------------------------------------------------------------- end to end


def launch(args, out):
    proc = subprocess.run([sys.executable, "-m", "recsim.run", *args, f"hydra.run.dir={out}"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


DATA = ["debug=smoke", "dataset.simulator.num_users=40", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    launch(["method=finetune", "backbone=tiny_llama", *DATA], out)
    return out


@pytest.mark.slow  # ~50 s: a tiny_llama teacher run, then two distill runs through `python -m recsim.run`
def test_distill_run_end_to_end_and_its_cache(teacher_run, tmp_path):
    out = tmp_path / "student"
    args = ["method=distill", "backbone=student", *DATA, f"teacher.run_dir={teacher_run}", "backbone.epochs=2",
            "method.explanation.max_new_tokens=8", "method.efficiency.requests=2", "method.efficiency.warmup=1"]
    launch(args, out)
    df = pd.read_csv(out / "results.csv")
    assert set(df.method) == {"distill"} and set(df.backbone) == {"student"}
    quality = df[(df.metric == "NDCG@10") & (df.group == "all") & (df.split == "round1")]
    assert set(quality.eval_mode) == {"candidates", "full"} and sorted(quality.stage.unique()) == [0, 1]
    assert (df[df.metric == "changed_params"].value > 0).all()

    eff = json.loads((out / "efficiency" / "distill.json").read_text())
    assert eff["device"] == "cpu" and eff["requests"] == 2 and eff["candidates_per_request"] == 30
    for model in ("teacher", "student"):
        figures = eff[model]
        assert figures["latency_ms"]["median"] > 0 and len(figures["latency_ms"]["runs"]) == 2
        assert figures["model_mb"] > 0 and figures["peak_mb"] >= figures["model_mb"] and figures["parameters"] > 0
    assert eff["teacher"]["backbone"] == "tiny_llama" and eff["ratios"]["latency_teacher_over_student"] > 0

    # the teacher's targets, one cache entry per stage: every training sample's 1 + 29 list and explanation
    train = df[df.metric == "train_samples"].set_index("stage").value
    for stage in (0, 1):
        (entry,) = (out / "distill").glob(f"stage{stage:02d}-*.json")
        saved = json.loads(entry.read_text())
        assert len(saved["explanations"]) == train[stage] and saved["material"]["teacher"]["stage"] == "01_update1"
        import safetensors.numpy

        arrays = safetensors.numpy.load_file(str(entry.with_suffix(".safetensors")))
        assert arrays["candidates"].shape == (train[stage], 30) and np.isfinite(arrays["teacher_scores"]).all()

    # the same run again from its cache: no teacher loaded for the targets, the very same student
    for name in ("DONE", "results.csv", "results.md", "stages", "logs", "efficiency"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = launch([*args[:-2], "method.efficiency.enabled=false"], out)
    assert (again.stdout + again.stderr).count("teacher scores and explanations of stage") == 2
    rerun = pd.read_csv(out / "results.csv")
    pick = lambda frame: frame[frame.eval_mode != "-"].reset_index(drop=True)
    pd.testing.assert_frame_equal(pick(rerun).drop(columns=[c for c in rerun if c.startswith("cfg.")]),
                                  pick(df).drop(columns=[c for c in df if c.startswith("cfg.")]))
