"""`python -m recsim.run [overrides]`: one continual experiment (or a sweep with -m)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from recsim.runner import run

    run(cfg)


if __name__ == "__main__":
    main()
