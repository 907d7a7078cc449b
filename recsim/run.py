"""`python -m recsim.run [overrides]`: one continual experiment (or a sweep with -m).

The config is validated (recsim.schema) before the runner, torch or the data are touched, so a bad value
stops the job within seconds with `key=value: expected ...` instead of failing after hours of training.
"""

import hydra
from omegaconf import DictConfig

from recsim.schema import ConfigError, validate


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as exc:
        raise SystemExit(f"recsim: {exc}") from None  # the message, without a traceback through Hydra
    from recsim.runner import run

    run(cfg)


if __name__ == "__main__":
    main()
