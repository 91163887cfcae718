"""Files vseg writes: one mode rule, writability checked up front, one sentence when the disk says no.

- **Mode.** Every file vseg writes (run directories, predictions, exports) gets the mode a plain `open()`
  gives it: 0666 less the umask (0644 under the usual umask 022). safetensors and `tempfile.mkstemp` create
  0600 files, so `save_safetensors` and `atomic_write` set the mode explicitly.
- **Up front.** `check_writable` runs before any model is built: a run directory or prediction folder that
  cannot be created or written stops the run in a second, not after minutes of loading.
- **During the run.** `storage_error` turns the `OSError` of a failed write (no space, quota, read-only file
  system, permission, a file where a folder should be) into a `StorageError`: one message naming the path,
  the cause and what is needed (and for a full disk how much is free and about how much is needed). The
  entry points print it and exit with `STORAGE_EXIT_CODE`, without a stack trace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

STORAGE_EXIT_CODE = 5

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}
_UMASK_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A write the file system refused (full, read-only, no permission); the message says what is needed."""

    exit_code = STORAGE_EXIT_CODE


# ---------------------------------------------------------------------------------------------- modes
def umask() -> int:
    """The process umask, read without changing it where /proc shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: set it straight back
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def save_safetensors(tensors: dict[str, Any], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the ordinary file mode (safetensors itself creates 0600 files)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


# ---------------------------------------------------------------------------------------------- checks
def _existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (os.path.exists: an unreadable one counts as existing)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing ancestor); None if unknown."""
    try:
        return shutil.disk_usage(_existing(Path(path).absolute())).free
    except OSError:
        return None


def storage_error(err: BaseException, path: Path, what: str, needed: int | None = None) -> StorageError | None:
    """The StorageError for a failed write of `what` at `path`; None when `err` is not a storage problem.

    Args:
        err: what the write raised (an OSError, or the RuntimeError of torch's C++ writer).
        path: the file or folder being written (named in the message).
        what: what it is, for the message ("checkpoint", "run directory (run_dir)").
        needed: bytes the write needs, if known (named for a full disk).
    """
    path = Path(path)
    code = getattr(err, "errno", None)
    # torch's C++ writer (torch.save to a path: DeepSpeed) reports a failed write as a RuntimeError, no errno.
    writer_failed = isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("PytorchStreamWriter failed", "file write failed")
    )
    if code is None and not writer_failed:
        return None
    free = free_bytes(path)
    full = code in _FULL or (code is None and needed is not None and free is not None and free < needed)
    head = f"cannot write the {what} {path}"
    if full:
        cause = "the disk quota is exceeded" if code == errno.EDQUOT else "no space left on the device"
        have = f"{_size(free)} free there" if free is not None else "free space unknown"
        need = f", about {_size(needed)} needed" if needed else ""
        return StorageError(f"{head}: {cause} ({have}{need}); free some space or choose another location")
    if code == errno.EROFS:
        return StorageError(f"{head}: {_existing(path)} is on a read-only file system; choose a writable location")
    if code in _DENIED:
        return StorageError(
            f"{head}: permission denied; it needs write permission in {_existing(path)} (or choose another location)"
        )
    if code in _NOT_A_FOLDER:
        base = _existing(path)
        if not base.is_dir():
            return StorageError(f"{head}: {base} is a file, not a folder; choose another location")
    if code == errno.ENOENT:
        return StorageError(f"{head}: {_existing(path)} cannot hold new files or folders; choose another location")
    reason = os.strerror(code) if code is not None else str(err)
    return StorageError(f"{head}: {reason}")


def check_writable(path: Path | str, what: str) -> None:
    """Raises StorageError unless folder `path` exists and is writable, or can be created.

    Nothing is created: a probe file is made and removed in `path` or in its nearest existing ancestor.
    """
    path = Path(path).absolute()
    base = _existing(path)
    if not base.is_dir():
        raise StorageError(f"cannot write the {what} {path}: {base} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vseg-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise (storage_error(err, path, what) or err) from None


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: Path, write: Callable[[Path], Any], what: str = "file") -> None:
    """Calls `write(tmp_path)` and renames the result onto `path`: never a partial file under `path`, no
    temporary file left behind when the write fails, the ordinary file mode, and a StorageError naming
    `path` when the file system refuses."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise (storage_error(err, path, what) or err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
