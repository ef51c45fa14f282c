"""The command line refuses what it cannot do in one sentence (exit code 2, no traceback, nothing written or
started), warns about links that cannot work, and keeps Ray's and hypha-rpc's routine lines off the terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colabel.apps.hypha_server import free_port, port_is_free
from conftest import make_image_folder, start_colabel

pytestmark = pytest.mark.e2e

COLABEL = [sys.executable, "-m", "colabel.apps.cli"]


def run(*args, timeout=120):
    return subprocess.run([*COLABEL, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def refused(result, *fragments: str) -> None:
    """Exit code 2 and one line on stderr, ``colabel: ...`` with every fragment, and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("colabel: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.is_file() and p.read_bytes()) for p in folder.rglob("*"))


def test_a_preannotation_model_that_is_missing_or_not_a_model_is_refused_before_anything_starts(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    before = tree(folder)
    port = free_port()
    serve = ["serve", folder, "--port", port, "--models", ""]
    refused(run(*serve, "--preannotate", tmp_path / "nope.pt"), "--preannotate", "nope.pt: no such file")
    pytest.importorskip("torch")
    (tmp_path / "notes.txt").write_text("hi\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(run(*serve, "--preannotate", tmp_path / "notes.txt"), "notes.txt is not a colabel segmenter file: ",
            "torch.load cannot read it (")
    refused(run(*serve, "--preannotate", tmp_path / "empty.pt"),
            "empty.pt is not a colabel segmenter file: it is empty")
    assert tree(folder) == before and port_is_free("127.0.0.1", port)  # nothing written, no server started
    # the same reason for the other commands that read a segmenter
    result = run("predict", tmp_path / "empty.pt", folder, "--out", tmp_path / "out")
    refused(result, "empty.pt is not a colabel segmenter file: it is empty")
    assert not (tmp_path / "out").exists()


def test_a_segmenter_of_colabel_train_is_taken_by_serve_preannotate(tmp_path, tiny_segmenter):
    folder = make_image_folder(tmp_path / "images")
    process, printed = start_colabel(["serve", str(folder), "--port", str(free_port()), "--no-ray", "--models", "",
                                      "--preannotate", str(tiny_segmenter)])
    try:
        assert "share_url" in printed, printed
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, rest


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_demo_into_a_path_that_cannot_be_a_folder_is_refused(tmp_path, where):
    (tmp_path / "afile.txt").write_text("text")
    if where == "unwritable":
        if not Path("/proc").is_dir():
            pytest.skip("needs /proc")
        target, fragment = Path("/proc/nope"), "cannot write the demo images into /proc/nope: "
    else:
        target = tmp_path / "afile.txt" if where == "a file" else tmp_path / "afile.txt" / "demo"
        fragment = "is not a folder" if where == "a file" else "cannot write the demo images"
    before = tree(tmp_path)
    refused(run("demo", target), fragment)
    refused(run("serve", "--demo", target, "--port", free_port(), "--models", ""), fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/x", "http://", "http://host:port"])
def test_a_public_url_without_http_scheme_and_host_is_refused_before_writing(tmp_path, url):
    refused(run("serve", "--demo", tmp_path / "demo", "--public-url", url, "--models", ""),
            f"--public-url {url!r} is not an http(s) URL with a host")
    assert not (tmp_path / "demo").exists()  # --demo writes only once everything else is checked


def test_serve_warns_about_unbuilt_web_pages_links_to_every_address_and_a_nearly_full_disk(tmp_path, monkeypatch):
    from colabel.apps import cli
    from colabel.apps.provider import rpc
    from colabel.config import ColabelConfig

    monkeypatch.setattr(rpc, "WEB_DIST", tmp_path / "web_dist")
    warnings = cli.serve_warnings(ColabelConfig(host="0.0.0.0", port=9600))
    assert len(warnings) == 2
    assert "web pages are not built" in warnings[0] and "scripts/build-web.sh" in warnings[0]
    assert "--public-url" in warnings[1] and ":9600" in warnings[1]
    assert cli.serve_warnings(ColabelConfig(host="0.0.0.0", public_url="http://lab.example.org:9600"))[1:] == []
    (tmp_path / "web_dist").mkdir()
    for page in ("index.html", "annotate.html"):
        (tmp_path / "web_dist" / page).write_text("<html></html>")
    assert cli.serve_warnings(ColabelConfig()) == []
    assert cli.serve_warnings(ColabelConfig(), tmp_path) == []  # this disk has over 512 MiB free
    [full] = cli.serve_warnings(ColabelConfig(min_free_bytes=2**60), tmp_path)
    assert full.startswith(f"the disk of {tmp_path} has ") and full.endswith(
        "MiB free, less than the 1099511627776.0 MiB that saves leave free (COLABEL_MIN_FREE_BYTES): every save is "
        "refused until disk space is freed")


def test_models_help_shows_only_its_options_and_defaults():
    models = run("models", "--help").stdout
    assert "--models-url MODELS_URL" not in models and "--models-token" not in models and "FOLDER" not in models
    assert "~/.cache/colabel/embeddings" in models and "(default classical)" in models
    serve = run("serve", "--help").stdout
    assert "--models-url" in serve and "FOLDER/annotations/.cache" in serve
    assert "created if missing" in run("demo", "--help").stdout
    assert "the variant the RayService has" in " ".join(run("cluster", "install", "--help").stdout.split())


def test_pull_from_a_missing_folder_says_so_before_asking_for_a_session(tmp_path):
    refused(run("pull", tmp_path / "nope", "--out", tmp_path / "out"), f"folder {tmp_path / 'nope'} does not exist")
    refused(run("pull", tmp_path / "nope", "--session", "s-1", "--out", tmp_path / "out"), "does not exist")
    assert sorted(tmp_path.iterdir()) == []


def test_remote_errors_reach_the_user_as_their_reason():
    from colabel.apps.provider.assist import remote_message

    exc = Exception("Traceback (most recent call last):\n  ...\ncolabel.apps.provider.rpc.ServiceError: "
                    "AccessDeniedError: invalid or revoked session token")
    assert remote_message(exc) == "AccessDeniedError: invalid or revoked session token"  # ModelAssist maps the kind
    assert remote_message(exc, kind=False) == "invalid or revoked session token"
    assert remote_message(Exception("Exception: colabel.errors.NotFoundError: no image x"), kind=False) == "no image x"
    assert remote_message(Exception("InvalidInputError: get_image: bad region"), kind=False) == "get_image: bad region"
    assert remote_message(Exception("a plain reason: kept")) == "a plain reason: kept"


def read_until_ready(process, timeout: float = 120) -> list[str]:
    """Every line ``colabel serve`` printed (stdout and stderr) up to "Press Ctrl-C"."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            break
    return lines


def test_a_pull_with_a_bad_token_says_why_in_one_sentence_without_exception_names(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    process, printed = start_colabel(["serve", str(folder), "--port", str(free_port()), "--no-ray", "--models", ""])
    try:
        assert "share_url" in printed, printed
        trainer = printed["share_url"].split("annotate.html#", 1)[0] + "#trainer=badtoken"
        result = run("pull", trainer, "--out", tmp_path / "gp2")
        refused(result, "pull failed: ")
        assert "Error" not in result.stderr and "ServiceError" not in result.stderr, result.stderr
        assert "Connection lost" not in result.stdout + result.stderr  # hypha-rpc's line on a deliberate disconnect
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "Connection lost" not in rest, rest


def test_serve_with_ray_and_verbose_shows_rays_routine_lines_and_stops_on_sigint(tmp_path):
    """-v keeps Ray's and Serve's own lines (without it there are none: test_cli's ray-serve demo run checks that);
    SIGINT to colabel alone shuts Serve down gracefully."""
    pytest.importorskip("ray")
    folder = make_image_folder(tmp_path / "images")
    args = ["-v", "serve", str(folder), "--port", str(free_port()), "--models", "coreset"]
    process = subprocess.Popen([*COLABEL, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        lines = read_until_ready(process)
        assert lines and lines[-1].startswith("Press Ctrl-C"), lines
        process.send_signal(signal.SIGINT)  # to colabel alone: Serve is shut down gracefully
        lines += process.communicate(timeout=120)[0].splitlines()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    assert process.returncode == 0, lines
    printed = "\n".join(lines)
    assert "HTTP config differs" in printed and "INFO " in printed, printed
