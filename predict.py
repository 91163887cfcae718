"""Predict vessel masks with a trained run: `python predict.py ckpt=RUN_DIR [out=DIR]` (see conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig

from vseg.cli import exit_on_config_error


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vseg.predict import run

    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
