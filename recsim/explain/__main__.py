"""`python -m recsim.explain run_dir=<run> user=<id> [request="why would I like …"] [k=10] [stage=-1] [explain=true]
[out=<file.json>]`: one user's top-K from a finished run, and for an "explain" request a reason per item.

    checks     every setting (recsim/conf/explain.yaml), the run folder and the stage, before any data is read
    route      the request text -> "recommend" or "explain" (recsim.explain.router; no request: recommend;
               explain=true: explain whatever the router says); an explain the run cannot write is refused here
    sample     the run's protocol rebuilt from its data (recsim.protocols.prepare, no model): the user's test sample
               of the split (default: the one the stage is judged on), the newest if several, and its candidates
               (the run's own 1 + eval.negatives draws); a user without one is refused, naming list_users=true
    rank       recsim.runs.load_stage (stage `stage`'s weights and method state), then the method's
               score_candidates, as the run scored it; the top k, ties ordered against the held-out target as the
               metrics count them (recsim.eval.metrics)
    explain    the recommender's own `explain` (a distilled student) or, for an LLM run, the teacher's
               recsim.explain.teacher.generate_explanations (conf/method/distill.yaml's explanation prompt,
               max_new_tokens from here); classic models write no text and are refused
    print      history, request, intent, the list (the held-out next item marked) and the reasons; `out=` also
               writes it all as JSON

Choices:
- key=value arguments read against explain.yaml here, not through Hydra: the package's conf/ holds the `stage` config
  group, and Hydra would read `stage=-1` as choosing from it (recsim.decode names its key `stages` for that
  reason; explain shows one stage). `run_dir`, `user`, `request`, `split`, `out` and `data_dir` are taken as
  written (user=007 stays "007"; `null` means none); other values are typed as YAML. A key explain.yaml does not
  have is refused by name. Nothing is written unless `out=` is given.
- The protocol is prepared once here (to refuse a bad user before any model is built) and once more inside
  load_stage, which rebuilds it from the run's config and checks it against protocol.json.
- Text from `tiny_llama` (random weights), or from a student distilled from it, is gibberish and is labelled so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import recsim  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from omegaconf import DictConfig, OmegaConf

from recsim.schema import ConfigError, boolean, integer, number, one_of, text

EXPLAIN_CONF = Path(__file__).resolve().parents[1] / "conf" / "explain.yaml"
AS_WRITTEN = ("run_dir", "user", "request", "split", "out", "data_dir")  # strings, never YAML-typed
INTENTS = ("recommend", "explain")
CHECKS = {
    "stage": integer(), "split": text(null=True), "k": integer(1), "request": text(null=True),
    "explain": boolean(), "max_new_tokens": integer(1), "out": text(null=True), "list_users": boolean(),
    "accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu", null=True), "data_dir": text(null=True),
    "router.features": one_of("minilm", "hashed"), "router.hash_dims": integer(1), "router.l2": number(0),
    "router.max_iter": integer(1),
}
RANDOM_TEXT = "tiny_llama"  # a random 4-layer Llama: what it writes carries no meaning


class ExplainError(ValueError):
    """A bad setting, run_dir, stage, split or user; raised before any model is built."""


# ---- settings -----------------------------------------------------------------------------------------------
def _leaves(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _leaves(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def parse_args(argv: list[str]) -> DictConfig:
    """explain.yaml with the command line's key=value pairs over it; an unknown key or a non key=value is refused."""
    cfg = OmegaConf.load(EXPLAIN_CONF)
    known = set(_leaves(OmegaConf.to_container(cfg)))
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ExplainError(f"{arg!r}: expected key=value (keys: {', '.join(sorted(known))})")
        if key not in known:
            raise ExplainError(f"{key}: not a setting of recsim.explain (settings: {', '.join(sorted(known))})")
        if key in AS_WRITTEN:
            OmegaConf.update(cfg, key, None if value == "null" and key != "user" else value)
        else:
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([arg]), key), merge=False)
    return cfg


def check_settings(cfg: DictConfig) -> None:
    for key in ("run_dir",) if cfg.list_users is True else ("run_dir", "user"):
        if OmegaConf.is_missing(cfg, key) or not str(cfg[key]):
            raise ExplainError(f"{key}=… is required: python -m recsim.explain run_dir=<a finished run's folder> "
                               "user=<a user id> (list_users=true lists a run's ids)")
    errors = [f"{key}={OmegaConf.select(cfg, key)!r}: expected {check.expected}"
              for key, check in CHECKS.items() if not check.ok(OmegaConf.select(cfg, key))]
    intents = sorted(cfg.router.examples) if isinstance(cfg.router.examples, DictConfig) else None
    if intents != sorted(INTENTS):
        errors.append(f"router.examples: expected the intents {', '.join(INTENTS)}, got {intents}")
    else:
        errors += [f"router.examples.{i}: expected a non-empty list of non-empty strings" for i in INTENTS
                   if not (len(cfg.router.examples[i]) and all(isinstance(t, str) and t for t in
                                                               cfg.router.examples[i]))]
    if errors:
        raise ConfigError(f"{len(errors)} bad setting(s) of recsim.explain:\n  " + "\n  ".join(errors))


def run_overrides(cfg: DictConfig) -> list[str]:
    """The run settings changed here (device, where the data is) as load_stage's dotted overrides."""
    changed = {"trainer.accelerator": cfg.accelerator, "dataset.data_dir": cfg.data_dir}
    return [f"{k}={json.dumps(v)}" for k, v in changed.items() if v is not None]


def finished_stage(run_dir: Path, stage: int) -> int:
    """The absolute index of `stage` (negative: from the end) among the run's finished stages."""
    from recsim.runs import stage_dirs

    if not run_dir.is_dir():
        raise ExplainError(f"run_dir={run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise ExplainError(f"run_dir={run_dir}: no config.yaml, not a recsim run directory")
    finished = sorted(int(p.name[:2]) for p in stage_dirs(run_dir))
    if not finished:
        raise ExplainError(f"run_dir={run_dir}: no finished stage (stages/NN_name/DONE)")
    index = finished[stage] if -len(finished) <= stage < 0 else stage
    if index not in finished:
        raise ExplainError(f"stage={stage}: not a finished stage of {run_dir} (finished: {finished})")
    return index


def check_can_explain(run_cfg: DictConfig) -> None:
    """Refuses, before any data or model, a run whose recommender writes no text (a classic model); whether a
    non-LLM recommender has `explain` is known once it is built (`write_explanations`)."""
    kind = run_cfg.backbone.kind
    if kind in ("sequential", "graph"):
        raise ExplainError(f"this run's recommender ({run_cfg.backbone.name}, backbone.kind={kind}) writes no text: "
                           "explanations need an LLM run or a distilled student (method=distill); drop explain=true "
                           "or ask for a recommendation")


def random_text_note(run_cfg: DictConfig) -> str | None:
    """A warning when the text comes from tiny_llama, or from a student distilled from a tiny_llama teacher run."""
    if run_cfg.backbone.name == RANDOM_TEXT:
        return "tiny_llama has random weights: this text is not an explanation of anything"
    teacher = OmegaConf.select(run_cfg, "teacher.run_dir")
    path = Path(str(teacher)) / "config.yaml" if teacher else None
    if path and path.is_file() and OmegaConf.load(path).backbone.name == RANDOM_TEXT:
        return "the student learnt to write from a tiny_llama teacher (random weights): this text is not an explanation"
    return None


# ---- the user's sample --------------------------------------------------------------------------------------
def user_sample(data, split, user: str, run_dir: Path):
    """(group, sample, candidates [C]) of `user`'s newest sample in `split`; a user without one is refused."""
    rows = [(s.position, group, s, split.candidates[group][i]) for group, samples in split.samples.items()
            for i, s in enumerate(samples) if data.user_ids[s.user] == user]
    if not rows:
        ids = list(dict.fromkeys(data.user_ids[s.user] for s in split.all_samples()))
        why = "has no test sample in" if user in set(data.user_ids) else "is not a user id of the dataset, so not in"
        raise ExplainError(f"user={user!r} {why} split {split.name!r} of this run ({len(ids)} users there, e.g. "
                           f"{', '.join(ids[:5])}); `python -m recsim.explain run_dir={run_dir} list_users=true` "
                           "lists them all (ids as the dataset's user_id column spells them)")
    _, group, sample, candidates = max(rows, key=lambda r: r[0])
    return group, sample, candidates


def split_users(data, split) -> list[tuple[str, str]]:
    """(user id, group) of every sample of `split`, in the split's order."""
    return [(data.user_ids[s.user], group) for group, samples in split.samples.items() for s in samples]


# ---- ranking and explanations -------------------------------------------------------------------------------
def top_k(loaded, sample, candidates, k: int) -> list[tuple[int, float]]:
    """[(item, score)] of the k best candidates as the run's method scores them; on equal scores the held-out
    target (column 0) goes below, as the metrics' tie rule counts it."""
    import numpy as np

    scores = np.asarray(loaded.method.score_candidates(loaded.rec, [sample], candidates[None, :], 1))[0]  # [C]
    is_target = np.arange(len(candidates)) == 0
    order = np.lexsort((is_target, -scores))[:k]  # by score descending, then non-targets first
    return [(int(candidates[i]), float(scores[i])) for i in order]


def write_explanations(loaded, sample, items: list[int], max_new_tokens: int) -> tuple[list[str], str]:
    """(one text per item, who wrote them): the recommender's own `explain` when it has one (a distilled student),
    else the teacher's generation for an LLM recommender."""
    samples = [sample] * len(items)
    if callable(getattr(loaded.rec, "explain", None)):
        return loaded.rec.explain(samples, items, max_new_tokens), f"{type(loaded.rec).__name__}.explain"
    if getattr(loaded.rec, "kind", None) == "llm":
        from recsim.explain.teacher import explanation_settings, generate_explanations

        settings = explanation_settings()  # conf/method/distill.yaml's prompt: what a student learns to write
        settings.max_new_tokens = max_new_tokens
        return generate_explanations(loaded.rec, samples, items, settings, method=loaded.method), \
            "recsim.explain.teacher.generate_explanations"
    raise ExplainError(f"this run's recommender ({type(loaded.rec).__name__}) has no explain(); explanations "
                       "need an LLM run or a distilled student (method=distill)")


# ---- output -------------------------------------------------------------------------------------------------
def render(result: dict) -> str:
    lines = [f"recsim.explain: user {result['user']} ({result['group']}), stage {result['stage']} "
             f"({result['stage_name']}) of {result['run_dir']}, split {result['split']}",
             f"model: method={result['method']} backbone={result['backbone']} on {result['dataset']}"]
    history = result["history"]
    shown = history[-5:]
    lines.append(f"history ({len(history)} items, newest last{', last 5 shown' if len(history) > 5 else ''}):")
    lines += [f"  - {t}" for t in shown]
    if result["request"] is not None:
        lines.append(f"request: {result['request']!r} -> {result['intent']} "
                     f"(p = {result['intent_probability']:.3f}, router features: {result['router_features']})")
    lines.append(f"top {len(result['items'])} of {result['candidates']} candidates"
                 f"{' with explanations' if result['explained'] else ''}:")
    for entry in result["items"]:
        mark = "   [the held-out next item]" if entry["held_out_target"] else ""
        lines.append(f"{entry['rank']:>3}. {entry['title']}   (score {entry['score']:.4f}){mark}")
        if result["explained"]:
            lines.append(f"     reason: {entry['explanation']}")
    if result["explained"]:
        lines.append(f"explanations by {result['explainer']}")
        if result["random_text"]:
            lines.append(f"note: {result['random_text']}")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------------------
def explain(cfg: DictConfig) -> dict | None:
    """Every check, then the user's sample, the ranking and the explanations; the result (None for list_users)."""
    from recsim.protocols.prepare import prepare_protocol
    from recsim.runs import load_stage
    from recsim.schema import validate

    check_settings(cfg)
    run_dir = Path(str(cfg.run_dir))
    index = finished_stage(run_dir, int(cfg.stage))
    overrides = run_overrides(cfg)
    run_cfg = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(overrides))
    validate(run_cfg)
    out = Path(str(cfg.out)) if cfg.out is not None else None
    if out is not None and not out.parent.is_dir():
        raise ExplainError(f"out={out}: the folder {out.parent} does not exist")
    intent, probability = "recommend", None
    if cfg.request is not None and not cfg.list_users:
        from recsim.explain.router import build_router

        intent, probability = build_router(cfg.router).route(str(cfg.request))
    explained = bool(cfg.explain) or intent == "explain"
    if explained and not cfg.list_users:
        check_can_explain(run_cfg)

    protocol = prepare_protocol(run_cfg).protocol  # the data and the protocol only: no model yet
    split_name = cfg.split if cfg.split is not None else protocol.stages[index].eval_split
    if split_name not in protocol.splits:
        raise ExplainError(f"split={split_name}: not a test split of this run (its test splits: "
                           f"{', '.join(protocol.splits)})")
    split = protocol.splits[split_name]
    if cfg.list_users:
        users = split_users(protocol.data, split)
        print(f"{len(users)} users with a test sample in split {split_name} of {run_dir} (id, group):")
        print("\n".join(f"{u}\t{g}" for u, g in users))
        return None
    group, sample, candidates = user_sample(protocol.data, split, str(cfg.user), run_dir)
    if cfg.k > len(candidates):
        raise ExplainError(f"k={cfg.k}: expected at most the user's {len(candidates)} candidates "
                           f"(1 + the run's eval.negatives)")

    loaded = load_stage(run_dir, index, overrides)
    ranked = top_k(loaded, sample, candidates, int(cfg.k))
    items = [item for item, _ in ranked]
    texts, written_by = write_explanations(loaded, sample, items, int(cfg.max_new_tokens)) if explained \
        else ([None] * len(items), None)
    titles = protocol.data.titles
    result = {
        "run_dir": str(run_dir), "stage": index, "stage_name": loaded.stage.name, "split": split_name,
        "user": str(cfg.user), "group": group, "dataset": run_cfg.dataset.name, "method": run_cfg.method.name,
        "backbone": run_cfg.backbone.name, "history": [titles[i] for i in sample.history],
        "history_items": [protocol.data.item_ids[i] for i in sample.history],
        "request": cfg.request, "intent": intent, "intent_probability": probability,
        "router_features": cfg.router.features if cfg.request is not None else None,
        "explained": explained, "explainer": written_by,
        "random_text": random_text_note(run_cfg) if explained else None,  # the warning printed with the text
        "candidates": len(candidates),
        "items": [{"rank": r + 1, "item": protocol.data.item_ids[item], "title": titles[item], "score": score,
                   "held_out_target": item == sample.target, "explanation": text}
                  for r, ((item, score), text) in enumerate(zip(ranked, texts))],
    }
    print(render(result))
    if out is not None:
        from recsim.utils.io import write_json

        write_json(out, result)
        print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0] + "\n\nsettings (recsim/conf/explain.yaml):\n" + EXPLAIN_CONF.read_text())
        return 0
    try:
        explain(parse_args(argv))
    except (ConfigError, ExplainError) as exc:
        raise SystemExit(f"recsim.explain: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
