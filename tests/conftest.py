"""Shared fixtures: a real Hypha server subprocess, a mounted folder of real images, a registered provider,
real hypha-rpc clients on their own connections, and small trained segmenter files."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def hypha_server():
    """A real Hypha server subprocess on a free loopback port, stopped after the test session."""
    from colabel.apps.hypha_server import EmbeddedHypha, free_port

    server = EmbeddedHypha("127.0.0.1", free_port(), ready_timeout=90).start()
    yield server
    server.stop()


def _tiny_unet(folder: Path, ensemble: int) -> Path:
    """Small U-Nets trained for ~1 minute of CPU each on the DSB2018 image with its 125 hand-drawn nuclei."""
    torch = pytest.importorskip("torch")
    import tifffile

    from colabel.services.training.segmenter_training import train_segmenter

    torch.set_num_threads(2)
    image, mask = tifffile.imread(DATA / "dsb2018_nuclei.tif"), tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    model = train_segmenter([image], [mask], epochs=8, crop=64, batch_size=8, channels=(8, 16, 32), encoder="none",
                            seed=0, tta=False, ensemble=ensemble, progress=False)
    return model.save(folder / f"tiny-unet-{ensemble}.pt")


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory) -> Path:
    """A one-network segmenter file (``colabel train``'s format), trained once per test session."""
    return _tiny_unet(tmp_path_factory.mktemp("model"), 1)


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> Path:
    """A two-network ensemble file, trained once per test session."""
    return _tiny_unet(tmp_path_factory.mktemp("model"), 2)


def make_image_folder(folder: Path) -> Path:
    """A mounted folder: real RGB IHC, 16-bit fluorescence, H&E JPEG, and a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "ihc_ki67.png", folder / "ihc_ki67.png")
    shutil.copy(DATA / "dsb2018_nuclei.tif", folder / "dsb2018_nuclei.tif")
    (folder / "sub").mkdir(exist_ok=True)
    shutil.copy(DATA / "he_histo.jpg", folder / "sub" / "he_histo.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@dataclass
class Stack:
    """A provider registered on the real Hypha server, plus what clients need to reach it."""

    provider: object
    services: object
    server: object
    server_url: str
    provider_token: str
    folder: Path


@pytest_asyncio.fixture(loop_scope="session")
async def stack(hypha_server, image_folder):
    """A DataProvider on ``image_folder`` registered under a unique name on the real Hypha server."""
    import secrets

    from hypha_rpc import connect_to_server

    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices

    name = f"t{secrets.token_hex(4)}"
    provider = DataProvider(image_folder)
    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    services = ProviderServices(provider, server, name=name, public_url=hypha_server.url)
    await services.register()
    token = await server.generate_token({"expires_in": 3600})
    yield Stack(provider, services, server, hypha_server.url, token, image_folder)
    await server.disconnect()


@pytest_asyncio.fixture(loop_scope="session")
async def connect(hypha_server):
    """Factory of real hypha-rpc client connections (anonymous unless a token is given); all closed after."""
    from hypha_rpc import connect_to_server

    clients = []

    async def _connect(token: str | None = None, workspace: str | None = None):
        config = {"server_url": hypha_server.url}
        if token:
            config["token"] = token
        if workspace:
            config["workspace"] = workspace
        client = await connect_to_server(config)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001
            pass


def square(x: float, y: float, size: float, cls: str | None = "nucleus") -> dict:
    """A GeoJSON square feature with its top-left corner at (x, y) pixels."""
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}
    if cls:
        feature["properties"]["classification"] = {"name": cls}
    return feature


def collection(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


class Printed(dict):
    """``key: value`` lines of a command's output, with every line it printed in :attr:`lines`."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []


def start_colabel(args: list[str], *, timeout: float = 90, **popen) -> tuple:
    """Run ``colabel ARGS`` as a subprocess until it prints "Press Ctrl-C"; returns (process, printed).

    ``printed`` maps each ``key: value`` line it printed (``share_url``, ``manage_url``, ...) to the value; its
    ``lines`` attribute holds every line printed until then (stdout and stderr).
    """
    import re
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "colabel.apps.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, **popen)
    printed = Printed()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            printed.lines.append(line.rstrip("\n"))
        if match := re.match(r"^(\w+): (\S+)", line):
            printed[match.group(1)] = match.group(2)
        if line.startswith("Press Ctrl-C") or not line:
            break
    return process, printed


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def close_the_pages_of_each_browser_test(request):
    """The browser tests share one Chromium per module (``web_support.browser``): after each test every context it
    opened is closed, so no page of one test keeps polling or holding connections into the next."""
    yield
    if "browser" in request.fixturenames:
        browser = request.getfixturevalue("browser")
        for context in list(browser.contexts):
            try:
                await context.close()
            except Exception:  # noqa: BLE001 - closed by the test already
                pass
