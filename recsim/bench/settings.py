"""The benchmark's own settings (`bench.*`), kept in code beside their checks, and the run config.

Why in code and not in `conf/bench/default.yaml`: the `bench` node is not part of `python -m recsim.run`'s
config, so a yaml group would have to be added to every composition (or to config.yaml, where the runner
would carry an unused node). Here the `bench.*` overrides are split off the command line, typed by Hydra's
own override parser (so `bench.steps=2` is the integer 2 and `bench.steps=abc` the string 'abc', exactly as
`recsim.run` types values), checked against the table below, and the remaining overrides compose the run
config. An unknown or ill-typed key stops the benchmark before torch is imported.
"""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from recsim.bench.decode import DECODER_LABELS
from recsim.schema import Check, ConfigError, boolean, integer, number, subset, text

DEFAULTS = {
    "steps": 20,             # train: optimiser steps timed (after the warm-up)
    "warmup": 3,             # train: untimed optimiser steps first; score: untimed eval batches; fullrank: untimed passes
    "users": 512,            # score / fullrank: test-split users timed (the first ones; fewer if the split has fewer)
    "peak_tflops": 790.0,    # MFU denominator per device: the bf16 dense matmul rate measured on the H200
    "out": None,             # JSON path; null: outputs/bench/<what>-<timestamp>.json
    "synthetic_scores": False,  # fullrank: rank a random [users, items+1] score matrix on the device, no model
    "items": None,           # fullrank with synthetic_scores: catalogue size; null: the composed dataset's
    "history_len": 20,       # fullrank with synthetic_scores: random masked history items per user
    "profile": None,         # train / score: a folder; profile after the timed part (recsim.bench.profile)
    "profile_steps": 3,      # with profile: optimiser steps (train) or one-batch calls (score) profiled
    "agreement": False,      # score (LLMs): also score the same users in fp32 (recipe.scoring.fp32), timed, and report
                             # how far the configured scores are from those: top-10 kept, largest difference
    "repeats": 3,            # decode: timed repetitions of each decoder over the users (median, min, max)
    "decoders": list(DECODER_LABELS),  # decode: labels of recsim.bench.decode.DECODERS to run, in its order
    "run_dir": None,         # decode: a finished run's folder; null: a freshly built model
    "stage": -1,             # decode with run_dir: the stage whose model is decoded (negative: from the end)
}
CHECKS: dict[str, Check] = {
    "steps": integer(1), "warmup": integer(0), "users": integer(1), "peak_tflops": number(0, lo_open=True),
    "out": text(null=True), "synthetic_scores": boolean(), "items": integer(1, null=True),
    "history_len": integer(0), "profile": text(null=True), "profile_steps": integer(1), "agreement": boolean(),
    "repeats": integer(1), "decoders": subset(*DECODER_LABELS), "run_dir": text(null=True), "stage": integer(),
}
assert set(DEFAULTS) == set(CHECKS)


def split_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """({bench key: typed value}, the other overrides). Raises ConfigError naming every bad bench key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    bench, rest, errors = {}, [], []
    parser = OverridesParser.create()
    for text_ in overrides:
        key = text_.split("=", 1)[0].lstrip("+~")
        if key == "bench":
            errors.append(f"{text_}: bench is not a config group; set its keys as bench.<key>=value "
                          f"({', '.join(DEFAULTS)})")
            continue
        if not key.startswith("bench."):
            rest.append(text_)
            continue
        name = key[len("bench."):]
        if name not in CHECKS:
            errors.append(f"{key}: unknown key; bench keys are {', '.join(DEFAULTS)}")
            continue
        try:
            value = parser.parse_override(text_).value()
        except OverrideParseException as exc:
            errors.append(f"{text_}: cannot be parsed ({str(exc).splitlines()[0]})")
            continue
        if not CHECKS[name].ok(value):
            errors.append(f"{key}={_show(value)}: expected {CHECKS[name].expected}")
            continue
        bench[name] = float(value) if name == "peak_tflops" else value
    if errors:
        raise ConfigError(f"{len(errors)} bad bench value(s):\n  " + "\n  ".join(errors))
    return {**DEFAULTS, **bench}, rest


def _show(value) -> str:
    """The value as the command line wrote it; strings quoted, so `abc` and `1` read differently."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def compose_run_config(overrides: list[str], output_dir: str) -> DictConfig:
    """The config `python -m recsim.run <overrides>` would see, with paths.output_dir set (outside
    `hydra.main` the `${hydra:runtime.output_dir}` default cannot resolve), checked by recsim.schema."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from recsim.schema import validate

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="recsim.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    validate(cfg)
    return cfg
