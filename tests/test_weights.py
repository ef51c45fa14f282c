"""Weight downloads against a real local HTTP server: checksums, cache, truncation, corruption, offline."""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import xxhash

from colabel.errors import ColabelError, InvalidInputError, NotFoundError
from colabel.services import weights
from colabel.services.weights import (
    ChecksumMismatchError,
    WeightsUnavailableError,
    default_cache_dir,
    fetch,
    file_checksum,
)

pytestmark = pytest.mark.unit

PAYLOAD = bytes(range(256)) * 4096 + b"tiny checkpoint"  # ~1 MiB, more than one download chunk
SHA = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
XXH = "xxh128:" + xxhash.xxh128(PAYLOAD).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802
        self.server.hits.append(self.path)
        if self.path.startswith("/good"):
            if self.path.startswith("/good-slow"):
                time.sleep(0.5)
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path.startswith("/html"):  # a rate-limit page served with status 200
            body = b"<html>Rate limit exceeded, try later</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/truncated"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


class Server:
    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
        self.httpd.hits = []
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.running = True

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


def leftovers(folder: Path) -> list[str]:
    """Files in the cache other than lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("checksum", [SHA, XXH, None], ids=["sha256", "xxh128", "none"])
def test_download_verifies_and_caches(server, tmp_path, checksum):
    path = fetch(f"{server.url}/good/sam.pt", checksum=checksum, cache_dir=tmp_path, progress=False, model="m")
    assert path == tmp_path / "sam.pt"
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["sam.pt"]
    assert server.hits == ["/good/sam.pt"]


def test_second_call_uses_cache_without_network(server, tmp_path):
    url = f"{server.url}/good/sam.pt"
    first = fetch(url, checksum=XXH, cache_dir=tmp_path, progress=False)
    server.stop()
    weights._verified.clear()  # force a real re-hash of the cached file, not the in-process memo
    second = fetch(url, checksum=XXH, cache_dir=tmp_path, progress=False)
    assert second == first and second.read_bytes() == PAYLOAD
    assert len(server.hits) == 1


def test_wrong_checksum_leaves_no_file(server, tmp_path):
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ChecksumMismatchError, match="not the expected") as info:
        fetch(f"{server.url}/good/sam.pt", checksum=wrong, cache_dir=tmp_path, progress=False, model="sam_x")
    assert isinstance(info.value, WeightsUnavailableError) and isinstance(info.value, ColabelError)
    assert "sam_x" in str(info.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("checksum", [SHA, None], ids=["sha256", "none"])
def test_truncated_download_is_an_error_and_not_cached(server, tmp_path, checksum):
    with pytest.raises(WeightsUnavailableError) as info:
        fetch(f"{server.url}/truncated/sam.pt", checksum=checksum, cache_dir=tmp_path, progress=False, model="m1")
    assert "m1" in str(info.value) and "/truncated/sam.pt" in str(info.value)
    assert leftovers(tmp_path) == []


def test_corrupt_cached_file_is_downloaded_again(server, tmp_path):
    url = f"{server.url}/good/sam.pt"
    path = fetch(url, checksum=SHA, cache_dir=tmp_path, progress=False)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    again = fetch(url, checksum=SHA, cache_dir=tmp_path, progress=False)
    assert again.read_bytes() == PAYLOAD
    assert len(server.hits) == 2
    assert leftovers(tmp_path) == ["sam.pt"]


def test_unreachable_url_names_model_url_and_local_checkpoint(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/weights/sam_vit_b.pth"  # nothing listens there
    with pytest.raises(WeightsUnavailableError) as info:
        fetch(url, checksum=SHA, cache_dir=tmp_path, progress=False, model="sam_vit_b")
    message = str(info.value)
    assert "sam_vit_b" in message and url in message and "local checkpoint" in message
    # what a user of the command line types, not only the Python configuration
    assert "--checkpoint sam_vit_b=/path/to/checkpoint.pt" in message and "checkpoints={'sam_vit_b'" in message
    assert leftovers(tmp_path) == []
    with pytest.raises(WeightsUnavailableError, match="--nuclei-checkpoint /path/to/checkpoint.pth"):
        fetch(url, checksum=SHA, cache_dir=tmp_path, progress=False, model="hovernet_pannuke_fast")


def test_http_error_status(server, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="HTTP status 404"):
        fetch(f"{server.url}/missing.pt", checksum=None, cache_dir=tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_local_path_and_file_url_are_copied(tmp_path):
    source = tmp_path / "src" / "local.pt"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    a = fetch(str(source), checksum=SHA, cache_dir=cache, filename="a.pt", progress=False)
    b = fetch(source.as_uri(), checksum=XXH, cache_dir=cache, filename="b.pt", progress=False)
    assert a.read_bytes() == b.read_bytes() == PAYLOAD
    with pytest.raises(WeightsUnavailableError, match="no file at"):
        fetch(str(tmp_path / "absent.pt"), checksum=None, cache_dir=cache, progress=False)


def test_bad_checksum_format_and_filename(tmp_path):
    with pytest.raises(InvalidInputError, match="sha256:<hex>"):
        fetch("file:///x.pt", checksum="md5:abc", cache_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="plain file name"):
        fetch("file:///x.pt", checksum=None, cache_dir=tmp_path, filename="../x.pt")


def test_generic_download_names_do_not_collide():
    a = weights._default_filename("https://owncloud.example/index.php/s/AAA/download")
    b = weights._default_filename("https://owncloud.example/index.php/s/BBB/download")
    assert a != b and a.endswith("download")
    assert weights._default_filename("https://x.org/a/sam_vit_b_01ec64.pth") == "sam_vit_b_01ec64.pth"


def test_file_checksum_formats(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(PAYLOAD)
    assert file_checksum(p, "sha256") == SHA
    assert file_checksum(p, "xxh128") == XXH


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COLABEL_CACHE_DIR", str(tmp_path / "w"))
    assert default_cache_dir() == tmp_path / "w"
    monkeypatch.delenv("COLABEL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "colabel" / "weights"


def test_require_local(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        weights.require_local(tmp_path / "nope.pt", model="m")


def test_two_processes_download_once(server, tmp_path):
    """Two processes fetch the same slow file at once: the lock makes one download, both get it."""
    from sam_fixtures import fetch_worker

    ctx = multiprocessing.get_context("spawn")
    url = f"{server.url}/good-slow/sam.pt"
    outs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=fetch_worker, args=(url, str(tmp_path / "cache"), SHA, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [o.read_text() for o in outs]
    assert all(r.startswith("ok ") for r in results), results
    assert server.hits == ["/good-slow/sam.pt"]
    assert leftovers(tmp_path / "cache") == ["sam.pt"]


# -- review D7-D10 ------------------------------------------------------------------------------------------

def test_a_checksum_with_a_digest_of_the_wrong_length_is_refused_before_any_request(server, tmp_path):
    for checksum, digits in [("sha256:abc", 64), ("xxh128:" + "0" * 64, 32)]:
        with pytest.raises(InvalidInputError, match=f"must have {digits} hex digits"):
            fetch(f"{server.url}/good/sam.pt", checksum=checksum, cache_dir=tmp_path, progress=False)
    assert server.hits == [] and leftovers(tmp_path) == []


def test_a_local_file_that_is_the_cache_target_is_verified_in_place_and_never_deleted(tmp_path):
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"my weights")
    wrong = "sha256:" + "1" * 64
    for url in (str(mine), mine.as_uri()):
        with pytest.raises(ChecksumMismatchError, match=f"{mine}.*not the expected {wrong}; it was left as it is"):
            fetch(url, checksum=wrong, cache_dir=tmp_path, progress=False)
        assert mine.read_bytes() == b"my weights"
    right = "sha256:" + hashlib.sha256(b"my weights").hexdigest()
    assert fetch(str(mine), checksum=right, cache_dir=tmp_path, progress=False) == mine
    assert fetch(str(mine), checksum=None, cache_dir=tmp_path, progress=False) == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt"]  # no copy, no lock, no temporary file


def test_part_files_of_a_killed_download_are_removed_by_the_next_download(server, tmp_path):
    stale = [tmp_path / ".sam.pt.7jgvznix.part", tmp_path / ".sam.pt.abc.part"]
    for part in stale:
        part.write_bytes(b"half a download")
    other = tmp_path / ".other.pt.x1.part"  # another file's: not this lock's business
    other.write_bytes(b"x")
    path = fetch(f"{server.url}/good/sam.pt", checksum=SHA, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == [".other.pt.x1.part", "sam.pt"]


def test_an_unloadable_hovernet_download_is_deleted_and_downloaded_again(server, tmp_path):
    pytest.importorskip("torch")
    from colabel.services.nuclei.hovernet import load_hovernet

    url = f"{server.url}/html/hovernet_fast_pannuke_type_tf2pytorch.tar"
    cached = tmp_path / "hovernet_fast_pannuke_type_tf2pytorch.tar"
    for attempt in (1, 2):
        with pytest.raises(WeightsUnavailableError) as info:
            load_hovernet(url, cache_dir=tmp_path, progress=False)
        message = str(info.value)
        assert str(cached) in message and url in message
        assert "deleted and will be downloaded again next time" in message
        assert "weights_only" not in message and "add_safe_globals" not in message
        assert not cached.exists() and leftovers(tmp_path) == []
        assert len(server.hits) == attempt  # the bad file was not kept: each load downloads again


def test_load_error_reason_drops_torchs_advice_to_load_unsafely(tmp_path):
    torch = pytest.importorskip("torch")

    html = tmp_path / "page.pt"
    html.write_bytes(b"<html>Rate limit exceeded</html>")
    pickled = tmp_path / "objects.pt"
    torch.save({"a": Fraction(1, 3)}, pickled)  # a class outside torch's allowlist
    for path in (html, pickled):
        with pytest.raises(Exception) as info:
            torch.load(path, weights_only=True)
        assert "weights_only" in str(info.value)
        reason = weights.load_error_reason(info.value)
        assert "weights_only" not in reason and "\n" not in reason and reason.startswith(type(info.value).__name__)
