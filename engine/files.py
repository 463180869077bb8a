"""Files and directories written whole or not at all (one helper, atomic_write, and its JSON/JSONL/text uses),
JSON reading, sha256 and the stage lock.

Imports nothing of medko's.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from engine.errors import MedkoError


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode(directory: bool = False) -> int:
    """The mode an ordinary open() or mkdir() gives under the process umask: 0644 and 0755 with the usual 022.
    mkstemp and mkdtemp give 0600 and 0700 whatever the umask, which would keep a run's reports from colleagues."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read from /proc where Linux shows it: setting it to read it back would, for that moment,
    give files made by other threads (TensorBoard's writer) the wrong mode."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write a file (or fill a directory) into; renamed onto `path` when the
    block ends, removed when it raises, so a crash never leaves half a file at `path`. What appears has the mode
    an ordinary write would give it under the umask (umask_mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():  # a writer may have left nothing, and replace() then fails as it should
            tmp.chmod(umask_mode(directory))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(obj: Any, path: str | Path) -> None:
    write_text_atomic(json.dumps(obj, ensure_ascii=False, indent=1), path)


def write_jsonl_atomic(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StageLock:
    """An exclusive flock on a lock file, held while this object is open; close() removes the file, then drops
    the lock, so a finished stage leaves no lock file behind."""

    def __init__(self, path: Path, handle: IO):
        self.path, self._handle = path, handle
        self.name = str(path)

    def close(self) -> None:
        if self._handle.closed:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._handle.fileno()).st_ino:  # still ours, not a successor's
                self.path.unlink()
        self._handle.close()


def hold_lock(path: Path, what: str) -> StageLock:
    """An exclusive lock on `path` until the returned lock is closed; a second taker is refused in one sentence
    naming the holder's PID. The kernel drops a lock when its process ends, however it ends, so a lock file left
    by a killed process is simply taken over. A lock file removed by its holder while another process was opening
    it is retried, so two processes never hold locks on two different files of one path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "that has not yet written its PID"
            f.close()
            raise MedkoError(f"{what} is in use by process {holder} (lock {path}); wait for it to end or stop it, "
                             f"then run again") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the holder removed the file as it finished: take the path afresh
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return StageLock(path, f)
