"""The annotator page when things go wrong, in a real headless Chromium against a real provider on a real Hypha
server: a server restart, a tab closed with unsaved work, a revoked link or closed session, a server without SAM
weights; and the small things a reviewer found (the name dialog and Escape, chip contrast, cut-off header texts,
an annotator with nothing left to do). Skipped without the built pages, playwright or Chromium (see web_support)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets

import pytest
import pytest_asyncio
from test_web import draw_polygon, he_image, near, saved, settled
from web_support import CLASSES, browser, join, new_page, page, sam_provider  # noqa: F401 - fixtures

from conftest import make_image_folder

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

FIRST = [(20, 20), (120, 20), (120, 80), (20, 80)]
SECOND = [(200, 150), (400, 150), (400, 280), (200, 280)]
DRAFTS = "Object.entries(localStorage).filter(([k]) => k.includes(':draft:')).map(([k, v]) => [k, JSON.parse(v)])"


async def drafts(page) -> list:
    """The unsaved drawings the page keeps in localStorage: [[key, {base_version, saved_at, annotation}], ...]."""
    return await page.evaluate(DRAFTS)


def versions_of(folder, session_id: str, image: str) -> tuple[str, list[str]]:
    """The only annotator's folder name under the image, and its saved version files."""
    (annotator,) = (folder / "annotations" / "sessions" / session_id / "images" / image).glob("a-*")
    return annotator.name, sorted(p.name for p in annotator.glob("v*.geojson"))


@pytest.mark.parametrize("key", ["new", "kept"])
async def test_after_a_server_restart_the_page_opens_a_new_connection_and_saves_what_was_drawn_meanwhile(
        browser, tmp_path, key):
    """The reviewer's steps: join, save v1, stop the server, draw, restart it on the same port. The restarted
    server signs its tokens with a new key (the old connection's token is refused) or the same (as `colabel
    serve` does now: the old connection may come back by itself)."""
    from hypha_rpc import connect_to_server

    from colabel.apps.hypha_server import EmbeddedHypha, free_port
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices

    port, root, signing = free_port(), f"colabel-{secrets.token_urlsafe(48)}", secrets.token_urlsafe(32)
    provider = DataProvider(make_image_folder(tmp_path / "images"))
    he, _ = he_image(provider)
    session, secret = provider.create_session(name="restart", classes=CLASSES, image_ids=[he])

    async def start():
        hypha = EmbeddedHypha("127.0.0.1", port, root_token=root, ready_timeout=90,
                              jwt_secret=signing if key == "kept" else None)
        await asyncio.to_thread(hypha.start)
        server = await connect_to_server({"server_url": hypha.url, "token": root})
        services = ProviderServices(provider, server, name="restart", public_url=hypha.url)
        await services.register()
        return hypha, server, services

    hypha, server, services = await start()
    url = services.share_url(secret)
    page = await new_page(browser)
    console = []
    page.on("console", lambda m: console.append(m.text))
    try:
        await join(page, url, "Rhea")
        await draw_polygon(page, FIRST)
        assert await settled(page) == 1
        assert await drafts(page) == []  # acknowledged: nothing kept

        await server.disconnect()  # the provider stops, then its server
        await asyncio.to_thread(hypha.stop)
        await draw_polygon(page, SECOND)
        await page.wait_for_selector("#save-status[data-state=failed]", timeout=30_000)

        hypha, server, services = await start()  # same port, same folder, a new signing key
        assert services.share_url(secret) == url
        await page.click("#save-status")  # retry now
        assert await settled(page, timeout=60_000) == 2
        assert await drafts(page) == []
        name, files = versions_of(provider.folder, session.session_id, he)
        assert files == ["v000001.geojson", "v000002.geojson"]
        features = saved(provider.folder, session.session_id, he, name, 2)
        assert len(features) == 2 and near(features[1]["geometry"]["coordinates"][0], SECOND)

        # the old connection was closed: it does not go on knocking with its refused token
        console.clear()
        await page.wait_for_timeout(3000)
        assert not [m for m in console if "Signature verification" in m], console
        # and the new one works for everything else: a reload finds the saved version
        await page.reload()
        await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        assert await page.text_content("#save-status") == "saved v2"
        assert await page.evaluate("window.colabel.source.getFeatures().length") == 2
        assert not page.errors, page.errors
    finally:
        await page.context.close()
        try:
            await server.disconnect()
        finally:
            await asyncio.to_thread(hypha.stop)


# What an earlier version of the page kept: the same entries under the share token itself and, for drafts, under the
# annotator key (run once, before the page's own script, on the next page of the profile).
AS_AN_EARLIER_PAGE_KEPT = """(() => {
  if (localStorage.getItem("test:rewritten")) return;
  localStorage.setItem("test:rewritten", "1");
  const secret = SECRET;
  for (const key of Object.keys(localStorage)) {
    const value = localStorage.getItem(key);
    if (!/:t[0-9a-f]{16}$/.test(key) || !value.includes("annotator_key")) continue;
    const old = key.replace(/:t[0-9a-f]{16}$/, ":" + secret);
    const annotatorKey = JSON.parse(value).annotator_key;
    for (const draft of Object.keys(localStorage).filter((k) => k.startsWith(key + ":draft:"))) {
      const image = draft.slice(draft.lastIndexOf(":") + 1);
      localStorage.setItem(`${old}:draft:${annotatorKey}:${image}`, localStorage.getItem(draft));
      localStorage.removeItem(draft);
    }
    localStorage.setItem(old, value);
    localStorage.removeItem(key);
  }
})();"""


@pytest.mark.parametrize("kept_by", ["this page", "an earlier page"])
async def test_a_drawing_not_saved_when_the_tab_closed_is_restored_when_the_link_is_opened_again_then_saved(
        stack, browser, kept_by):
    """With "an earlier page", the browser holds what the page kept before its storage keys were labels of the
    secrets: the entries move to the labelled keys, and the annotator and the drawing are found as before."""
    he, _ = he_image(stack.provider)
    session, secret = stack.provider.create_session(name="draft", classes=CLASSES, image_ids=[he])
    url = stack.services.share_url(secret)
    page = await new_page(browser)
    await join(page, url, "Dina")
    await draw_polygon(page, FIRST)
    assert await settled(page) == 1

    annotate_id = f"{stack.services.name}-annotate"
    await stack.server.unregister_service(annotate_id)  # the provider is unreachable
    await draw_polygon(page, SECOND)
    await page.wait_for_selector("#save-status[data-state=failed]", timeout=30_000)
    ((key, kept),) = await drafts(page)
    assert he in key and secret not in key  # no page of the origin finds the share token in the storage
    stored = await page.evaluate("Object.entries(localStorage)")
    annotator_key = next(json.loads(v)["annotator_key"] for _, v in stored if "annotator_key" in v)
    assert all(secret not in k and secret not in v and annotator_key not in k for k, v in stored)
    assert kept["base_version"] == 1 and len(kept["annotation"]["features"]) == 2
    assert not page.errors, page.errors
    await page.close()  # the tab is closed with the second polygon unsaved

    await stack.server.register_service({"id": annotate_id, "config": {"visibility": "public"},
                                         **stack.services.annotator_functions()})
    if kept_by == "an earlier page":
        await page.context.add_init_script(AS_AN_EARLIER_PAGE_KEPT.replace("SECRET", json.dumps(secret)))
    page = await page.context.new_page()  # the same browser profile: the same localStorage
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert await settled(page) == 2
    status = await page.text_content("#save-status")
    assert status.startswith("saved v2") and "restored" in status, status
    assert await page.evaluate("window.colabel.source.getFeatures().length") == 2
    assert await drafts(page) == []  # acknowledged: forgotten
    stored = await page.evaluate("Object.entries(localStorage)")
    assert [k for k, v in stored if "annotator_key" in v and "Dina" in v] and all(secret not in k for k, _ in stored)
    name, files = versions_of(stack.folder, session.session_id, he)
    features = saved(stack.folder, session.session_id, he, name, 2)
    assert files == ["v000001.geojson", "v000002.geojson"] and len(features) == 2
    assert near(features[0]["geometry"]["coordinates"][0], FIRST)
    assert near(features[1]["geometry"]["coordinates"][0], SECOND)

    # opened again once saved: the server's version, nothing restored
    await page.reload()
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert await page.text_content("#save-status") == "saved v2"
    assert not errors, errors
    await page.context.close()


@pytest.mark.parametrize("how", ["revoked", "closed"])
async def test_a_revoked_link_or_closed_session_stops_the_saves_says_so_and_offers_the_drawing(stack, page, how):
    he, _ = he_image(stack.provider)
    session, secret = stack.provider.create_session(name=f"final-{how}", classes=CLASSES, image_ids=[he])
    await join(page, stack.services.share_url(secret), "Finn")
    await draw_polygon(page, FIRST)
    assert await settled(page) == 1

    if how == "revoked":
        stack.provider.sessions.revoke_token(session.session_id, session.tokens[0].token_id)
    else:
        stack.provider.sessions.set_state(session.session_id, "closed")
    await draw_polygon(page, SECOND)
    await page.wait_for_selector("#banner:not([hidden])", timeout=30_000)
    banner = await page.text_content("#banner-text")
    reason = "This link was revoked" if how == "revoked" else "The session is closed"
    assert banner == f"{reason}: your last changes were not saved.", banner
    status = await page.text_content("#save-status")
    assert status == f"not saved: {reason[0].lower()}{reason[1:]}", status
    assert (await page.locator("header").bounding_box())["height"] < 50  # still one row

    # not retried: nothing is sent again, the status stays put
    attempts = await page.evaluate("window.colabel.saver.failures")
    await page.wait_for_timeout(2500)
    assert await page.evaluate("window.colabel.saver.failures") == attempts
    assert await page.text_content("#save-status") == status and "retry in" not in status
    assert await page.evaluate("window.colabel.saver.dirty")  # still unsaved (closing the tab asks first)

    # the drawing, both polygons, can be downloaded
    async with page.expect_download() as info:
        await page.click("#banner-download")
    download = await info.value
    assert download.suggested_filename.endswith(".unsaved.geojson")
    drawing = json.loads(open(await download.path()).read())
    assert len(drawing["features"]) == 2
    assert near(drawing["features"][1]["geometry"]["coordinates"][0], SECOND)
    name, files = versions_of(stack.folder, session.session_id, he)
    assert files == ["v000001.geojson"]


async def test_escape_does_not_close_the_name_dialog_whose_textbox_has_a_label(stack, page):
    ihc = next(im.image_id for im in stack.provider.list_images() if im.name == "ihc_ki67.png")
    _, secret = stack.provider.create_session(name="escape", classes=CLASSES, image_ids=[ihc])
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    await page.goto(stack.services.share_url(secret))
    await page.wait_for_selector("#name-dialog[open]")
    for _ in range(3):  # Chrome lets a second Escape close a dialog whatever its cancel handler says
        await page.keyboard.press("Escape")
        await page.wait_for_timeout(200)
        assert await page.evaluate("document.getElementById('name-dialog').open")
    await page.get_by_role("textbox", name=re.compile("^Your name")).fill("Esme")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert not await page.evaluate("document.getElementById('name-dialog').open")
    await page.focus("#map")  # focusable: the keyboard zooms
    resolution = await page.evaluate("window.colabel.map.getView().getResolution()")
    await page.keyboard.press("+")
    await page.wait_for_function(f"window.colabel.map.getView().getResolution() < {resolution}")
    assert not [m for m in console_errors if "favicon" in m or "404" in m], console_errors


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two CSS ``rgb(...)`` colours."""

    def luminance(color: str) -> float:
        r, g, b = (int(v) / 255 for v in re.findall(r"\d+", color)[:3])
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


async def test_the_selected_class_chip_is_readable_on_its_colour_and_cut_off_header_texts_have_tooltips(stack,
                                                                                                       page):
    classes = [{"name": "orange", "color": "#e69f00"}, {"name": "yellow", "color": "#f0e442"},
               {"name": "lemon", "color": "#ffff00"}, {"name": "blue", "color": "#0072b2"}]
    ihc = next(im.image_id for im in stack.provider.list_images() if im.name == "ihc_ki67.png")
    long_name = "a session with a long name, longer than the header can show at 1280 px with four classes"
    _, secret = stack.provider.create_session(name=long_name.strip(), classes=classes, image_ids=[ihc])
    await join(page, stack.services.share_url(secret), "Chip")
    for i, cls in enumerate(classes):
        await page.keyboard.press(str(i + 1))
        chip = page.locator(".classes .class.active")
        assert (await chip.text_content()).endswith(cls["name"])
        fg, bg = await chip.evaluate("(e) => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]")
        assert contrast(fg, bg) >= 4.5, (cls, fg, bg)
    for selector in ("#session-name", "#position"):
        text = await page.text_content(selector)
        assert text and await page.get_attribute(selector, "title") == text, selector
    assert await page.text_content("#session-name") == long_name.strip()


async def test_an_annotator_with_nothing_left_to_do_is_told_so_not_thanked(stack, browser):
    ihc = next(im.image_id for im in stack.provider.list_images() if im.name == "ihc_ki67.png")
    _, secret = stack.provider.create_session(name="nothing left", classes=CLASSES, image_ids=[ihc])
    url = stack.services.share_url(secret)
    first = await new_page(browser)
    await join(first, url, "First")
    await draw_polygon(first, FIRST)
    await settled(first)
    await first.click("#next-image")
    await first.wait_for_selector("body[data-state=done]", timeout=30_000)
    assert await first.text_content("#message") == "No more images for you in this session. Thank you!"
    assert await first.text_content("#position") == "all 1 images done"

    second = await new_page(browser)  # the only image already has its annotator
    await join(second, url, "Second", ready="body[data-state=done]")
    said = await second.text_content("#message")
    assert said.startswith("No images are left for you in this session") and "Thank you" not in said, said
    assert await second.text_content("#position") == "no images left for you"
    assert await second.get_attribute("#position", "title") == "no images left for you"
    for p in (first, second):
        assert not p.errors, p.errors
        await p.context.close()


async def test_next_image_on_an_untouched_image_saves_it_empty_and_says_so(stack, page):
    ids = {im.name: im.image_id for im in stack.provider.list_images()}
    ihc, dsb = ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]
    session, secret = stack.provider.create_session(name="empty", classes=CLASSES, image_ids=[ihc, dsb])
    await join(page, stack.services.share_url(secret), "Emma")
    first = await page.evaluate("window.colabel.state.image.name")
    await page.click("#next-image")  # nothing drawn: an empty version records "nothing to annotate here"
    await page.wait_for_function(f"window.colabel.state.image && window.colabel.state.image.name !== '{first}'",
                                 timeout=30_000)
    await page.wait_for_function(
        f"document.getElementById('message').textContent === 'no objects drawn on {first}: saved as empty'")
    image = ids[first]
    name, files = versions_of(stack.folder, session.session_id, image)
    assert files == ["v000001.geojson"] and saved(stack.folder, session.session_id, image, name, 1) == []
    assert stack.provider.store.finished(session.session_id)[image][name]["version"] == 1  # saved, then finished

    await page.click("#next-image")  # the last one, untouched too: said with the end of the session
    await page.wait_for_selector("body[data-state=done]", timeout=30_000)
    said = await page.text_content("#message")
    second = next(n for n in ids if ids[n] in (ihc, dsb) and n != first)
    assert said.startswith(f"no objects drawn on {second}: saved as empty. No more images"), said


async def test_next_image_goes_on_when_the_saved_image_cannot_be_finished_and_says_so(stack, page):
    from test_web import wait_saved

    ids = {im.name: im.image_id for im in stack.provider.list_images()}
    session, secret = stack.provider.create_session(name="gone", classes=CLASSES,
                                                    image_ids=[ids["ihc_ki67.png"], ids["dsb2018_nuclei.tif"]])
    await join(page, stack.services.share_url(secret), "Fay")
    first = await page.evaluate("window.colabel.state.image.name")
    await draw_polygon(page, FIRST)
    await wait_saved(page, 1)
    (stack.folder / first).unlink()  # the image leaves the folder while its annotator is on it
    stack.provider.catalog.refresh()
    await page.click("#next-image")
    await page.wait_for_function("document.getElementById('message').textContent.includes('marked finished')",
                                 timeout=30_000)
    said = await page.text_content("#message")
    assert said.startswith(f"{first} is saved, but could not be marked finished: NotFoundError: unknown image id"), said
    assert await page.evaluate("window.colabel.state.image.name") != first  # on the next image
    assert stack.provider.store.finished(session.session_id) == {}


@pytest_asyncio.fixture(loop_scope="session")
async def no_weights_stack(hypha_server, tmp_path, monkeypatch):
    """A provider with SAM functions whose model service cannot get its weights: the published model's
    download URL is unreachable (nothing listens there) and nothing is cached (WeightsUnavailableError)."""
    pytest.importorskip("torch")
    import dataclasses

    from colabel.apps.hypha_server import free_port
    from colabel.services.sam.registry import MODELS
    from colabel.services.sam.service import SamService

    model = "sam_vit_b_lm"
    offline = dataclasses.replace(MODELS[model], url=f"http://127.0.0.1:{free_port()}/weights/vit_b_lm.pt")
    monkeypatch.setitem(MODELS, model, offline)
    sam = SamService(default_model=model, weights_dir=str(tmp_path / "weights"), embedding_dir=str(tmp_path / "emb"))
    async for stack in sam_provider(hypha_server, tmp_path, sam, model, "n"):
        yield stack


async def test_sam_without_weights_on_the_server_is_switched_off_with_a_short_reason(no_weights_stack, page):
    provider, services = no_weights_stack
    he, _ = he_image(provider)
    _, secret = provider.create_session(name="no weights", classes=CLASSES, image_ids=[he])
    await join(page, services.share_url(secret), "Sami")
    await page.wait_for_selector("body[data-sam-path=unavailable]", timeout=60_000)
    assert await page.text_content("#sam-status") == "SAM: not available"
    assert await page.is_disabled("#tool-sam")
    assert (await page.get_attribute("#tool-sam", "title")).startswith("SAM is not available on this server")
    await page.keyboard.press("s")  # the shortcut does nothing either
    assert await page.evaluate("window.colabel.state.tool") == "draw"
    message = await page.text_content("#message")
    assert "WeightsUnavailableError" not in message and "checkpoints" not in message, message
    await draw_polygon(page, FIRST)  # drawing by hand still works
    assert await settled(page) == 1


@pytest.mark.parametrize("choice", ["load the newer version", "keep mine"])
async def test_two_tabs_of_one_annotator_never_save_over_each_other_unasked(stack, browser, choice):
    """Tab B draws on version 0 after tab A saved version 1: B's save is refused (not saved over A's without a
    word), B says so and lets the annotator load A's version or keep B's drawing as the newest."""
    he, (height, _) = he_image(stack.provider)
    session, secret = stack.provider.create_session(name=f"tabs-{choice[:4]}", classes=CLASSES, image_ids=[he])
    url = stack.services.share_url(secret)
    tab_a = await new_page(browser)
    await join(tab_a, url, "Tabea")
    tab_b = await tab_a.context.new_page()  # the same browser: the same annotator key, the same image
    errors = []
    tab_b.on("pageerror", lambda exc: errors.append(str(exc)))
    await tab_b.goto(url)
    await tab_b.wait_for_selector("body[data-state=ready]", timeout=30_000)

    await draw_polygon(tab_a, FIRST)
    assert await settled(tab_a) == 1
    await draw_polygon(tab_b, SECOND)
    await tab_b.wait_for_selector("#banner:not([hidden])", timeout=30_000)
    assert "saved elsewhere" in await tab_b.text_content("#banner-text")
    assert await tab_b.text_content("#save-status") == "not saved: a newer version was saved elsewhere"
    assert await tab_b.is_visible("#banner-reload") and await tab_b.is_visible("#banner-overwrite")
    name, files = versions_of(stack.folder, session.session_id, he)
    assert files == ["v000001.geojson"]  # A's version stands

    if choice == "load the newer version":
        await tab_b.click("#banner-reload")
        await tab_b.wait_for_function("document.querySelector('#save-status').textContent === 'saved v1'")
        assert await tab_b.is_hidden("#banner")
        coordinates = await tab_b.evaluate(
            "window.colabel.source.getFeatures().map((f) => f.getGeometry().getCoordinates()[0])")
        assert len(coordinates) == 1 and near([(x, height - y) for x, y in coordinates[0]], FIRST)  # map y is up
        assert versions_of(stack.folder, session.session_id, he)[1] == ["v000001.geojson"]
        assert await drafts(tab_b) == []
    else:
        await tab_b.click("#banner-overwrite")
        assert await settled(tab_b) == 2
        assert await tab_b.is_hidden("#banner")
        features = saved(stack.folder, session.session_id, he, name, 2)
        assert len(features) == 1 and near(features[0]["geometry"]["coordinates"][0], SECOND)
    assert not errors, errors
    await tab_a.context.close()


async def test_a_save_whose_answer_was_lost_is_no_conflict_for_the_tab_that_sent_it(stack, browser):
    """Tab A's save of v2 is committed but its answer never arrives; the annotator draws on. The next save, still
    drawn on v1, is taken over A's own v2 (the same writer id) with no conflict; had another tab saved v2, it
    would be refused (test_two_tabs_of_one_annotator_never_save_over_each_other_unasked)."""
    he, _ = he_image(stack.provider)
    session, secret = stack.provider.create_session(name="lost-answer", classes=CLASSES, image_ids=[he])
    page = await new_page(browser)
    await join(page, stack.services.share_url(secret), "Lou")
    await draw_polygon(page, FIRST)
    assert await settled(page) == 1
    writer = await page.evaluate("window.colabel.state.writer")
    assert re.fullmatch(r"[0-9a-f]{16}", writer)
    # the provider commits v2 from this tab (its first polygon and a second one), whose answer is lost
    (annotator_id,) = stack.provider.sessions.annotators(session.session_id)
    v1 = stack.provider.store.load(session.session_id, he, annotator_id)
    lost = {"type": "FeatureCollection", "features": [*v1["features"], {
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[300, 20], [340, 20], [340, 60],
                                                                            [300, 20]]]}, "properties": {}}]}
    info = stack.provider.sessions.get(session.session_id)
    assert stack.provider.save_annotation(info, he, annotator_id, lost, base_version=1, writer=writer).version == 2

    await draw_polygon(page, SECOND)  # drawn on: the page still thinks v1 is the latest
    assert await settled(page) == 3
    assert await page.is_hidden("#banner")
    name, files = versions_of(stack.folder, session.session_id, he)
    assert files == ["v000001.geojson", "v000002.geojson", "v000003.geojson"]
    assert len(saved(stack.folder, session.session_id, he, name, 3)) == 2  # the page's drawing
    await page.context.close()
