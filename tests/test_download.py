"""`preprocess.py --download` against a real HTTP server on 127.0.0.1 serving archives built from
data/sample: a complete download, interrupted transfers that resume, HTTP and network errors,
a file that is not a gzip tar, and malicious archives."""
from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from databases.cpsc2018 import OFFICIAL_REFERENCE, read_reference
from helpers import REPO
from plumbing import download
from plumbing.safe_writes import LOCK_NAME, lock_folder, temporary_path
from preprocess import load_cache, main


class ArchiveServer:
    """Serves ``files`` (URL path -> bytes) with HTTP Range support. ``cut_responses``: how many
    responses (from the first) send only half of what they announce, then close; ``redirects``:
    URL path -> the path it redirects to; ``drip_seconds``: when set, the body is sent one byte
    at a time, this long apart."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut_responses, self.requests = files, 0, []
        self.redirects: dict[str, str] = {}
        self.drip_seconds: float | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[self.path], 0
                if range_header:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                if server.cut_responses > 0:
                    server.cut_responses -= 1
                    rest = rest[: len(rest) // 2]
                if server.drip_seconds is None:
                    self.wfile.write(rest)
                    return
                try:
                    for byte in rest:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(server.drip_seconds)
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-response (a refused write) is no test output

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits up to one poll interval (default 0.5 s)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def sample_archive(sample_dir: Path, folder: str = "WFDB_CPSC2018") -> bytes:
    """A tar.gz of data/sample's records under ``folder``/, without REFERENCE.csv (as the
    Challenge 2021 archive)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(sample_dir, arcname=folder, filter=lambda member: None
                if member.name.endswith(("REFERENCE.csv", "LICENSE.md")) else member)
    return buffer.getvalue()


def malicious_archive(sample_dir: Path, bad: tarfile.TarInfo) -> bytes:
    """A tar.gz of two good records and one bad member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(sample_dir.glob("A0001.*")):
            tar.add(path, arcname=f"WFDB_CPSC2018/{path.name}")
        tar.addfile(bad, io.BytesIO(b"x" * bad.size) if bad.isfile() else None)
    return buffer.getvalue()


@pytest.fixture
def server():
    served = ArchiveServer({})
    yield served
    served.close()


def run_download(tmp_path: Path, url: str) -> int:
    return main(["--download", "--url", url, "--raw-dir", str(tmp_path / "CPSC2018" / "train"),
                 "--out-dir", str(tmp_path / "CPSC2018" / "processed"), "--val-per-class", "1",
                 "--test-per-class", "0"])


def test_a_file_the_download_cannot_write_is_one_line(sample_dir, tmp_path, server, monkeypatch, one_error_line):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    target = tmp_path / "CPSC2018" / "train" / "REFERENCE.csv"

    def full_disk(*args):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(download, "unpack_records", full_disk)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert one_error_line() == f"error: [Errno 28] No space left on device: '{target}'"


def test_download_unpacks_flat_and_preprocesses(sample_dir, tmp_path, server, capsys):
    archive = sample_archive(sample_dir, folder="training/cpsc_2018/g1")
    server.files["/WFDB_CPSC2018.tar.gz"] = archive
    assert run_download(tmp_path, server.url + "/WFDB_CPSC2018.tar.gz") == 0
    out = capsys.readouterr().out
    train = tmp_path / "CPSC2018" / "train"
    assert f"unpacked 36 files from {tmp_path / 'CPSC2018' / 'WFDB_CPSC2018.tar.gz'} into {train}/" in out
    assert "read 18 CPSC2018 records (wfdb form)" in out and "total skipped: 0" in out
    assert sorted(path.name for path in train.iterdir()) == sorted(
        [LOCK_NAME, *(path.name for path in sample_dir.glob("A*"))])
    assert (tmp_path / "CPSC2018" / "WFDB_CPSC2018.tar.gz").read_bytes() == archive
    assert not list((tmp_path / "CPSC2018").glob("*.part"))
    cache = load_cache(tmp_path / "CPSC2018" / "processed")
    official = read_reference(OFFICIAL_REFERENCE).set_index("Recording")
    pd.testing.assert_frame_equal(cache.records[official.columns], official.loc[cache.records.index])
    assert server.requests == [("/WFDB_CPSC2018.tar.gz", None)]


def test_the_official_label_file_joins_a_complete_set_of_records(sample_dir, tmp_path, server):
    """The archive brings no REFERENCE.csv: the given one is copied when it lists only records
    the archive holds (here data/sample's own; for the real archive the official one)."""
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    train = tmp_path / "CPSC2018" / "train"
    report = download.fetch_cpsc2018(train, server.url + "/a.tar.gz", sample_dir / "REFERENCE.csv")
    assert report.splitlines()[0].endswith(f", with REFERENCE.csv from {sample_dir / 'REFERENCE.csv'}")
    assert (train / "REFERENCE.csv").read_bytes() == (sample_dir / "REFERENCE.csv").read_bytes()
    (train / "REFERENCE.csv").unlink()
    report = download.fetch_cpsc2018(train, server.url + "/a.tar.gz", OFFICIAL_REFERENCE)
    assert "REFERENCE.csv" not in report.splitlines()[0]
    assert not (train / "REFERENCE.csv").exists()  # 18 of the 6877 records: the headers decide


def test_a_broken_transfer_is_resumed_with_a_range_request(sample_dir, tmp_path, server, capsys):
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"], server.cut_responses = archive, 1
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    half = len(archive) // 2
    assert server.requests == [("/a.tar.gz", None), ("/a.tar.gz", f"bytes={half}-")]
    assert (tmp_path / "CPSC2018" / "a.tar.gz").read_bytes() == archive
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'CPSC2018' / 'a.tar.gz.part'} at byte {half}" in out
    assert "read 18 CPSC2018 records" in out


def test_a_download_that_keeps_failing_is_kept_and_resumed_by_the_next_run(sample_dir, tmp_path, server,
                                                                            one_error_line):
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"], server.cut_responses = archive, download.ATTEMPTS
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    error = one_error_line()
    partial = tmp_path / "CPSC2018" / "a.tar.gz.part"
    assert "download failed" in error and f"{partial} is kept and the next run resumes it" in error
    kept = partial.stat().st_size
    assert 0 < kept < len(archive) and not (tmp_path / "CPSC2018" / "train").exists()

    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    assert server.requests[-1] == ("/a.tar.gz", f"bytes={kept}-")
    assert (tmp_path / "CPSC2018" / "a.tar.gz").read_bytes() == archive and not partial.exists()


def test_a_complete_archive_is_not_fetched_again(sample_dir, tmp_path, server, capsys):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    assert len(server.requests) == 1


def test_http_404_is_one_line(tmp_path, server, one_error_line):
    assert run_download(tmp_path, server.url + "/moved.tar.gz") == 1
    assert "HTTP 404" in one_error_line()
    assert not any((tmp_path / "CPSC2018").iterdir())


def test_network_error_is_one_line(tmp_path, one_error_line):
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert run_download(tmp_path, f"http://127.0.0.1:{port}/a.tar.gz") == 1
    assert "download failed" in one_error_line()
    assert not (tmp_path / "CPSC2018" / "train").exists()


def test_a_file_that_is_not_a_gzip_tar_is_refused_and_removed(tmp_path, server, one_error_line):
    server.files["/a.tar.gz"] = b"<html>the archive has moved</html>"
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert "not a gzip tar archive" in one_error_line()
    assert not any((tmp_path / "CPSC2018").iterdir())


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, target, 4 if kind == tarfile.REGTYPE else 0
    return member


@pytest.mark.parametrize("bad, reason", [
    (_member("WFDB_CPSC2018/../../escaped.hea"), "climbs out of the target folder with '..'"),
    (_member("/tmp/absolute_member_written.hea"), "has an absolute path"),
    (_member("WFDB_CPSC2018/A0002.hea", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_member("WFDB_CPSC2018/A0003.mat", tarfile.LNKTYPE, "WFDB_CPSC2018/A0001.mat"), "is a link"),
    (_member("WFDB_CPSC2018/console", tarfile.CHRTYPE), "is a device or other special file"),
], ids=["dot-dot", "absolute", "symlink", "hard link", "device"])
def test_a_malicious_archive_is_refused_and_nothing_is_written(sample_dir, tmp_path, server, one_error_line, bad,
                                                              reason):
    server.files["/a.tar.gz"] = malicious_archive(sample_dir, bad)
    work = tmp_path / "work"
    assert run_download(work, server.url + "/a.tar.gz") == 1
    error = one_error_line()
    assert "refused, nothing unpacked" in error and reason in error and error.endswith("the archive was removed")
    assert sorted(path.name for path in work.rglob("*")) == ["CPSC2018"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]
    assert not Path("/tmp/absolute_member_written.hea").exists()


def test_unpacking_replaces_links_in_the_records_folder_and_never_writes_through_them(sample_dir, tmp_path, server):
    """As in the README's mini-study recipe, the records folder holds links to records elsewhere."""
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    elsewhere, train = tmp_path / "elsewhere", tmp_path / "CPSC2018" / "train"
    elsewhere.mkdir()
    train.mkdir(parents=True)
    for name in ("A0001.hea", "A0001.mat", "REFERENCE.csv"):
        (elsewhere / name).write_text("not to be overwritten")
        (train / name).symlink_to(elsewhere / name)
    (train / "A0004.mat").symlink_to(elsewhere / "dangling.mat")
    download.fetch_cpsc2018(train, server.url + "/a.tar.gz", sample_dir / "REFERENCE.csv")
    assert all(path.read_text() == "not to be overwritten" for path in elsewhere.iterdir())
    assert sorted(path.name for path in elsewhere.iterdir()) == ["A0001.hea", "A0001.mat", "REFERENCE.csv"]
    for name in ("A0001.hea", "A0001.mat", "A0004.mat"):
        assert not (train / name).is_symlink() and (train / name).read_bytes() == (sample_dir / name).read_bytes()



def test_a_partial_download_that_is_a_link_is_removed_never_written_through(sample_dir, tmp_path, server, capsys):
    """A .part left as a link (planted, or by a copy) would send the archive's bytes to its target."""
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"] = archive
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"someone else's file")
    partial = tmp_path / "CPSC2018" / "a.tar.gz.part"
    partial.parent.mkdir()
    partial.symlink_to(outside)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    assert outside.read_bytes() == b"someone else's file"
    assert f"{partial} is a link to {outside}: removed (its target left alone); the download starts afresh" in (
        capsys.readouterr().out)
    assert server.requests == [("/a.tar.gz", None)]  # no Range: nothing of the target was counted as fetched
    assert not partial.exists() and not partial.is_symlink()
    assert (tmp_path / "CPSC2018" / "a.tar.gz").read_bytes() == archive



def test_a_link_put_in_place_of_the_partial_download_after_the_check_is_not_written_through(
        sample_dir, tmp_path, server, monkeypatch, one_error_line):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"someone else's file")
    partial = tmp_path / "CPSC2018" / "a.tar.gz.part"
    monkeypatch.setattr(download, "_no_link_to_resume", lambda path: path.symlink_to(outside))
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert "Too many levels of symbolic links" in one_error_line()
    assert outside.read_bytes() == b"someone else's file" and partial.is_symlink()

def test_a_partial_download_that_is_a_folder_is_refused_in_one_line(tmp_path, server, one_error_line):
    partial = tmp_path / "CPSC2018" / "a.tar.gz.part"
    (partial / "inside").mkdir(parents=True)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert one_error_line() == (f"error: {partial}: not a regular file, so no partial download to resume; "
                                "move it away and run again")
    assert server.requests == [] and (partial / "inside").is_dir()


def test_the_archive_replaces_a_link_at_its_destination_never_writes_through_it(sample_dir, tmp_path, server):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    outside = tmp_path / "outside.tar.gz"
    destination = tmp_path / "CPSC2018" / "a.tar.gz"
    destination.parent.mkdir()
    destination.symlink_to(outside)  # dangling: no archive yet, so the download runs
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    assert not outside.exists() and not destination.is_symlink()
    assert destination.read_bytes() == server.files["/a.tar.gz"]


def test_an_unpack_removes_the_temporaries_of_a_killed_unpack_and_nothing_else(sample_dir, tmp_path, server, capsys):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    train = tmp_path / "CPSC2018" / "train"
    train.mkdir(parents=True)
    # as an unpack killed while writing leaves them: atomic_path's temporaries of a record and of REFERENCE.csv
    left = [temporary_path(train / "A0001.mat"), temporary_path(train / "REFERENCE.csv"),
            train / ".A0002.hea.4242.0123abcd.tmp"]
    left[-1].write_bytes(b"half a header")
    kept = {"notes.txt": b"mine", ".A0001.mat.tmp": b"mine too", "A9999.hea": b"a record of my own",
            "sub/.A0003.mat.4242.0123abcd.tmp": b"another folder's"}
    for name, content in kept.items():
        (train / name).parent.mkdir(exist_ok=True)
        (train / name).write_bytes(content)
    download.fetch_cpsc2018(train, server.url + "/a.tar.gz")
    assert not any(path.exists() for path in left)
    assert all((train / name).read_bytes() == content for name, content in kept.items())
    assert f"removed 3 temporary files an interrupted unpack left in {train}" in capsys.readouterr().out
    assert (train / "A0001.mat").read_bytes() == (sample_dir / "A0001.mat").read_bytes()


def test_a_second_unpack_into_a_records_folder_in_use_is_one_line(sample_dir, tmp_path, server, one_error_line):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    train = tmp_path / "CPSC2018" / "train"
    with lock_folder(train):  # as an unpack that is still writing
        live = temporary_path(train / "A0001.mat")
        assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert one_error_line().startswith(f"error: {train}: this records folder is in use by process ")
    assert live.exists() and sorted(path.name for path in train.iterdir()) == sorted([LOCK_NAME, live.name])
    assert (tmp_path / "CPSC2018" / "a.tar.gz").read_bytes() == server.files["/a.tar.gz"]  # kept for the rerun


def _archive_with(sample_dir: Path, name: str, size: int) -> bytes:
    """A tar.gz of data/sample's A0001 and a member ``name`` of ``size`` zero bytes."""
    member = tarfile.TarInfo(name)
    member.size = size
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(sample_dir.glob("A0001.*")):
            tar.add(path, arcname=f"WFDB_CPSC2018/{path.name}")
        tar.addfile(member, io.BytesIO(bytes(size)))
    return buffer.getvalue()


def test_a_member_far_larger_than_any_record_is_refused_before_unpacking(sample_dir, tmp_path, server,
                                                                         one_error_line):
    server.files["/a.tar.gz"] = _archive_with(sample_dir, "WFDB_CPSC2018/A0002.mat", download.MAX_MEMBER_BYTES + 1)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert one_error_line() == (
        f"error: {tmp_path / 'CPSC2018' / 'a.tar.gz'}: refused, nothing unpacked: 'WFDB_CPSC2018/A0002.mat' holds "
        f"{download.MAX_MEMBER_BYTES + 1} bytes, more than the {download.MAX_MEMBER_BYTES} of any CPSC2018 file; "
        "the archive was removed")
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["CPSC2018"]


def test_files_larger_together_than_cpsc2018_are_refused_before_unpacking(sample_dir, tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(sample_archive(sample_dir))
    monkeypatch.setattr(download, "MAX_TOTAL_BYTES", sum(path.stat().st_size for path in sample_dir.glob("A*")) - 1)
    with pytest.raises(download.DownloadError, match="refused, nothing unpacked: its files hold .* bytes, more than"), \
            contextlib.ExitStack() as locks:
        download.unpack_records(archive, tmp_path / "train", locks)
    assert not archive.exists() and not (tmp_path / "train").exists()


def test_a_member_with_more_data_than_its_header_says_is_cut_off(sample_dir, tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(sample_archive(sample_dir))
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, member: io.BytesIO(bytes(member.size + 1)))
    with pytest.raises(download.DownloadError, match=r"damaged archive \(more data than the \d+ bytes its header"), \
            contextlib.ExitStack() as locks:
        download.unpack_records(archive, tmp_path / "train", locks)
    assert not archive.exists() and [path.name for path in (tmp_path / "train").iterdir()] == [LOCK_NAME]


def test_a_refused_archive_is_not_reused_by_a_download_from_another_address(sample_dir, tmp_path, server):
    server.files["/old/a.tar.gz"] = malicious_archive(sample_dir, _member("WFDB_CPSC2018/../x.hea"))
    server.files["/new/a.tar.gz"] = sample_archive(sample_dir)
    assert run_download(tmp_path, server.url + "/old/a.tar.gz") == 1
    assert run_download(tmp_path, server.url + "/new/a.tar.gz") == 0
    assert server.requests == [("/old/a.tar.gz", None), ("/new/a.tar.gz", None)]
    assert (tmp_path / "CPSC2018" / "a.tar.gz").read_bytes() == server.files["/new/a.tar.gz"]


def test_a_server_that_drips_bytes_is_given_up_in_one_line(sample_dir, tmp_path, server, monkeypatch,
                                                           one_error_line):
    server.files["/a.tar.gz"], server.drip_seconds = sample_archive(sample_dir), 0.01
    monkeypatch.setattr(download, "STALL_SECONDS", 0.2)
    started = time.monotonic()
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert time.monotonic() - started < 5
    partial = tmp_path / "CPSC2018" / "a.tar.gz.part"
    assert one_error_line() == (f"error: {server.url}/a.tar.gz: download failed (stalled: less than 64 KiB in "
                                f"0.2 s); {partial} is kept and the next run resumes it")
    assert 0 < partial.stat().st_size < len(server.files["/a.tar.gz"])  # the bytes that arrived are kept
    assert len(server.requests) == download.ATTEMPTS


def test_a_redirect_loop_is_one_line(tmp_path, server, one_error_line):
    server.redirects["/a.tar.gz"] = "/a.tar.gz"
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 1
    assert "HTTP 302 The HTTP server returned a redirect error that would lead to an infinite loop" in one_error_line()


# preprocess.main under a file size limit (SIGXFSZ ignored, as Python does: the write fails with EFBIG).
SIZE_LIMITED_MAIN = """
import resource, sys
import preprocess
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(preprocess.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fetched", [False, True], ids=["archive", "record"])
def test_a_file_that_cannot_be_written_is_one_line_naming_it(sample_dir, tmp_path, server, fetched):
    """Under a file size limit of 200 kB the archive (about 1.9 MB) cannot be fetched, nor can the
    largest records (up to 216 kB) be unpacked from an archive fetched before."""
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"] = archive
    root = tmp_path / "CPSC2018"
    if fetched:
        root.mkdir()
        (root / "a.tar.gz").write_bytes(archive)
    done = subprocess.run([sys.executable, "-c", SIZE_LIMITED_MAIN, "200000", "--download", "--url",
                           server.url + "/a.tar.gz", "--raw_dir", str(root / "train"), "--out_dir",
                           str(root / "processed")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    if fetched:
        assert done.stderr.startswith(f"error: {root / 'train'}/A") and done.stderr.endswith(
            ".mat: cannot write (File too large)\n")
        assert not list((root / "train").glob(".*.tmp"))
    else:
        assert done.stderr == (f"error: {root / 'a.tar.gz.part'}: cannot write the archive (File too large); what "
                               "arrived is kept and the next run resumes it\n")
        assert len(server.requests) == 1  # a local failure is not retried


# --- integrity: the records against REFERENCE.csv, the archive's SHA-256 -------------------------

def test_the_records_are_checked_against_the_official_names(sample_dir, tmp_path, server, capsys):
    server.files["/a.tar.gz"] = sample_archive(sample_dir)
    assert run_download(tmp_path, server.url + "/a.tar.gz") == 0
    listed = sorted(read_reference(OFFICIAL_REFERENCE)["Recording"])
    first_missing = [name for name in listed if not (sample_dir / f"{name}.hea").exists()][:5]
    assert (f"records checked against the 6877 names of {OFFICIAL_REFERENCE}: 18 present, 6859 missing "
            f"({', '.join(first_missing)} and 6854 more), 0 extra\n") in capsys.readouterr().out


def test_missing_and_extra_records_are_named_and_counted(sample_dir, tmp_path, server):
    """An archive without A0004 and with a record that REFERENCE.csv does not list; a lone .hea
    (A0012 without its .mat) is no record either."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(sample_dir.glob("A*")):
            if path.stem != "A0004" and path.name != "A0012.mat":
                tar.add(path, arcname=f"WFDB_CPSC2018/{path.name}")
        for suffix in (".hea", ".mat"):
            tar.add(sample_dir / f"A0001{suffix}", arcname=f"WFDB_CPSC2018/A9999{suffix}")
    server.files["/a.tar.gz"] = buffer.getvalue()
    report = download.fetch_cpsc2018(tmp_path / "train", server.url + "/a.tar.gz", sample_dir / "REFERENCE.csv")
    assert report.splitlines()[1] == (f"records checked against the 18 names of {sample_dir / 'REFERENCE.csv'}: "
                                      "16 present, 2 missing (A0004, A0012), 1 extra (A9999)")


def test_an_archive_of_the_given_sha256_is_unpacked(sample_dir, tmp_path, server, capsys):
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"] = archive
    digest = hashlib.sha256(archive).hexdigest()
    assert main(["--sha256", digest.upper(), "--url", server.url + "/a.tar.gz", "--raw_dir",
                 str(tmp_path / "CPSC2018" / "train"), "--out_dir", str(tmp_path / "CPSC2018" / "processed"),
                 "--val_per_class", "1", "--test_per_class", "0"]) == 0
    assert "read 18 CPSC2018 records" in capsys.readouterr().out


def test_an_archive_of_another_sha256_is_refused_removed_and_not_unpacked(sample_dir, tmp_path, server,
                                                                          one_error_line):
    archive = sample_archive(sample_dir)
    server.files["/a.tar.gz"] = archive
    expected = "0" * 64
    assert main(["--download", "--sha256", expected, "--url", server.url + "/a.tar.gz", "--raw_dir",
                 str(tmp_path / "CPSC2018" / "train")]) == 1
    assert one_error_line() == (f"error: {tmp_path / 'CPSC2018' / 'a.tar.gz'}: refused, nothing unpacked: its "
                                f"SHA-256 is {hashlib.sha256(archive).hexdigest()}, not the {expected} given with "
                                "--sha256; the archive was removed")
    assert list((tmp_path / "CPSC2018").iterdir()) == []


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "0" * 65])
def test_a_malformed_sha256_is_refused_before_anything_is_fetched(tmp_path, server, one_error_line, digest):
    assert main(["--sha256", digest, "--url", server.url + "/a.tar.gz", "--raw_dir", str(tmp_path / "train")]) == 2
    assert one_error_line() == f"error: --sha256 {digest!r}: not a SHA-256 digest (64 hexadecimal digits)"
    assert server.requests == [] and not (tmp_path / "train").exists()
