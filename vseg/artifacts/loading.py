"""Reading weight files safely: every failure is one `CheckpointError` naming the file, the problem and the fix.

`.ckpt` / `.pt` files are read with `torch.load(weights_only=True)`, which refuses any pickle that would call a
function outside torch's allow-list. When it refuses, the pickle's globals are listed (without running
anything) to tell a checkpoint that tries to run code (UNSAFE: `os.system`, `builtins.eval`, ...) from one that
only carries metadata classes of a known library (DeepSpeed, Lightning), which callers may read another way.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import pickletools
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vseg.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint file or folder that cannot be loaded as asked; the message says what is wrong and where."""


#: top-level packages whose classes may appear in a checkpoint's metadata (never run by weights_only loading)
KNOWN_PACKAGES = {
    "torch",
    "collections",
    "numpy",
    "_codecs",
    "copyreg",
    "enum",
    "datetime",
    "pathlib",
    "argparse",
    "typing",
    "deepspeed",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "omegaconf",
    "transformers",
    "peft",
}
SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "dict", "list", "tuple", "int", "float", "bool", "str"}


def pickle_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """`module.name` of every global a pickle (plain, or a torch zip's data.pkl) refers to; nothing is run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", ".", 1))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a truncated or foreign stream: report what was read before it
        pass
    return found


def unsafe_globals(path: Path) -> list[str]:
    """The globals of `path`'s pickle outside known libraries (`posix.system`, `builtins.eval`, ...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # a private helper of torch; without it, torch's own globals count as known
        allowed = None
    unsafe = []
    for name in pickle_globals(path):
        module, _, attr = name.rpartition(".")
        top = module.split(".")[0]
        if name in (allowed or ()) or (module == "builtins" and attr in SAFE_BUILTINS):
            continue
        if top == "torch" and (allowed is None or module.startswith("torch._utils") or attr.endswith("Storage")):
            continue
        if top in KNOWN_PACKAGES and top != "torch":
            continue
        if name not in unsafe:
            unsafe.append(name)
    return unsafe


def unsafe_message(path: Path, unsafe: list[str]) -> str:
    return (
        f"{path}: UNSAFE checkpoint, refused: its pickle calls {', '.join(f'`{u}`' for u in unsafe[:3])}, which "
        "torch.load(weights_only=True) does not allow, so nothing in it was run; use a checkpoint written by vseg "
        "training (RUN/checkpoints/*.ckpt) and delete this file unless you know where it came from"
    )


def load_torch_file(path: Path, what: str = "checkpoint", allow: Iterable[Any] = ()) -> Any:
    """torch.load(weights_only=True, mmap) of a vseg checkpoint file; refusals and corrupt files as CheckpointError.

    `allow`: classes the file may hold besides tensors and plain containers (DeepSpeed's loss scaler, ...),
    reconstructed by weights_only's own unpickler, never by running the file's code.

    A `pickle.UnpicklingError` without unsafe globals (metadata classes of a known library) is re-raised for
    callers that read such files another way.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        unsafe = unsafe_globals(path)
        if unsafe:
            raise CheckpointError(unsafe_message(path, unsafe)) from None
        if not zipfile.is_zipfile(path):
            raise CheckpointError(_corrupt(path, what, err)) from None
        raise
    except Exception as err:  # noqa: BLE001 - truncated zips, random bytes, ...
        raise CheckpointError(_corrupt(path, what, err)) from None


def _corrupt(path: Path, what: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if first.startswith("Weights only load failed"):
        first = "not a zip archive, and not a pickle stream torch can read"
    first = first.split(". ")[0]  # torch's own advice after the first sentence is not for vseg's users
    if len(first) > 160:
        first = first[:160] + "..."
    size = path.stat().st_size if path.exists() else 0
    return (
        f"{path}: cannot be read as a {what} ({size} bytes; {type(err).__name__}: {first}); the file is truncated, "
        "corrupt or not a torch checkpoint: use another checkpoint of the run (RUN/checkpoints/) or write it again"
    )


def load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """safetensors' load_file; a truncated or foreign file is a CheckpointError ending with `fix`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise CheckpointError(_bad_safetensors(Path(path), err, fix)) from None


def check_safetensors(path: Path, fix: str) -> None:
    """Reads only the header and checks that the file covers every tensor it lists (a truncated copy fails)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(_bad_safetensors(Path(path), err, fix)) from None


def _bad_safetensors(path: Path, err: BaseException, fix: str) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    size = path.stat().st_size if path.exists() else 0
    return f"{path}: cannot be read as safetensors ({size} bytes; {first}): the file is truncated or corrupt; {fix}"


_TORCH_OK = {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool", "device"}


_SAFE = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("collections", "defaultdict"),
}


class _Opaque:
    """Stands in for any non-tensor object of a checkpoint's metadata; absorbs whatever unpickling gives it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding and container globals; every other global becomes `_Opaque`.

    No function or class of the checkpoint's choosing is ever called, so this is as safe as
    `weights_only=True`, but tolerates metadata objects (DeepSpeed / Lightning config classes) it does not know.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        if (module == "torch._utils" and name.startswith("_rebuild_")) or (module == "torch" and name in _TORCH_OK):
            return getattr(importlib.import_module(module), name)
        if (module, name) in _SAFE:
            return getattr(importlib.import_module(module), name)
        return _Opaque


class _RestrictedPickle:
    """A `pickle_module` for torch.load whose Unpickler is `_RestrictedUnpickler`."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)
    __name__ = "vseg_restricted_pickle"


def load_checkpoint(path: Path) -> Any:
    try:
        return load_torch_file(path)  # UNSAFE pickles and corrupt files: a CheckpointError naming the file
    except pickle.UnpicklingError:
        log.info("%s holds metadata objects weights_only rejects; reading it with a restricted unpickler", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_RestrictedPickle)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from None
