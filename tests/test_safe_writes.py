"""One process per folder (an flock the OS releases) and atomic replacement of files."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from plumbing.safe_writes import (LOCK_NAME, FolderInUseError, atomic_path, lock_folder, remove_stale_temporaries,
                                  temporary_path, write_text_atomic)

HOLD = ("import sys, time\nfrom plumbing.safe_writes import lock_folder\n"
        "with lock_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until it is killed (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(FolderInUseError, match=f"in use by process {holder.pid} "):
            with lock_folder(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_leaves_no_stale_lock(tmp_path):
    holder = hold_in_another_process(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file stays
    with lock_folder(tmp_path / "run"):  # the lock does not
        assert (tmp_path / "run" / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    with lock_folder(tmp_path):
        pass
    with lock_folder(tmp_path):
        pass


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a lock")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).symlink_to(target)
    with pytest.raises(OSError, match="the lock file is a link, never written through"):
        with lock_folder(tmp_path / "run"):
            pass
    assert target.read_text() == "not a lock"


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_path(target) as first, atomic_path(target) as second:  # two writers, two names
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block finishes last


def test_the_temporary_files_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    left = [temporary_path(tmp_path / name) for name in ("last.pt", "config.json")]  # as kill -9 leaves them
    kept = [".last.pt.tmp", "notes.tmp", ".last.pt.12.nothex!.tmp", "last.pt"]
    for name in kept:
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    nested = temporary_path(tmp_path / "sub" / "x.json")  # another folder, maybe another lock's
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(path.exists() for path in left) and nested.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "sub"])
