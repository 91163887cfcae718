"""Train Sa2VA with LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from vseg.cli import exit_on_config_error


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vseg.train import run

    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
