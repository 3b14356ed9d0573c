"""Writing into a folder safely: one process per folder, files replaced atomically.

``lock_folder`` gives the calling process a folder (a run folder, a cache folder) to itself
with an exclusive ``flock`` on a lock file inside it; the operating system releases it when
the process ends, however it ends, so a killed process never leaves a stale lock.
``atomic_path`` writes a file under a temporary name of its own beside the target and renames
it over the target only when the write succeeded, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"
# temporary_path's names: ".{target's name}.{writer's pid}.{8 hex digits}.tmp".
TEMPORARY_NAME = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{8}\.tmp")


class FolderInUseError(Exception):
    """Another process holds the folder; the message names the folder and the process."""


@contextlib.contextmanager
def lock_folder(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold ``folder`` (created if needed) for this process while the block runs.

    Raises FolderInUseError naming the holder's process id when another process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:  # appending: the loser must not erase the holder's id; never through a link (its target is not ours)
        descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, "the lock file is a link, never written through", str(folder / LOCK_NAME)) from None
    handle = open(descriptor, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise FolderInUseError(f"{folder}: this {what} is in use by process {holder} (it holds "
                                   f"{folder / LOCK_NAME}); wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files (temporary_path's names) that a writer killed before it could
    rename or remove them left directly in ``folder``; returns how many. Call it only while this
    process holds ``folder``'s lock: every writer in the folder holds that lock, so no other
    process is writing there and each such file is a leftover, never a write in progress."""
    stale = [path for path in Path(folder).iterdir() if TEMPORARY_NAME.fullmatch(path.name) and path.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def temporary_path(path: Path) -> Path:
    """A new empty file beside ``path`` under a name no other writer uses (the same folder, so
    that renaming it onto ``path`` is atomic); permissions as for any new file."""
    while True:
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block
    succeeds (a link at ``path`` is replaced, its target left alone), removed when it fails,
    leaving ``path`` as it was. An OSError of the block (a full disk, ``ulimit -f``) is raised
    naming ``path``: a failed write alone does not say which file it was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        if error.errno is None:  # not a system error: raised as it is
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content by ``text`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def read_json(path: Path):
    """``path``'s JSON content; None when the file is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(obj, path: Path) -> None:
    """Replace ``path``'s content by ``obj`` as indented JSON, atomically (``str`` for what JSON lacks)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))
