"""download_enwik8 against a local HTTP server (127.0.0.1 only) serving small zips."""

import hashlib
import io
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rwkv_lib.download import DownloadError, download_enwik8, verify_file

TIMEOUT = 5.0
PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(200_000))


def _checks(payload: bytes) -> dict:
    return {"size": len(payload), "md5": hashlib.md5(payload).hexdigest(),
            "sha256": hashlib.sha256(payload).hexdigest()}


def _zip(payload: bytes, member: str = "enwik8") -> bytes:
    # Stored, not deflated: the archive is as large as the payload, so a download that
    # stops half-way stops inside the data.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(member, payload)
    return buffer.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drops = 0  # this many responses stop half-way through the body
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    def url(self, path: str = "/enwik8.zip") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not self.server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if self.server.drops > 0:  # promise len(rest) bytes, send half, hang up
            self.server.drops -= 1
            self.wfile.write(rest[: len(rest) // 2])
            self.close_connection = True
            return
        self.wfile.write(rest)

    def log_message(self, format, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    # Bind an ephemeral port and release it: nothing listens there afterwards.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


def _download(dest: Path, url: str, payload: bytes = PAYLOAD, **overrides) -> Path:
    kwargs = {**_checks(payload), **overrides}
    return download_enwik8(dest, url=url, progress=False, timeout=TIMEOUT, **kwargs)


def test_good_download(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    path = _download(tmp_path, server.url())
    assert path == tmp_path / "enwik8"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enwik8"], "no .part or temp left"


def test_existing_good_file_needs_no_network(tmp_path, closed_port_url):
    (tmp_path / "enwik8").write_bytes(PAYLOAD)
    assert _download(tmp_path, closed_port_url) == tmp_path / "enwik8"


def test_existing_bad_file_is_replaced(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    (tmp_path / "enwik8").write_bytes(PAYLOAD[:-1] + b"x")
    assert _download(tmp_path, server.url()).read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    with pytest.raises(ValueError, match="expected .* md5 .* got .* md5") as info:
        _download(tmp_path, server.url(), md5="0" * 32)
    assert "0" * 32 in str(info.value) and hashlib.md5(PAYLOAD).hexdigest() in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_rejected(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD[:-10])
    with pytest.raises(ValueError, match="expected 200,000 bytes"):
        _download(tmp_path, server.url())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes(server, tmp_path):
    archive = _zip(PAYLOAD)
    server.files["/enwik8.zip"] = archive
    server.drops = 1
    with pytest.raises(ConnectionError, match="again to resume") as info:
        _download(tmp_path, server.url())
    assert isinstance(info.value, DownloadError)
    part = tmp_path / "enwik8.zip.part"
    assert part.stat().st_size == len(archive) // 2
    assert not (tmp_path / "enwik8").exists(), "a truncated download never looks finished"

    assert _download(tmp_path, server.url()).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/enwik8.zip", f"bytes={len(archive) // 2}-")
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    server.ignore_range = True
    (tmp_path / "enwik8.zip.part").write_bytes(b"stale bytes of some older attempt")
    assert _download(tmp_path, server.url()).read_bytes() == PAYLOAD
    assert server.requests[-1][1] == "bytes=33-"


def test_complete_part_file_is_used(server, tmp_path):
    # A crash after the transfer but before unzipping: the server answers 416.
    archive = _zip(PAYLOAD)
    server.files["/enwik8.zip"] = archive
    (tmp_path / "enwik8.zip.part").write_bytes(archive)
    assert _download(tmp_path, server.url()).read_bytes() == PAYLOAD


def test_unreachable_server_explains_the_manual_route(tmp_path, closed_port_url):
    with pytest.raises(ConnectionError) as info:
        _download(tmp_path, closed_port_url)
    message = str(info.value)
    assert closed_port_url in message
    assert "unzip" in message and str(tmp_path) in message
    assert hashlib.md5(PAYLOAD).hexdigest() in message
    assert 'corpus="sample"' in message
    assert not (tmp_path / "enwik8").exists()


def test_missing_file_on_server_is_a_connection_error(server, tmp_path):
    with pytest.raises(ConnectionError, match="404"):
        _download(tmp_path, server.url("/nothing-here.zip"))


def test_not_a_zip(server, tmp_path):
    server.files["/enwik8.zip"] = b"<html>an error page, not an archive</html>" * 100
    with pytest.raises(ValueError, match="damaged"):
        _download(tmp_path, server.url())
    assert list(tmp_path.iterdir()) == [], "the bad .part is deleted"


def test_zip_with_damaged_data(server, tmp_path):
    archive = bytearray(_zip(PAYLOAD))
    archive[len(archive) // 2] ^= 0xFF  # inside the stored member: its CRC no longer fits
    server.files["/enwik8.zip"] = bytes(archive)
    with pytest.raises(ValueError, match="damaged.*CRC"):
        _download(tmp_path, server.url())
    assert list(tmp_path.iterdir()) == []


def test_zip_without_the_member(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD, member="something-else")
    with pytest.raises(ValueError, match="no member 'enwik8'"):
        _download(tmp_path, server.url())
    assert not (tmp_path / "enwik8").exists()


def test_verify_file(tmp_path):
    path = tmp_path / "payload"
    path.write_bytes(PAYLOAD)
    verify_file(path, **_checks(PAYLOAD))
    with pytest.raises(ValueError, match="expected 200,001 bytes, got 200,000"):
        verify_file(path, **{**_checks(PAYLOAD), "size": len(PAYLOAD) + 1})
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_file(path, **{**_checks(PAYLOAD), "sha256": "f" * 64})


# --- archives that are not what they claim ---------------------------------------------------

def _deflated(payload: bytes, member: str = "enwik8") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, payload)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(server, tmp_path, monkeypatch):
    bomb = _deflated(bytes(50_000_000))  # 50 MB of zeros in about 50 kB
    assert len(bomb) < 100_000
    server.files["/enwik8.zip"] = bomb
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(name)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(ValueError, match=r"50,000,000 bytes.*expected 200,000"):
        _download(tmp_path, server.url())
    assert opened == [], "nothing was decompressed"
    assert list(tmp_path.iterdir()) == []


def test_a_member_that_lies_about_its_size_stops_at_the_limit(server, tmp_path, monkeypatch):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    served = {"bytes": 0}

    class Endless(io.RawIOBase):
        """What a decompressor that ignores the declared size would give: no end."""

        def readable(self):
            return True

        def readinto(self, buffer):
            if served["bytes"] > 20 * len(PAYLOAD):  # far past any limit: stop the test
                raise AssertionError(f"read {served['bytes']:,} bytes and still reading")
            buffer[:] = bytes(len(buffer))
            served["bytes"] += len(buffer)
            return len(buffer)

    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: io.BufferedReader(Endless()))
    with pytest.raises(ValueError, match="more than the expected 200,000 bytes"):
        _download(tmp_path, server.url())
    assert served["bytes"] <= 2 * len(PAYLOAD) + (1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_an_interrupted_unzip_are_removed(server, tmp_path):
    server.files["/enwik8.zip"] = _zip(PAYLOAD)
    (tmp_path / ".enwik8.k3j4h5g6.tmp").write_bytes(b"half of enwik8")
    _download(tmp_path, server.url())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enwik8"]


def test_a_missing_destination_parent_is_not_created(tmp_path, closed_port_url):
    with pytest.raises(FileNotFoundError, match="typo"):
        _download(tmp_path / "typo" / "data", closed_port_url)
    assert list(tmp_path.iterdir()) == []


def test_download_and_data_do_not_import_each_other():
    import subprocess
    import sys

    code = ("import sys, rwkv_lib.download; print('rwkv_lib.data' in sys.modules); "
            "import inspect; print(inspect.signature(rwkv_lib.download.download_enwik8)"
            ".parameters['dest_dir'].default is inspect.Parameter.empty)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["False", "True"]
