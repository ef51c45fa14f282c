"""Browser-test support shared by the web test modules: a headless Chromium page and screenshots.

Needs the built pages (``scripts/build-web.sh``), ``pip install playwright`` and Debian's chromium
(``/usr/bin/chromium``, or ``COLABEL_CHROMIUM``); importing modules are skipped otherwise. Set
``COLABEL_SCREENSHOTS=DIR`` to keep the pages' screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

import colabel

WEB_DIST = Path(colabel.__file__).parent / "web_dist"
CHROMIUM = os.environ.get("COLABEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]

if not (WEB_DIST / "annotate.html").is_file():
    pytest.skip(f"the web pages are not built ({WEB_DIST}/annotate.html missing): run scripts/build-web.sh",
                allow_module_level=True)
async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set COLABEL_CHROMIUM)",
                allow_module_level=True)

CLASSES = [{"name": "nucleus", "color": "#e6194b"}, {"name": "other", "color": "#3cb44b"}]


VIEWPORT = {"width": 1280, "height": 800}  # the smallest screen the pages must work on


async def new_page(browser):
    """A page in its own browser context (own localStorage: a separate annotator); page errors collected."""
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    return page


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def browser():
    """One headless Chromium for the whole run (started once: about a second each on a small machine); every test
    opens its pages in contexts of its own with ``new_page(browser)``, so no test sees another's storage."""
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser):
    """A fresh page of a headless Chromium; fails the test on any uncaught page error."""
    page = await new_page(browser)
    yield page
    assert not page.errors, page.errors


async def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path))
    if keep := os.environ.get("COLABEL_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path




async def join(page, url: str, name: str, *, ready: str | None = "body[data-state=ready]", timeout: float = 30_000):
    """Open a share link and join under ``name``; then wait for ``ready`` (a selector; ``None``: no wait)."""
    await page.goto(url)
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", name)
    await page.click("#join")
    if ready:
        await page.wait_for_selector(ready, timeout=timeout)


async def sam_provider(hypha_server, tmp_path: Path, sam, model_id: str, prefix: str):
    """Yield ``(provider, services)``: a DataProvider on a fresh copy of the test images whose annotator service
    has the AI functions, backed by the SAM service ``sam`` in this process (registered under a unique name);
    disconnected afterwards."""
    import secrets

    from hypha_rpc import connect_to_server

    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices
    from colabel.services.gateway import LocalBackend, register_model_services
    from conftest import make_image_folder

    name = f"{prefix}{secrets.token_hex(3)}"
    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    ids = await register_model_services(server, {"sam": LocalBackend("sam", sam)}, prefix=name)
    provider = DataProvider(make_image_folder(tmp_path / "images"))
    services = ProviderServices(provider, server, name=name, public_url=hypha_server.url,
                                assist=ModelAssist(provider, server, ids, sam_model=model_id))
    await services.register()
    try:
        yield provider, services
    finally:
        await server.disconnect()


async def pixel_of(page, x: float, y: float, timeout: float = 10_000) -> tuple[float, float]:
    """The viewport pixel of image pixel (x, y) (rows down), once the map has drawn its first frame: before it the
    page's ``pixelOf`` gives null (OpenLayers knows no pixel of a coordinate yet)."""
    found = await page.wait_for_function("([x, y]) => window.colabel && window.colabel.pixelOf(x, y)", arg=[x, y],
                                         timeout=timeout)
    px, py = await found.json_value()
    return px, py
