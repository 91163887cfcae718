"""Frozen-encoder features on disk: one safetensors file per (encoder, input), written once, read memory-mapped.

Layout under the cache root (node-local disk, shared by every rank and by runs of the same model):

    <root>/<part>-<fingerprint>/identity.json         what the fingerprint stands for (for people)
    <root>/<part>-<fingerprint>/<kk>/<key>.safetensors one input's features (kk = the key's first two digits)

The fingerprint covers the frozen weights' identity and everything that shapes the features (the encoder's
config, dtype, input size): another model or size lands in another directory, never reading stale entries.
The key is a hash of the encoder's input tensor itself (pixels after every resize and augmentation), so
an entry is exact for exactly the pixels that were encoded.

Writes go to a temporary file renamed into place (readers never see a partial entry); an exclusive lock
file makes one process the writer of an entry while the others use what they computed. Each entry carries
its key, fingerprint and a CRC-32 of every tensor; a file that fails to parse or check is reported,
removed and encoded again, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vseg.artifacts.files import atomic_write, save_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: a writer's lock older than this is taken as left behind by a process that died mid-write
STALE_LOCK_S = 600.0


def content_key(tensor: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes: the identity of one encoder input."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(_bytes(t))
    return digest.hexdigest()


def identity_hash(identity: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description (sorted keys)."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(_bytes(t.contiguous()))


#: the stores this process opened, by directory (copies unpickled in a loader's workers are not among them)
_OPEN: weakref.WeakValueDictionary[str, FeatureStore] = weakref.WeakValueDictionary()


class StoredEntry:
    """An entry on disk, named by a loader's worker and read by the training process when it pins the batch.

    Why not read in the worker: a SAM-2 entry is 42 MB (the FPN maps at 1024 px), 1.3 GB per micro-batch of
    32. Read there, it went file -> worker memory -> shared memory -> the training process's page-locked
    copy: three copies and a fresh 1.3 GB shared mapping to fault in and unmap on every step, on the host
    whose launching of kernels bounds the step. DataLoader's pinning thread calls `pin_memory()` on every
    object of a batch that has one, so there the entry goes from the mapped file to page-locked memory in one
    copy, off the training thread and counted as waiting for inputs when it falls behind.
    """

    # A plain class: a dataclass would be walked (and rebuilt) by Lightning's batch transfer, a named tuple by
    # the pinning itself, which would then never call `pin_memory` below.
    __slots__ = ("dir", "key")

    def __init__(self, dir: str, key: str):
        self.dir, self.key = dir, key

    def __reduce__(self) -> tuple:
        return StoredEntry, (self.dir, self.key)

    def __repr__(self) -> str:
        return f"StoredEntry({self.dir!r}, {self.key!r})"

    def pin_memory(self, device: Any = None) -> list[torch.Tensor] | StoredEntry | None:
        """The entry's tensors in page-locked memory (None: damaged, removed); itself where this process has no
        store for its directory (the training step then reads it)."""
        store = _OPEN.get(self.dir)
        return self if store is None else store.read(self.key, pin=True)


class CorruptEntry(Exception):
    """An entry on disk that cannot be trusted (partial, damaged, or written for another key)."""


@dataclass
class StoreStats:
    """What one process did with one store."""

    hits: int = 0  # entries read and used
    misses: int = 0  # inputs encoded because no entry existed (or it was corrupt)
    written: int = 0  # entries this process wrote
    corrupt: int = 0  # entries found damaged, removed and encoded again
    busy: int = 0  # misses another process was writing: encoded here too, not written twice


class FeatureStore:
    """One encoder's features in one cache directory.

    Args:
        root: the cache root (`feature_cache.dir`, or the run's `feature_cache/`).
        part: which encoder (`sam`, `vision`).
        identity: what determines the features besides the input (weights, config, dtype): hashed into the
            directory name and written next to the entries.
        verify: `first` checks an entry's checksums on its first read in this process, `always` on every read.
    """

    def __init__(self, root: Path | str, part: str, identity: dict[str, Any], verify: str = "first"):
        if verify not in ("first", "always"):
            raise ValueError(f"verify={verify!r}: first | always")
        self.part = part
        self.fingerprint = identity_hash({"part": part, **identity})
        self.dir = Path(root) / f"{part}-{self.fingerprint}"
        self.identity = identity
        self.verify = verify
        self.verified: set[str] = set()
        self.stats = StoreStats()
        _OPEN[str(self.dir)] = self  # what this process's `StoredEntry.pin_memory` reads through

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def describe(self) -> None:
        """Writes identity.json once (atomically); any process may call it."""
        target = self.dir / "identity.json"
        if target.is_file():
            return
        text = json.dumps({"format": FORMAT_VERSION, "part": self.part, **self.identity}, indent=2, default=str)
        atomic_write(target, lambda tmp: tmp.write_text(text + "\n"), what="feature cache identity")

    # ------------------------------------------------------------------------------------------- reading
    def read(self, key: str, pin: bool = False) -> list[torch.Tensor] | None:
        """The entry's tensors (CPU, in stored order), or None when there is none or it was corrupt (removed).

        `pin`: copied from the mapped file straight into page-locked memory (torch's caching host allocator),
        from which the copy to the GPU runs asynchronously at full speed."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = self._load(path, key)
        except CorruptEntry as err:
            self.stats.corrupt += 1
            log.warning("feature cache: %s is damaged (%s); removed, the input is encoded again", path, err)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if pin:
            tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in tensors]
        return tensors

    def entry(self, key: str) -> StoredEntry | None:
        """A reference to the entry when one is on disk (read later, by `StoredEntry.pin_memory`), else None."""
        return StoredEntry(str(self.dir), key) if self.path(key).is_file() else None

    def _load(self, path: Path, key: str) -> list[torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped
                meta = f.metadata() or {}
                names = sorted(f.keys(), key=lambda n: int(n.removeprefix("t")) if n.startswith("t") else -1)
                tensors = [f.get_tensor(n) for n in names]
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CorruptEntry(f"unreadable: {str(err).splitlines()[0][:200]}") from None
        if meta.get("key") != key or meta.get("fingerprint") != self.fingerprint:
            raise CorruptEntry(f"written for key {meta.get('key')} / {meta.get('fingerprint')}")
        try:
            crcs = [int(c) for c in json.loads(meta.get("crc32", "null"))]
        except (TypeError, ValueError):
            raise CorruptEntry("no checksums in its metadata") from None
        if len(crcs) != len(tensors) or names != [f"t{i}" for i in range(len(tensors))]:
            raise CorruptEntry(f"{len(tensors)} tensors for {len(crcs)} checksums")
        if self.verify == "always" or key not in self.verified:
            bad = [i for i, (t, c) in enumerate(zip(tensors, crcs, strict=True)) if _crc(t) != c]
            if bad:
                raise CorruptEntry(f"checksum mismatch in tensor(s) {bad}")
            self.verified.add(key)
        return tensors

    # ------------------------------------------------------------------------------------------- writing
    def write(self, key: str, tensors: list[torch.Tensor]) -> bool:
        """Stores `tensors` under `key` unless another process is writing it; True when this process wrote it."""
        path = self.path(key)
        if path.is_file():
            return False
        lock = path.with_name(f"{path.name}.lock")
        if not self._lock(lock):
            self.stats.busy += 1
            return False
        try:
            self.describe()
            cpu = [t.detach().to("cpu").contiguous() for t in tensors]
            meta = {"key": key, "fingerprint": self.fingerprint, "crc32": json.dumps([_crc(t) for t in cpu])}
            atomic_write(
                path,
                lambda tmp: save_safetensors({f"t{i}": t for i, t in enumerate(cpu)}, tmp, metadata=meta),
                what="feature cache entry",
            )
            self.stats.written += 1
            self.verified.add(key)
            return True
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()

    @staticmethod
    def _lock(lock: Path) -> bool:
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    stale = time.time() - lock.stat().st_mtime > STALE_LOCK_S
                except OSError:
                    continue  # released meanwhile: try again
                if not stale:
                    return False
                with contextlib.suppress(OSError):
                    lock.unlink()
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False

    def disk_bytes(self) -> int:
        """Bytes of the entries now on disk."""
        return sum(p.stat().st_size for p in self.dir.glob("*/*.safetensors"))


def weights_identity(path: str | None) -> dict[str, Any]:
    """The identity of a model folder's weights without reading them: each weight file's name, size and
    modification time (a replaced or edited checkpoint changes one of them)."""
    if path is None:
        return {"weights": "random-init"}
    folder = Path(path)
    files = sorted(
        p for p in folder.glob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json")
    )
    if not files:
        return {"weights": str(folder.resolve())}
    return {
        "weights": str(folder.resolve()),
        "files": [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in files],
    }
