"""Files a run writes are readable by colleagues under the usual umask, and a stage's lock leaves no file behind
yet still frees itself when its holder is killed."""
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import MedkoError
from engine.files import atomic_write, hold_lock, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_atomic_writes_take_the_mode_the_umask_gives(tmp_path, umask):
    umask(0o022)
    write_json_atomic({"a": 1}, tmp_path / "meta.json")
    with atomic_write(tmp_path / "ckpt", directory=True) as tmp:
        (tmp / "state.json").write_text("{}")
    assert mode(tmp_path / "meta.json") == 0o644
    assert mode(tmp_path / "ckpt") == 0o755 and mode(tmp_path / "ckpt" / "state.json") == 0o644
    umask(0o077)  # a user who keeps everything private still does
    write_text_atomic("x", tmp_path / "private.md")
    assert mode(tmp_path / "private.md") == 0o600
    umask(0o027)
    write_text_atomic("x", tmp_path / "group.md")
    assert mode(tmp_path / "group.md") == 0o640


def test_a_lock_is_exclusive_and_its_file_goes_when_it_is_released(tmp_path):
    path = tmp_path / ".s3_korean.lock"
    lock = hold_lock(path, "s3")
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(MedkoError, match=f"s3 is in use by process {os.getpid()} "):
        hold_lock(path, "s3")
    lock.close()
    assert not path.exists()
    lock.close()  # twice is harmless
    again = hold_lock(path, "s3")
    again.close()
    assert not path.exists()


def test_a_lock_left_by_a_killed_process_is_free(tmp_path):
    path = tmp_path / ".s2_embed.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.files import hold_lock; "
                               "lock = hold_lock(__import__('pathlib').Path(sys.argv[1]), 's2'); "
                               "print('held', flush=True); time.sleep(300)", str(path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MedkoError, match=f"in use by process {holder.pid} "):
            hold_lock(path, "s2")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert path.read_text() == f"{holder.pid}\n"  # a kill leaves the file, and its lock with the process
    lock = hold_lock(path, "s2")
    assert path.read_text() == f"{os.getpid()}\n"
    lock.close()
    assert not path.exists()


def test_a_lock_file_removed_while_being_taken_is_taken_afresh(tmp_path, monkeypatch):
    """A holder removes its file as it ends; a process that opened the old file meanwhile must not think it holds
    the path while a third process locks the new file."""
    import fcntl

    import engine.files

    path = tmp_path / ".s4_translate.lock"
    holder = hold_lock(path, "s4")
    real_flock, calls = fcntl.flock, []

    def flock_after_release(f, op):  # the holder finishes between this process's open and its flock
        calls.append(op)
        if len(calls) == 1:
            holder.close()
        return real_flock(f, op)

    monkeypatch.setattr(engine.files.fcntl, "flock", flock_after_release)
    lock = hold_lock(path, "s4")
    assert len(calls) == 2 and path.exists()  # the first try locked the removed file and was retried
    assert os.stat(path).st_ino == os.fstat(lock._handle.fileno()).st_ino
    lock.close()
