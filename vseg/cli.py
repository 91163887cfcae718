"""Command-line plumbing: `vseg <command> [group=option ...] [key=value ...]` and clean config errors.

`train.py` and `predict.py` are Hydra apps of their own; the `vseg` tool's commands (check, export, info,
plan, ...) compose the same `conf/` tree with Hydra's compose API, so every group and override works the
same way everywhere. A command is a module with `main(overrides: list[str]) -> int`, registered below.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

from vseg.artifacts.files import StorageError
from vseg.config import CONF_DIR, ConfigError, compose  # noqa: F401  (CONF_DIR, compose: the CLI's API)

#: command -> (module with `main(overrides) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("vseg.data.check", "check a dataset: report, problems, optional dump of samples as the model sees them"),
    "export": ("vseg.export", "write a trained run as a model folder: format=native|official|adapter"),
    "weights": (
        "vseg.artifacts.deepspeed",
        "a checkpoint (file or DeepSpeed directory) -> RUN/weights/trainable.safetensors",
    ),
    "info": (
        "vseg.model.sizes",
        "parameter table of a model config (built on the meta device): parts, total, trainable",
    ),
    "serve": (
        "vseg.serve",
        "the model as an HTTP service: ckpt=RUN [devices=auto|device=cuda:1|device_map=...] port=8000",
    ),
    "cache": (
        "vseg.training.cache_pass",
        "encode the training set's frozen features once into the disk cache: feature_cache.dir=DIR [train overrides]",
    ),
    "plan": ("vseg.planner.plan", "per-GPU memory of every strategy and what fits: gpu_memory=24GB trainer.devices=4"),
}


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turns a ConfigError into its message on stderr and exit status 2, without a stack trace."""
    try:
        yield
    except ConfigError as err:
        print(f"vseg: {err}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def exit_on_storage_error() -> Iterator[None]:
    """Turns a StorageError (a write the file system refused) into its message and exit status 5, no stack trace."""
    try:
        yield
    except StorageError as err:
        print(f"vseg: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def precheck(config_name: str, argv: list[str]) -> None:
    """Composes `config_name` with the command line as `@hydra.main` will, but reports a bad override, an
    unknown key or an unknown group option like every other config error: one line, exit status 2.

    (`@hydra.main` prints its own multi-line report and exits 1.) Command lines with Hydra flags (`--help`,
    `--cfg`, `-m`) or `hydra.*` overrides are left to Hydra.
    """
    if any(a.startswith("-") or a.lstrip("+~").startswith(("hydra.", "hydra/")) for a in argv):
        return
    try:
        compose(config_name, argv)
    except ConfigError as err:
        print(f"vseg: {err}", file=sys.stderr)
        sys.exit(2)


def _usage() -> str:
    lines = ["usage: vseg <command> [group=option ...] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vseg` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, overrides = args[0], args[1:]
    if name not in COMMANDS:
        print(f"vseg: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from vseg.console import setup_console  # Lightning comes with it: `vseg` alone and its usage stay instant

    setup_console()
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(overrides) or 0)
    except ConfigError as err:
        print(f"vseg {name}: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"vseg {name}: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
