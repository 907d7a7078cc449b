"""Evaluation protocols: how time is cut into stages and what each stage is judged on."""

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, Sample, StageData, make_samples


def build_protocol(cfg, data: EncodedData) -> Protocol:
    if cfg.name == "two_period":
        from recsim.protocols.two_period import build_two_period

        return build_two_period(data, list(cfg.t_quantiles), cfg.history_window)
    if cfg.name == "stages":
        from recsim.protocols.stages import build_stages

        return build_stages(data, cfg.first_share, list(cfg.window_shares), cfg.history_window)
    raise ValueError(f"stage.name={cfg.name!r} is not one of: two_period, stages")


__all__ = ["EncodedData", "EvalSplit", "Protocol", "Sample", "StageData", "build_protocol", "make_samples"]
