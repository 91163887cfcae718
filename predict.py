"""Predict vessel masks: `python predict.py ckpt=... [input=...|data=...] [output=DIR]` (see conf/predict.yaml).

Exit status: 0 when every input was predicted, 1 when some input failed (listed in summary.json), 2 on a
configuration error, 5 when an output could not be written (no space, read-only, no permission).
"""

import sys

import hydra
from omegaconf import DictConfig

from vseg.cli import exit_on_config_error, exit_on_storage_error, precheck


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vseg.console import setup_console
    from vseg.predict import run

    setup_console()  # Lightning's lines once, no library warnings a user cannot act on
    with exit_on_config_error(), exit_on_storage_error():
        summary = run(cfg)
    if summary.get("failed") or summary.get("missing"):
        sys.exit(1)


if __name__ == "__main__":
    precheck("predict", sys.argv[1:])  # Hydra's own errors (bad override, unknown key): one line, exit 2
    main()
