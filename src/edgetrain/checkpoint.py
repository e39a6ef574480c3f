"""Atomic, checksummed training checkpoints.

Writing (:func:`save_checkpoint`): ``torch.save`` into a temporary file in the same directory, a SHA-256 of the
file's bytes appended as the zip archive's comment, ``fsync``, then ``os.replace`` over the old checkpoint (and an
``fsync`` of the directory). A run killed at any moment leaves the previous checkpoint or the new one, never half
a file; what a kill can leave is a temporary ``.checkpoint.pt.*.tmp``, which the next run in that directory
removes (:func:`remove_temporaries`).

Reading (:func:`load_checkpoint`): the checksum is verified before anything is unpickled, so any change to the
file after it was written (a flipped bit, a truncated copy, random bytes) is a one-line :class:`CheckpointError`,
never a traceback or silently different weights. The file stays an ordinary torch zip archive: ``torch.load`` and
``--weights`` read it as they read any ``.pt`` file. Loading uses ``torch.load(weights_only=True)``: a checkpoint
holds only tensors and plain data.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgetrain.errors import CheckpointError, ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the other guarantees hold
    fcntl = None

FORMAT = "edgetrain-checkpoint-2"  # 2: SHA-256 trailer, run fingerprint, technique state
REQUIRED = ("format", "model", "optimizer", "step", "config", "rng", "recipe", "fingerprint", "techniques")
MAGIC = b"edgetrain-sha256:"
TRAILER = len(MAGIC) + 64  # the zip comment: MAGIC + hex digest
EOCD = b"PK\x05\x06"  # zip end-of-central-directory signature (PKWARE APPNOTE 4.3.16); 22 bytes + comment
EOCD_SIZE = 22
CHUNK = 1 << 20
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "recipe.json")  # what a training run writes
LOCK = ".edgetrain.lock"  # flock'ed while a run writes the directory; released by the OS when the process dies


def _sha256(path: Path, end: int) -> str:
    """SHA-256 of the first ``end`` bytes of ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = end
        while left > 0:
            part = f.read(min(CHUNK, left))
            if not part:
                break
            h.update(part)
            left -= len(part)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError an exception was raised while handling (or caused by), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def temporary_prefix(name: str) -> str:
    """The prefix of the temporary files written on the way to ``name`` (``.checkpoint.pt.``)."""
    return f".{name}."


def _atomic(path: Path, write) -> Path:  # noqa: ANN001  (write(file object, temp path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file written the ordinary way (mkstemp's are 0600)
        with os.fdopen(fd, "r+b") as f:
            write(f, Path(tmp))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    return _atomic(Path(path), lambda f, _: f.write(text.encode()))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain data) to ``path`` atomically, with its SHA-256 as the zip comment."""

    def write(f, tmp: Path) -> None:  # noqa: ANN001
        try:
            torch.save({"format": FORMAT, **payload}, f)
        except RuntimeError as e:  # a failed write (full disk) surfaces as torch's zip writer failing to close
            cause = _os_error(e)
            if cause is None:
                raise
            raise cause from None
        f.flush()
        size = f.tell()
        f.seek(size - EOCD_SIZE)
        eocd = f.read(EOCD_SIZE)
        if eocd[:4] != EOCD or eocd[-2:] != b"\0\0":  # torch writes no zip comment; anything else is not ours
            raise RuntimeError("torch.save wrote an unexpected zip layout; cannot sign the checkpoint")
        f.seek(size - 2)
        f.write(struct.pack("<H", TRAILER))  # the comment length, covered by the digest
        f.flush()
        digest = _sha256(tmp, size)
        f.seek(size)
        f.write(MAGIC + digest.encode())

    return _atomic(Path(path), write)


def verify_checkpoint(path: str | Path) -> None:
    """Check that ``path`` is a checkpoint as written: its SHA-256 trailer matches its bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < TRAILER + EOCD_SIZE:
                raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({size} bytes, no checksum record)")
            f.seek(size - TRAILER - EOCD_SIZE)
            tail = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    eocd, comment = tail[:EOCD_SIZE], tail[EOCD_SIZE:]
    if eocd[:4] != EOCD or eocd[-2:] != struct.pack("<H", TRAILER) or not comment.startswith(MAGIC):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, or not one edgetrain wrote (no checksum "
                              "record at its end; the older format 1 had none)")
    try:
        digest = _sha256(path, size - TRAILER)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    if comment[len(MAGIC):] != digest.encode():
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: SHA-256 mismatch (the file changed after "
                              "it was written: a disk or copy error)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint: checksum first, then ``torch.load(weights_only=True)``, then its layout. Missing, corrupt,
    truncated or foreign files give a one-line :class:`CheckpointError`."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a parser of a file: whatever it raises, the file is unreadable)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an edgetrain checkpoint of format {FORMAT!r} (found {found!r})")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    _check_layout(path, payload)
    return payload


def _check_layout(path: Path, p: dict[str, Any]) -> None:
    """The types the training loop relies on (a checksum-valid file written by another program may differ)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed checkpoint: {what}")

    if not isinstance(p["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in p["model"].items()):
        raise bad("'model' is not a state dict of tensors")
    opt = p["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"),
                                                                                             list):
        raise bad("'optimizer' is not an optimizer state dict")
    if isinstance(p["step"], bool) or not isinstance(p["step"], int) or p["step"] < 0:
        raise bad(f"'step' is {p['step']!r}, not a step count")
    for key in ("config", "recipe", "fingerprint", "techniques", "rng"):
        if not isinstance(p[key], dict):
            raise bad(f"{key!r} is a {type(p[key]).__name__}, not a mapping")


def remove_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files a killed write of any of ``names`` left in ``directory``; returns them.

    Only call this while no other process writes there (the training loop holds the directory's lock)."""
    directory = Path(directory)
    found = [p for p in directory.iterdir() if p.name.endswith(".tmp")
             and any(p.name.startswith(temporary_prefix(n)) for n in names)] if directory.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


class RunDir:
    """The directory of one training run (``--out``): owned by one process at a time, never mixed.

    :meth:`open` refuses a directory that is a file, cannot be written, is held by a running process (an
    ``flock`` on ``.edgetrain.lock``, released by the OS even on ``kill -9``) or already holds files, unless
    ``resume`` (continue the run there) or ``force`` (delete its run files, :data:`RUN_FILES`; other files stay).
    It then removes the temporary files a killed write left."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.pt"
        self.metrics = self.path / "metrics.jsonl"
        self._lock = None

    def open(self, *, resume: bool = False, force: bool = False) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p}: exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
            lock = open(p / LOCK, "a+")  # noqa: SIM115  (held until close)
        except OSError as e:
            raise ConfigError(f"--out {p}: cannot write there ({e.strerror or e})") from None
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise ConfigError(f"--out {p}: another edgetrain run is writing there") from None
        self._lock = lock
        try:
            held = sorted(e.name for e in p.iterdir() if e.name != LOCK)
            if held and not (resume or force):
                more = f" and {len(held) - 3} more" if len(held) > 3 else ""
                raise ConfigError(f"--out {p}: already holds {', '.join(held[:3])}{more}; pass --resume to continue "
                                  "the run there, --force to replace it, or choose another --out")
            stale = remove_temporaries(p, RUN_FILES)
            if stale:
                print(f"edgetrain: removed {len(stale)} incomplete temporary file(s) a killed run left in {p}",
                      file=sys.stderr)
            if force:
                for name in RUN_FILES:
                    (p / name).unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock is not None:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
