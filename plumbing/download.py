"""Fetch CPSC2018 in the PhysioNet/CinC Challenge 2021 WFDB form and unpack it safely.

``python preprocess.py --download [--url URL]`` calls ``fetch_cpsc2018``: the archive is
streamed to ``<name>.part`` beside the records folder (a partial file is resumed with an HTTP
Range request, here and on the next run; a ``.part`` that is a link is removed, never written
through), renamed when complete, then its records are unpacked into the records folder, which
the unpack holds (its lock) while it writes there. The archive is checked before anything is
unpacked: a member that is a link or a device, whose path is absolute or climbs out with
``..``, or whose size is far beyond any CPSC2018 record's, refuses the whole archive, and a
refused archive is removed. Each file is unpacked under a temporary name and renamed over its target, so a link
already in the records folder is replaced, never written through. With ``--sha256`` the
archive's digest is checked before unpacking (a mismatch refuses and removes it); after
unpacking, the records folder is checked against the record names of the official REFERENCE.csv
(the missing and the extra ones counted and the first of them named).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from databases.cpsc2018 import REFERENCE_FILE, read_reference
from plumbing.safe_writes import FolderInUseError, atomic_path, lock_folder, remove_stale_temporaries

# WFDB_CPSC2018.tar.gz of the PhysioNet/CinC Challenge 2021's public training data (listed under
# "Data access" on https://moody-challenge.physionet.org/2021/): the 6877 CPSC2018 records as
# .hea + .mat pairs under WFDB_CPSC2018/.
CPSC2018_ARCHIVE_URL = (
    "https://storage.googleapis.com/physionetchallenge2021-public-datasets/WFDB_CPSC2018.tar.gz"
)
ARCHIVE_NAME = "WFDB_CPSC2018.tar.gz"
RECORD_SUFFIXES = (".hea", ".mat")
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60  # a connection, or a read, that brings nothing for this long fails
# A transfer that brings less than STALL_BYTES in STALL_SECONDS is given up (and resumed like a
# broken one): a server that drips bytes resets the socket timeout with each of them.
STALL_SECONDS = 60
STALL_BYTES = 64 << 10
ATTEMPTS = 3  # a connection that breaks off is resumed this many times per run
# The longest CPSC2018 record, 144 s at 500 Hz, is 12 x 72000 int16 samples, 1.7 MB as a WFDB
# .mat: a member of 16 MiB is no record (nor REFERENCE.csv, 0.1 MB) but a bomb or another file.
MAX_MEMBER_BYTES = 16 << 20
# The 6877 records average about 16 s: about 6877 x 8000 samples x 12 leads x 2 bytes = 1.3 GB
# unpacked. Three times that leaves room for a larger archive of the same kind, not a bomb.
MAX_TOTAL_BYTES = 4 << 30
NAMES_SHOWN = 5  # the records check names this many of the missing (and of the extra) records


class DownloadError(Exception):
    """The archive could not be fetched or unpacked; the message says why and what to do."""


def archive_path(url: str, folder: Path) -> Path:
    """Where the archive from ``url`` is kept: its own file name in ``folder``."""
    name = PurePosixPath(urllib.parse.urlparse(url).path.rstrip("/")).name
    return folder / (name if name.endswith((".tar.gz", ".tgz")) else ARCHIVE_NAME)


def _append(out, chunk: bytes, partial: Path) -> None:
    """Write ``chunk`` through to ``partial``: a full disk or a file size limit is no network
    failure to retry, and its message names the file."""
    try:
        out.write(chunk)
        out.flush()
    except OSError as error:
        raise DownloadError(f"{partial}: cannot write the archive ({error.strerror}); what arrived is kept "
                            "and the next run resumes it") from None


def _fetch_once(url: str, partial: Path) -> None:
    """Append the rest of ``url`` to ``partial``, resuming from its size; raises on any failure."""
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left after offset: the partial file is whole
            return
        raise
    with response:
        resumed = offset and response.status == 206
        if resumed:
            print(f"resuming {partial} at byte {offset}", flush=True)
        elif offset:  # the server ignored Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        # O_NOFOLLOW: a link put in place of the .part since download() checked it is refused, not written through
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if resumed else os.O_TRUNC)
        with open(os.open(partial, flags, 0o666), "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=partial.name.removesuffix(".part"), disable=None,
        ) as bar:
            checked, bytes_since = time.monotonic(), 0
            while chunk := response.read1(CHUNK_BYTES):  # what has arrived, so that the bar moves
                _append(out, chunk, partial)
                bar.update(len(chunk))
                bytes_since += len(chunk)
                if bytes_since >= STALL_BYTES:
                    checked, bytes_since = time.monotonic(), 0
                elif time.monotonic() - checked > STALL_SECONDS:
                    raise TimeoutError(f"stalled: less than {STALL_BYTES >> 10} KiB in {STALL_SECONDS} s")
    if total is not None and partial.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - partial.stat().st_size)


def download(url: str, destination: Path) -> Path:
    """Fetch ``url`` to ``destination`` through ``<destination>.part``; a complete file is kept.

    A broken connection is resumed (HTTP Range) up to ATTEMPTS times; whatever arrived stays
    in the .part file, so the next run resumes too. Raises DownloadError with one line.
    """
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    _no_link_to_resume(partial)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _fetch_once(url, partial)
            break
        except urllib.error.HTTPError as error:
            reason = " ".join(str(error.reason).split())  # a redirect loop's reason spans lines
            raise DownloadError(f"{url}: HTTP {error.code} {reason}; pass the archive's address "
                                "with --url, or unpack it by hand (see the README)") from None
        except ValueError as error:  # urllib's word for an address it cannot use
            raise DownloadError(f"{url}: not a usable address ({error})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            if attempt == ATTEMPTS or not partial.exists() or isinstance(error, urllib.error.URLError):
                kept = f"; {partial} is kept and the next run resumes it" if partial.exists() else ""
                raise DownloadError(f"{url}: download failed ({reason}){kept}") from None
    os.replace(partial, destination)  # a link at destination is replaced, its target left alone
    return destination


def _no_link_to_resume(partial: Path) -> None:
    """Leave ``partial`` a regular file to resume, or absent. A link there (planted, or left by a
    copy) would send the download into its target, maybe outside this folder: it is removed and
    the download starts afresh, since its target was never this download's to resume and
    removing the link loses nothing. A folder or special file there may hold what is not ours
    to remove (and a FIFO would block the write): refused."""
    try:
        mode = os.lstat(partial).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        print(f"{partial} is a link to {os.readlink(partial)}: removed (its target left alone); the download "
              "starts afresh", flush=True)
        partial.unlink()
    elif not stat.S_ISREG(mode):
        raise DownloadError(f"{partial}: not a regular file, so no partial download to resume; move it away "
                            "and run again")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` may not be unpacked, or None for a plain file or folder inside the target."""
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or other special file"
        return f"{member.name!r} is {kind}"
    path = PurePosixPath(member.name)
    if path.is_absolute() or PureWindowsPath(member.name).anchor:
        return f"{member.name!r} has an absolute path"
    if ".." in path.parts:
        return f"{member.name!r} climbs out of the target folder with '..'"
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.name!r} holds {member.size} bytes, more than the {MAX_MEMBER_BYTES} of any CPSC2018 file"
    return None


def _refused(archive: Path, problem: str) -> DownloadError:
    """Remove ``archive``, so that no later run reuses it (whatever --url it is given), and say why."""
    archive.unlink(missing_ok=True)
    return DownloadError(f"{archive}: refused, nothing unpacked: {problem}; the archive was removed")


def _copy_member(source, target, size: int) -> None:
    """Copy a member's ``size`` bytes, refusing any beyond them (a header that understates its data)."""
    copied = 0
    while chunk := source.read(CHUNK_BYTES):
        copied += len(chunk)
        if copied > size:
            raise tarfile.ReadError(f"more data than the {size} bytes its header gives")
        target.write(chunk)


def unpack_records(archive: Path, records_dir: Path, locks: contextlib.ExitStack) -> int:
    """Unpack the .hea, .mat and REFERENCE.csv files of ``archive`` flat into ``records_dir``.

    The records may sit under any subfolder of the archive (WFDB_CPSC2018/, training/...):
    they are written by file name alone, as preprocess reads them. Every member is checked
    before anything is written; a refused or damaged archive is removed. Once the archive
    passes, ``records_dir``'s lock is entered into ``locks`` (the caller holds it for what it
    writes there next) and the temporaries of an unpack killed before are removed. Returns the
    number of files written; raises DownloadError (also when another process holds the folder).
    """
    try:
        tar = tarfile.open(archive, "r:gz")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive}: not a gzip tar archive ({error}); it was removed: check the "
                            "address given with --url") from None
    with tar:
        problems = [problem for problem in map(_member_problem, members) if problem]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise _refused(archive, f"{problems[0]}{more}")
        wanted = [member for member in members if member.isfile() and (
            member.name.endswith(RECORD_SUFFIXES) or PurePosixPath(member.name).name == REFERENCE_FILE)]
        names = [PurePosixPath(member.name).name for member in wanted]
        twice = sorted(name for name, count in Counter(names).items() if count > 1)
        if twice:
            raise _refused(archive, f"two members named {twice[0]!r}")
        if not wanted:
            raise _refused(archive, f"no .hea, .mat or {REFERENCE_FILE} file in the archive")
        total = sum(member.size for member in wanted)
        if total > MAX_TOTAL_BYTES:
            raise _refused(archive, f"its files hold {total} bytes, more than the {MAX_TOTAL_BYTES} that "
                                    "CPSC2018 could take")
        _hold_records_dir(records_dir, locks)
        try:
            for member, name in tqdm(zip(wanted, names), total=len(wanted), desc="unpacking",
                                     unit="file", disable=None):
                with tar.extractfile(member) as source, atomic_path(records_dir / name) as temporary, \
                        open(temporary, "wb") as target:
                    _copy_member(source, target, member.size)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            archive.unlink(missing_ok=True)
            raise DownloadError(f"{archive}: damaged archive ({error}); it was removed: run again to fetch "
                                "it anew") from None
        except OSError as error:
            raise DownloadError(f"{records_dir / name}: cannot write ({error.strerror})") from None
    return len(wanted)


def _hold_records_dir(records_dir: Path, locks: contextlib.ExitStack) -> None:
    """Lock ``records_dir`` into ``locks`` and remove what an unpack killed while writing left there:
    every unpack writes under this lock, so no temporary there belongs to a live one."""
    try:
        locks.enter_context(lock_folder(records_dir, "records folder"))
        removed = remove_stale_temporaries(records_dir)
    except FolderInUseError as error:
        raise DownloadError(str(error)) from None
    except OSError as error:
        raise DownloadError(f"{error.filename or records_dir}: cannot write ({error.strerror})") from None
    if removed:
        print(f"removed {removed} temporary files an interrupted unpack left in {records_dir}", flush=True)


def sha256_of(path: Path) -> str:
    """The SHA-256 digest of a file, in hexadecimal, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _some(names: list[str]) -> str:
    """The first NAMES_SHOWN of ``names`` in parentheses ("" for none)."""
    if not names:
        return ""
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f" ({', '.join(names[:NAMES_SHOWN])}{more})"


def records_check(records_dir: Path, reference: Path) -> str:
    """One line: the records of ``records_dir`` (names with both a .hea and a .mat) against the
    record names of the label file ``reference``: how many are present, missing and extra."""
    listed = set(read_reference(reference)["Recording"])
    present = {path.stem for path in records_dir.glob("*.hea")} & {path.stem for path in records_dir.glob("*.mat")}
    missing, extra = sorted(listed - present), sorted(present - listed)
    return (f"records checked against the {len(listed)} names of {reference}: {len(listed & present)} present, "
            f"{len(missing)} missing{_some(missing)}, {len(extra)} extra{_some(extra)}")


def fetch_cpsc2018(records_dir: Path, url: str = CPSC2018_ARCHIVE_URL, reference: Path | None = None,
                   sha256: str | None = None) -> str:
    """Download the archive beside ``records_dir`` (kept for reruns) and unpack its records into it.

    ``sha256``: the archive's expected digest (hexadecimal), checked before unpacking; an archive
    of another digest is refused and removed. ``reference``: the official REFERENCE.csv; the
    unpacked records are checked against its names (``records_check``), and it is copied into
    ``records_dir`` when the archive brings none and holds every record it lists, so that it
    decides the labels as in the paper (a partial archive keeps the labels of its headers).
    Returns the report (its first line: what was unpacked); raises DownloadError.
    """
    archive = download(url, archive_path(url, records_dir.parent))
    if sha256 is not None and (actual := sha256_of(archive)) != sha256.lower():
        raise _refused(archive, f"its SHA-256 is {actual}, not the {sha256.lower()} given with --sha256")
    note = ""
    with contextlib.ExitStack() as locks:
        count = unpack_records(archive, records_dir, locks)
        if reference is not None and not (records_dir / REFERENCE_FILE).exists():
            listed = read_reference(reference)["Recording"]
            if all((records_dir / f"{name}.hea").is_file() for name in listed):
                with atomic_path(records_dir / REFERENCE_FILE) as temporary:
                    shutil.copyfile(reference, temporary)
                note = f", with {REFERENCE_FILE} from {reference}"
    check = "\n" + records_check(records_dir, reference) if reference is not None else ""
    return f"unpacked {count} files from {archive} into {records_dir}/{note}{check}"
