"""Evaluation protocols: how time is cut into stages and what each stage is judged on."""

from collections.abc import Sequence

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, Sample, StageData, make_samples

PROTOCOLS = ("two_period", "stages", "leave_one_out", "peso_blocks", "global_split")


def build_protocol(cfg, data: EncodedData, users: Sequence[int] | None = None) -> Protocol:
    """The protocol `cfg.name` over the whole `data` (cut times, catalogue), with stages and splits for
    `users` only (user indices; None = every user)."""
    if cfg.name == "two_period":
        from recsim.protocols.two_period import build_two_period

        return build_two_period(data, list(cfg.t_quantiles), cfg.history_window, users)
    if cfg.name == "stages":
        from recsim.protocols.stages import build_stages

        return build_stages(data, cfg.first_share, list(cfg.window_shares), cfg.history_window, users)
    if cfg.name == "leave_one_out":
        from recsim.protocols.leave_one_out import build_leave_one_out

        return build_leave_one_out(data, cfg.get("history_window", 50), users)
    if cfg.name == "peso_blocks":
        from recsim.protocols.peso_blocks import build_peso_blocks

        return build_peso_blocks(data, cfg.min_block_interactions, cfg.history_window, users)
    if cfg.name == "global_split":
        from recsim.protocols.global_split import build_global_split

        return build_global_split(data, list(cfg.shares), cfg.history_window, users)
    raise ValueError(f"stage.name={cfg.name!r} is not one of: {', '.join(PROTOCOLS)}")


__all__ = ["EncodedData", "EvalSplit", "Protocol", "Sample", "StageData", "build_protocol", "make_samples"]
