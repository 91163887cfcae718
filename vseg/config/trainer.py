"""`trainer.*` checked against `lightning.Trainer`'s own signature and ranges, before anything is built.

Names and simple types come from `Trainer.__init__`'s annotations, ranges from Lightning's own checks; the
arguments vseg passes itself are refused with the reason. Used by `vseg.config.validate`.
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from typing import Any


def _trainer_arguments() -> dict[str, Any]:
    """lightning.Trainer.__init__'s argument names -> their annotations."""
    import lightning  # here only: importing vseg.config (every command line, first) stays free of lightning

    params = inspect.signature(lightning.Trainer.__init__).parameters
    return {name: p.annotation for name, p in params.items() if name != "self"}


#: Trainer arguments vseg passes itself (build_trainer); a second value would clash or be ignored.
TRAINER_OWN = {
    "strategy": "choose the strategy with `strategy=<name>`, not trainer.strategy",
    "logger": "vseg logs to TensorBoard under the run directory (logger group)",
    "callbacks": "vseg sets the callbacks itself (checkpoints, watchdog, progress bar, monitor)",
    "default_root_dir": "the run directory is `run_dir=`",
    "use_distributed_sampler": "vseg's DataModule shards the data itself",
}


def _type_name(tp: Any) -> str:
    """A readable name of a simple annotation: `int`, `int | float | null`, `'value' | 'norm'`."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args]
        return " | ".join(n for n in names if n)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return ""  # an object (Accelerator, Logger, ...) a config value cannot be


def _matches(value: Any, tp: Any) -> bool:
    """Whether a config value (None, bool, int, float, str, list, dict) fits annotation `tp`."""
    if tp is inspect.Parameter.empty or tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return False  # a class (Accelerator, Logger, timedelta, ...): not something a YAML value can be


def _batch_limit_ok(value: Any) -> bool:
    """Lightning's batch limits: a share in [0.0, 1.0] or a whole number of batches."""
    if isinstance(value, float):
        return 0.0 <= value <= 1.0 or (value > 1 and value % 1.0 == 0)
    return value >= 0


def _devices_ok(value: Any) -> bool:
    """Lightning's `devices`: "auto", a count >= 1, -1 (all), a list of device indices, or those as a string."""
    if isinstance(value, str):
        text = value.strip()
        return text == "auto" or bool(re.fullmatch(r"-1|[1-9]\d*|\d+(\s*,\s*\d+)*\s*,?", text))
    if isinstance(value, list):
        return bool(value) and all(v >= 0 for v in value) and len(set(value)) == len(value)
    return value == -1 or value >= 1


#: trainer argument -> (check on a value of the right type, what it must be); per Lightning's own checks
TRAINER_RANGES: dict[str, tuple[Any, str]] = {
    "max_epochs": (lambda v: v >= -1, "an int >= 0, or -1 for no limit"),
    "min_epochs": (lambda v: v >= 0, "an int >= 0"),
    "max_steps": (lambda v: v >= -1, "an int >= 0, or -1 for no limit"),
    "min_steps": (lambda v: v >= 0, "an int >= 0"),
    "num_nodes": (lambda v: v >= 1, "an int >= 1"),
    "devices": (_devices_ok, '"auto", a count >= 1, -1 (all), or a list of device indices like [0, 1]'),
    "accumulate_grad_batches": (lambda v: v >= 1, "an int >= 1"),
    "check_val_every_n_epoch": (lambda v: v >= 1, "an int >= 1, or null"),
    "num_sanity_val_steps": (lambda v: v >= -1, "an int >= 0, or -1 for all validation batches"),
    "log_every_n_steps": (lambda v: v >= 1, "an int >= 1"),
    "fast_dev_run": (lambda v: v >= 0, "true, false or a number of batches >= 0"),
    "reload_dataloaders_every_n_epochs": (lambda v: v >= 0, "an int >= 0"),
    "gradient_clip_val": (lambda v: v >= 0, "a number >= 0, or null"),
    "gradient_clip_algorithm": (lambda v: v in ("value", "norm"), "value | norm"),
    "limit_train_batches": (_batch_limit_ok, "a share in [0.0, 1.0] or a whole number of batches"),
    "limit_val_batches": (_batch_limit_ok, "a share in [0.0, 1.0] or a whole number of batches"),
    "limit_test_batches": (_batch_limit_ok, "a share in [0.0, 1.0] or a whole number of batches"),
    "limit_predict_batches": (_batch_limit_ok, "a share in [0.0, 1.0] or a whole number of batches"),
    "overfit_batches": (_batch_limit_ok, "a share in [0.0, 1.0] or a whole number of batches"),
    "val_check_interval": (
        lambda v: not isinstance(v, (int, float)) or (_batch_limit_ok(v) and v != 0),
        "a share in (0.0, 1.0], a number of batches >= 1, a time 'DD:HH:MM:SS' or null",
    ),
}


def validate_trainer(t: dict[str, Any], need) -> None:
    """Every `trainer.*` value against lightning.Trainer's signature (names, simple types) and its ranges."""
    arguments = _trainer_arguments()
    unknown = sorted(set(t) - set(arguments))
    need(not unknown, f"trainer: unknown lightning.Trainer arguments {unknown}")
    for name, why in TRAINER_OWN.items():
        need(name not in t, f"trainer.{name}: {why}")
    for name, value in t.items():
        if name not in arguments or name in TRAINER_OWN:
            continue
        tp = arguments[name]
        if isinstance(value, float) and not math.isfinite(value):
            need(False, f"trainer.{name}={value}: not a finite number")
            continue
        if not _matches(value, tp):
            need(False, f"trainer.{name}={value!r}: expected {_type_name(tp) or 'a Python object'}")
            continue
        check = TRAINER_RANGES.get(name)
        if check is not None and value is not None and not isinstance(value, bool) and not check[0](value):
            need(False, f"trainer.{name}={value!r}: must be {check[1]}")
    if t.get("accelerator") is not None and isinstance(t.get("accelerator"), str):
        from lightning.pytorch.accelerators import AcceleratorRegistry

        known = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        need(t["accelerator"] in known, f"trainer.accelerator={t['accelerator']!r}: expected one of {known}")
