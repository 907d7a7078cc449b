"""recsim.results (schema, ranks file, the one markdown renderer), scipy's bootstrap in bootstrap_ci, and
the declared dependencies (every third-party import of recsim is in pyproject; wandb stays optional)."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from recsim.eval.metrics import bootstrap_ci
from recsim.results import (
    RESULT_COLUMNS,
    ResultsFileError,
    frame_markdown,
    load_ranks,
    markdown_table,
    matrix_markdown,
    read_results,
    save_ranks,
    validate,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ schema


def result_row(**change):
    row = dict(dataset="synthetic", method="base", backbone="sasrec", recipe="r", protocol="stages",
               eval_mode="candidates", candidates="1+29", seed=1, stage=0, stage_name="p0", split="p0_test",
               group="all", metric="NDCG@10", value=0.25, ci_low=0.2, ci_high=0.3, n_users=40)  # fmt: skip
    return {**row, **change}


def test_validate_names_the_file_column_row_and_value(tmp_path):
    good = pd.DataFrame([result_row(), result_row(stage=None, group="-", metric="update_seconds", value="1.5",
                                                  ci_low=None, ci_high=None, n_users=None)])
    checked = validate(good, "x.csv")
    assert checked["value"].tolist() == [0.25, 1.5]  # numeric columns converted

    cases = [
        (dict(value="abc"), r"x.csv: column 'value', row 1: 'abc' is not a number or empty"),
        (dict(seed=1.5), r"column 'seed', row 1: 1.5 is not an integer"),
        (dict(seed=None), r"column 'seed', row 1: nan is not an integer"),
        (dict(stage=0.5), r"column 'stage', row 1: 0.5 is not an integer or empty"),
        (dict(n_users=-3), r"column 'n_users', row 1: -3 is not a number >= 0 or empty"),
        (dict(metric=""), r"column 'metric', row 1 is empty"),
        (dict(ci_low=0.4, ci_high=0.3), r"row 1: ci_low 0.4 > ci_high 0.3"),
    ]
    for change, message in cases:
        bad = pd.DataFrame([result_row(), result_row(**change)])
        with pytest.raises(ResultsFileError, match=message):
            validate(bad, "x.csv")
    with pytest.raises(ResultsFileError, match=r"x.csv: missing required columns \['seed'\]"):
        validate(good.drop(columns=["seed"]), "x.csv")
    assert "candidates" in RESULT_COLUMNS and validate(good.drop(columns=["candidates"])) is not None


def test_write_results_orders_columns_and_round_trips(tmp_path):
    frame = pd.DataFrame([result_row(**{"cfg.method": "base"})])
    frame = frame[["cfg.method", *reversed(RESULT_COLUMNS)]]  # scrambled
    write_results(tmp_path / "results.csv", frame)
    back = read_results(tmp_path / "results.csv")
    assert list(back.columns) == [*RESULT_COLUMNS, "cfg.method", "run_dir"]
    assert back["run_dir"].iloc[0] == str(tmp_path)
    with pytest.raises(ResultsFileError, match="results.csv: column 'value'"):
        write_results(tmp_path / "results.csv", pd.DataFrame([result_row(value="x")]))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ResultsFileError, match="empty.csv: cannot be read as CSV"):
        read_results(tmp_path / "empty.csv")


# ------------------------------------------------------------------------------------------- ranks


def test_ranks_round_trip_and_errors(tmp_path):
    path = tmp_path / "ranks.npz"
    entries = {("candidates", "p1_test", "U_A"): ([7, 3, 9], [0, 4, 28]),
               ("generation", "p1_test", "all"): (np.array([7, 7]), np.array([-1, 2]))}  # fmt: skip
    save_ranks(path, entries)
    back = load_ranks(path)
    assert list(back) == list(entries)
    users, ranks = back[("candidates", "p1_test", "U_A")]
    assert users.dtype == ranks.dtype == np.int64 and users.tolist() == [7, 3, 9] and ranks.tolist() == [0, 4, 28]
    assert back[("generation", "p1_test", "all")][1].tolist() == [-1, 2]  # -1: not retrieved
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind

    with pytest.raises(ValueError, match=r"ranks\.npz: \('a', 'b', 'c'\): 2 user ids but 1 ranks"):
        save_ranks(path, {("a", "b", "c"): ([1, 2], [0])})
    with pytest.raises(ValueError, match="ranks must be >= 0"):
        save_ranks(path, {("a", "b", "c"): ([1], [-2])})
    with pytest.raises(ValueError, match="must be integers"):
        save_ranks(path, {("a", "b", "c"): ([1], [0.5])})
    with pytest.raises(ValueError, match=r"three non-empty strings"):
        save_ranks(path, {("a", "b"): ([1], [0])})
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(ResultsFileError, match="other.npz: not a ranks file"):
        load_ranks(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_ranks(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------- markdown


def test_markdown_table_by_hand():
    text = markdown_table(["run", "NDCG@3"], [["a|b", "0.5000"], ["c", 1]], align="lr")
    assert text == "| run | NDCG@3 |\n| --- | ---: |\n| a\\|b | 0.5000 |\n| c | 1 |"
    assert markdown_table(["x"], [], align="l") == "| x |\n| --- |"
    with pytest.raises(ValueError, match="align"):
        markdown_table(["x", "y"], [], align="lrr")
    with pytest.raises(ValueError, match="a row of 1 cells under a header of 2"):
        markdown_table(["x", "y"], [["only"]])


def test_frame_and_matrix_markdown_by_hand():
    frame = pd.DataFrame({"stage": [0, 1], "group": ["U_A", "U_A"], "metric": ["HR@1", "HR@1"], "text": ["0.1", "0.2"]})
    pivot = frame.pivot_table(index=["stage"], columns=["group", "metric"], values="text", aggfunc="first")
    assert frame_markdown(pivot) == "| stage | U_A / HR@1 |\n| --- | ---: |\n| 0 | 0.1 |\n| 1 | 0.2 |"
    R = [[0.5, np.nan], [0.25, 0.125]]
    assert matrix_markdown(R, ["s0", "s1"], ["s0:t0", "s1:t1"]) == (
        "| model \\ split | s0:t0 | s1:t1 |\n| --- | ---: | ---: |\n| s0 | 0.5000 | - |\n| s1 | 0.2500 | 0.1250 |"
    )


# --------------------------------------------------------------------------------- bootstrap (scipy)


def test_bootstrap_ci_is_scipys_percentile_bootstrap():
    values = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    mean, low, high = bootstrap_ci(values, n_boot=999, seed=3)
    ref = stats.bootstrap((values,), np.mean, n_resamples=999, method="percentile", vectorized=True,
                          rng=np.random.default_rng(3)).confidence_interval  # fmt: skip
    assert (mean, low, high) == (0.5, ref.low, ref.high)
    # two values 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1
    assert bootstrap_ci(np.array([0.0, 1.0]), n_boot=2000, seed=0) == (0.5, 0.0, 1.0)


def test_bootstrap_ci_resamples_are_shared_by_every_metric():
    # paired: the same users are drawn for every metric of one evaluation, so a metric that is an affine
    # function of another (here 2x + 1) has the transformed interval exactly
    rng = np.random.default_rng(0)
    a = rng.random(57)
    _, low_a, high_a = bootstrap_ci(a, n_boot=500, seed=11)
    _, low_b, high_b = bootstrap_ci(2 * a + 1, n_boot=500, seed=11)
    assert (low_b, high_b) == pytest.approx((2 * low_a + 1, 2 * high_a + 1), abs=1e-12)


# ------------------------------------------------------------------------------------ dependencies


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> files, for every absolute import under recsim/ that is not stdlib or recsim."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "recsim").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "recsim" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def _requirement_name(text: str) -> str:
    return re.split(r"[<>=!~\[; ]", text.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    anywhere = declared | set().union(*extras.values())
    distributions = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"yaml", "scipy", "psutil", "tqdm", "safetensors"} <= set(imports)  # the scan sees them
    undeclared = {}
    for module, files in imports.items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert dists, f"{module} (imported in {files[0]}) is not installed, so its distribution is unknown"
        if not dists & anywhere:
            undeclared[module] = (sorted(dists), files[:2])
    assert undeclared == {}, f"imported but not in pyproject.toml: {undeclared}"
    assert {"datasets", "faiss-cpu"} <= declared
    assert "wandb" not in declared and "wandb" in extras["wandb"] and "wandb" in extras["test"]


def test_wandb_is_imported_only_inside_functions_and_named_when_missing(monkeypatch):
    for path in (REPO / "recsim").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: a function body is imported when called
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "wandb" for n in names), f"{path} imports wandb at load time"
    from recsim.utils import wandb_logger

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(ImportError, match=r'optional extra of recsim: pip install -e "\.\[wandb\]"'):
        wandb_logger.wandb_logger(None, Path("unused"))
    with pytest.raises(ImportError, match="logger=csv"):
        wandb_logger.finish()
