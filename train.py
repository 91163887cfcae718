"""Train Sa2VA with LoRA: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from vseg.cli import exit_on_config_error, exit_on_storage_error, precheck


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vseg.console import setup_console
    from vseg.planner import exit_on_oom
    from vseg.training.faults import NonFiniteError
    from vseg.training.run import run

    setup_console()  # Lightning's lines once, no library warnings a user cannot act on
    # an OOM: advice and exit status 4; a full or read-only disk: one message and status 5; no stack trace
    with exit_on_config_error(), exit_on_oom(), exit_on_storage_error():
        try:
            result = run(cfg)
        except NonFiniteError as err:
            print(f"vseg: {err}", file=sys.stderr)
            sys.exit(3)
    if result.exit_code:
        sys.exit(result.exit_code)  # 128 + signal: stopped by a signal after saving a resumable checkpoint


if __name__ == "__main__":
    precheck("train", sys.argv[1:])  # Hydra's own errors (bad override, unknown key): one line, exit 2
    main()
