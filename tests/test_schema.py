"""recsim.schema: every bad value is named (key, value, what is allowed) before any work; every shipped
config and experiment validates; keys added by other parts of recsim are left alone."""

import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import REPO, compose
from recsim.schema import ConfigError, config_errors, validate, validate_against_data

CONF = REPO / "recsim" / "conf"
GROUPS = ("dataset", "backbone", "method", "stage", "recipe", "trainer", "logger", "debug")
OPTIONS = [(group, p.stem) for group in GROUPS
           for p in sorted((CONF / group).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


REQUIRED = {("dataset", "recbole"): ["dataset.folder=amazon-beauty"],  # options with a mandatory (???) key
            ("method", "distill"): ["teacher.run_dir=outputs/runs/teacher"]}  # its student needs a teacher run


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_shipped_option_validates(group, option):
    assert config_errors(compose([f"{group}={option}", *REQUIRED.get((group, option), [])])) == []


def test_distill_picks_the_student_and_needs_a_teacher():
    cfg = compose(["method=distill"])
    assert cfg.backbone.kind == "student"  # the method's defaults choose its model; backbone=... still wins
    assert compose(["method=distill", "backbone=tiny_llama"]).backbone.name == "tiny_llama"
    assert any("teacher.run_dir" in e for e in config_errors(cfg))


def test_mandatory_value_left_unset_is_named():
    if not (CONF / "dataset" / "recbole.yaml").is_file():
        pytest.skip("no option with a mandatory value")
    errors = config_errors(compose(["dataset=recbole"]))
    assert any(e.startswith("dataset.folder is missing") for e in errors), errors


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_validates(name):
    assert config_errors(compose([f"experiment={name}"])) == []


@pytest.mark.parametrize("overrides,message", [
    (["method=evorec", "method.t=1.5"], "method.t=1.5: expected a number in (0, 1]"),
    (["method=evorec", "method.t=0"], "method.t=0: expected a number in (0, 1]"),
    (["method=evorec", "method.t=abc"], "method.t='abc': expected a number in (0, 1]"),
    (["method=evorec", "method.lam=-0.1"], "method.lam=-0.1: expected a number >= 0"),
    (["method=evorec", "method.k=1.5"], "method.k=1.5: expected an integer >= 0"),
    (["method=evorec", "method.k=-1"], "method.k=-1: expected an integer >= 0"),
    (["method=evorec", "method.kl.cache_frozen=bogus"], "method.kl.cache_frozen='bogus': expected auto, true or false"),
    (["method=evorec", "method.kl.cache_frozen=1"], "method.kl.cache_frozen=1: expected auto, true or false"),
    (["method=evorec", "method.locate.rule=median"], "method.locate.rule='median': expected one of mean_cosine, vote"),
    (["method=evorec", "method.filter=caser"], "method.filter='caser': expected one of the keys of method.filters"),
    (["method=evorec", "method.filters.sasrec.batch_size=0"],
     "method.filters.sasrec.batch_size=0: expected an integer >= 1"),
    (["method=ewc", "method.fisher_samples=null"], "method.fisher_samples=null: expected an integer >= 1"),
    (["method=lsat", "method.combine=sum"], "method.combine='sum': expected one of ensemble, merge"),
    (["stage.t_quantiles=[0.8,0.6]"], "stage.t_quantiles=[0.8, 0.6]: expected a non-empty list of numbers in (0, 1), "
                                      "strictly increasing"),
    (["stage.t_quantiles=[0.5,1.0]"], "stage.t_quantiles=[0.5, 1.0]: expected a non-empty list of numbers in (0, 1)"),
    (["stage=stages", "stage.window_shares=[0.2,0.3]"], "stage.window_shares=[0.2, 0.3]: expected shares summing to "
                                                        "at most 1 - stage.first_share = 0.4"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: expected an integer >= 1"),
    (["trainer.base.lr=0"], "trainer.base.lr=0: expected a number > 0"),
    (["trainer.update.scheduler=linear"], "trainer.update.scheduler='linear': expected one of constant, cosine"),
    (["trainer.deterministic=yes"], "trainer.deterministic='yes': expected true or false"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: expected an integer >= 1"),
    (["trainer.precision=bf17"], "trainer.precision='bf17': expected null, 64, 32, 16 or one of"),
    (["eval.negatives=0"], "eval.negatives=0: expected an integer >= 1"),
    (["eval.ks=[]"], "eval.ks=[]: expected a non-empty list of integers >= 1"),
    (["eval.decoders=[ranking]"], "eval.decoders=['ranking']: expected a non-empty list of candidates, generation, beam, grounding"),
    (["eval.r_metric=NDCG@20"],
     "eval.r_metric='NDCG@20': expected HR@K, NDCG@K or Recall@K with K in eval.ks=[1, 3, 5, 10]"),
    (["dataset.k_core=-2"], "dataset.k_core=-2: expected an integer >= 0"),
    (["dataset.sample_users=0"], "dataset.sample_users=0: expected null or an integer >= 1"),
    (["dataset.simulator.drift_time=1"], "dataset.simulator.drift_time=1: expected a number in (0, 1)"),
    (["dataset.simulator.max_len=4"],
     "dataset.simulator.max_len=4: expected an integer >= dataset.simulator.min_len=8"),
    (["dataset=beauty", "dataset.folder=null"], "dataset.folder=null: expected a non-empty string"),
    (["dataset.reader=movielens"], "dataset.reader='movielens': expected one of amazon2014_staged, amazon2018, amazon2018_d3, "
                                   "mcauley2014"),
    (["method.name=replay"], "method.name='replay': expected one of base, distill, evorec"),
    (["backbone=sasrec", "backbone.heads=3"], "backbone.heads=3: expected a divisor of backbone.hidden=64"),
    (["backbone=sasrec", "backbone.model=caser"], "backbone.model='caser': expected one of bpr_mf, gru4rec, sasrec"),
    (["backbone.lora.r=0"], "backbone.lora.r=0: expected an integer >= 1"),
    (["backbone.kind=cnn"], "backbone.kind='cnn': expected one of llm, sequential"),
    (["recipe.scoring.normalize=max"], "recipe.scoring.normalize='max': expected one of mean, sum"),
    (["recipe.scoring.kernel=bogus"], "recipe.scoring.kernel='bogus': expected one of packed, kv_repeat"),
    (["seed=-1"], "seed=-1: expected an integer >= 0"),
    (["logger=wandb", "logger.mode=cloud"], "logger.mode='cloud': expected null or one of online, offline, disabled"),
])
def test_bad_value_names_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert message in str(err.value)


def test_every_bad_value_is_reported_at_once():
    errors = config_errors(compose(["method=evorec", "method.t=2", "method.k=-1", "eval.batch_size=0"]))
    assert len(errors) == 3 and {e.split("=")[0] for e in errors} == {"method.t", "method.k", "eval.batch_size"}


def test_missing_known_key_and_unresolvable_value():
    cfg = compose(["method=ewc"])
    with open_dict(cfg):
        del cfg.method["lam"]
        cfg.trainer.batch_size = "${nowhere.batch}"
    errors = config_errors(cfg)
    assert "method.lam is missing: expected a number >= 0" in errors
    assert any(e.startswith("trainer.batch_size: cannot be resolved") for e in errors)


def test_scoring_kernel_is_optional_and_matches_the_ranker():
    """Configs written before recipe.scoring.kernel still validate (the ranker defaults to packed); the schema's
    choices are the ranker's (restated there: the schema must not import torch)."""
    from recsim.models.llm_ranker import SCORING_KERNELS
    from recsim.schema import RECIPE_OPTIONAL_BY_NAME

    cfg = compose(["recipe.scoring.kernel=kv_repeat"])
    assert config_errors(cfg) == []
    with open_dict(cfg):
        del cfg.recipe.scoring["kernel"]
    assert config_errors(cfg) == []
    check = RECIPE_OPTIONAL_BY_NAME["candidate_ranking"]["recipe.scoring.kernel"]
    assert check.expected == f"one of {', '.join(SCORING_KERNELS)}"


def test_keys_added_elsewhere_are_left_alone():
    """Unknown keys inside a group and option names without a table here are not rejected."""
    cfg = compose(["method=evorec", "+method.kl.temperature=2.0", "+method.weight_grid=[1,2]",
                   "+backbone.early_stopping.patience=3", "+dataset.title_field=title", "stage.name=leave_one_out"])
    assert config_errors(cfg) == []


def test_negatives_checked_against_the_catalogue():
    cfg = OmegaConf.create({"eval": {"negatives": 29}, "dataset": {"name": "tiny"}})
    validate_against_data(cfg, num_items=30)  # 29 negatives + the positive fit
    with pytest.raises(ConfigError, match=r"eval.negatives=29: expected an integer < the catalogue size \(29 items"):
        validate_against_data(cfg, num_items=29)


def test_runner_validates_before_writing_anything(tmp_path):
    from recsim.runner import run

    with pytest.raises(ConfigError, match="method.t=1.5"):
        run(compose(["method=evorec", "method.t=1.5"], output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_command_line_fails_fast_with_the_message(tmp_path):
    out = tmp_path / "bad"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recsim.run", "method=evorec", "method.t=abc", f"hydra.run.dir={out}"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                          timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert "method.t='abc': expected a number in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 120, seconds  # nothing written (below) shows it failed before any work; wall time is load-dependent
    assert not (out / "results.csv").exists() and not (out / "DONE").exists() and not (out / "config.yaml").exists()
