"""The cell-classification mode of the annotator page (web/src/classify.js) in a real headless Chromium, against
a real provider whose annotator service runs the HALS loop over real nuclei, classifier and Coreset services
(skipped without the built pages, playwright or Chromium: see web_support)."""

from __future__ import annotations

import json
import secrets

import pytest
import pytest_asyncio
from test_hals_loop import dab_truth, start_hals_provider
from web_support import browser, join, new_page, page, screenshot  # noqa: F401 - fixtures

from conftest import make_image_folder

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

CLASSES = [{"name": "positive", "color": "#8b4513"}, {"name": "negative", "color": "#1e90ff"}]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def hals_stack(hypha_server, tmp_path_factory):
    """A provider with the HALS functions, backed by real nuclei, classifier and Coreset services in process."""
    pytest.importorskip("torch")
    stack = await start_hals_provider(hypha_server, tmp_path_factory, "c")
    yield stack
    await stack["server"].disconnect()


def events_of(folder, session_id: str) -> list[dict]:
    path = folder / "annotations" / "sessions" / session_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def join_in_browser(page, url: str, name: str) -> str:
    """Open the share link, join, wait for the classification page's cells; returns the annotator id."""
    await join(page, url, name, ready=None)
    await page.wait_for_function("Number(document.getElementById('classify')?.dataset.cells) > 0", timeout=240_000)
    await page.wait_for_function("window.colabelClassify.S.busy === 0")
    stored = await page.evaluate("Object.values(localStorage).map((v) => JSON.parse(v))")
    return next(s["annotator_id"] for s in stored if "annotator_id" in s)


async def label_from_python(provider, services, connect, secret: str, ihc: str, *, positive: int, negative: int = 10):
    """The first labels through the real annotator service, from Python, by the DAB truth of each cell: the first
    ``positive`` positive and ``negative`` negative cells. Returns ``(annotator service, cells, ids by class)``."""
    client = await connect()
    annotator = await client.get_service(services.annotator_service_id)
    key = (await annotator.join(secret, "Python helper"))["annotator_key"]
    cells = (await annotator.cells(secret, ihc))["cells"]
    truth = dab_truth(provider.get_image(ihc), cells)
    by_class = {c: [i for i, t in truth.items() if t == c] for c in ("positive", "negative")}
    for cell_id in [*by_class["positive"][:positive], *by_class["negative"][:negative]]:
        await annotator.label_cell(secret, key, ihc, cell_id, truth[cell_id])
    return annotator, cells, by_class


async def click_cell(page, cell_id: int) -> None:
    px, py = await page.evaluate("(id) => window.colabelClassify.cellPixel(id)", cell_id)
    await page.mouse.click(px, py)
    await page.wait_for_function("(id) => window.colabelClassify.S.selected.has(id)", arg=cell_id)


async def test_annotator_labels_cells_then_accepts_and_corrects_suggestions_and_follows_the_next_patch(
        hals_stack, page, connect, tmp_path):
    provider, services, hals, folder = (hals_stack[k] for k in ("provider", "services", "hals", "folder"))
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name="ki67 web", classes=CLASSES, mode="classification",
                                              image_ids=[ihc])

    # most of the first labels through the same real annotator service, from Python: 9 positive, 10 negative
    annotator, cells, by_class = await label_from_python(provider, services, connect, secret, ihc, positive=9)

    # the browser annotator: every nucleus outline shown, no suggestions yet, progress per class
    me = await join_in_browser(page, services.share_url(secret), "Browser Pathologist")
    assert await page.evaluate("window.colabelClassify.S.cells.size") == len(cells)
    assert await page.get_attribute("#classify", "data-suggestions") == "0"
    await page.wait_for_function(
        "document.getElementById('classify-model').textContent.includes('positive 1, negative 0')")
    assert f"19 of {len(cells)} cells" in await page.text_content("#classify-progress")
    assert not await page.is_visible("#map") and not await page.is_visible("#tools")

    # click + number key: the 10th positive label reaches the threshold; the page then shows suggestions
    tenth = by_class["positive"][9]
    await click_cell(page, tenth)
    await page.keyboard.press("1")
    await page.wait_for_function("window.colabelClassify.S.events.label === 1")
    await page.wait_for_function("document.getElementById('classify').dataset.version === '1' && "
                                 "Number(document.getElementById('classify').dataset.suggestions) > 0",
                                 timeout=120_000)
    await page.wait_for_function("document.getElementById('classify-model').textContent.includes('classifier v1')")
    assert f"20 of {len(cells)} cells" in await page.text_content("#classify-progress")
    # the accuracy is what it is: a self-check on the 4 labels (25 % per class) it held out of its 20
    assert (await page.text_content("#classify-model")).startswith("classifier v1, self-check on 4 of its own 20 "
                                                                   "labels: ")
    assert ("label", tenth, "positive") in {(e["kind"], e.get("cell_id"), e.get("class"))
                                            for e in events_of(folder, session.session_id)
                                            if e.get("annotator_id") == me}
    # suggestions muted and dashed, labels in full colours
    styles = await page.evaluate("""(ids) => ids.map((id) => {
        const f = window.colabelClassify.S.cells.get(id).feature;
        const s = [].concat(window.colabelClassify.map.getLayers().item(1).getStyleFunction()(f, 1)).pop();
        return {dash: s.getStroke().getLineDash(), color: s.getStroke().getColor()};
    })""", [tenth, (await page.evaluate("window.colabelClassify.visibleSuggestions()"))[0]["cell_id"]])
    assert styles[0] == {"dash": None, "color": "rgb(139,69,19)"}
    assert styles[1]["dash"] == [4, 3] and styles[1]["color"] not in ("rgb(139,69,19)", "rgb(30,144,255)")
    await screenshot(page, tmp_path, "classify-suggestions")

    # correct one suggestion: select it, press the other class's number
    suggestion = (await page.evaluate("window.colabelClassify.visibleSuggestions()"))[0]
    other = "negative" if suggestion["class"] == "positive" else "positive"
    await click_cell(page, suggestion["cell_id"])
    await page.keyboard.press("2" if other == "negative" else "1")
    await page.wait_for_function("window.colabelClassify.S.events.suggestion_corrected === 1")
    corrected = [e for e in events_of(folder, session.session_id) if e["kind"] == "suggestion_corrected"]
    assert [(e["annotator_id"], e["cell_id"], e["class"], e["suggested"]) for e in corrected] == [
        (me, suggestion["cell_id"], other, suggestion["class"])]

    # next suggested patch: the view moves to the patch the Coreset service chose
    await hals.wait_for_training(session)
    await page.click("#classify-next-patch")
    await page.wait_for_function("window.colabelClassify.S.patch !== null")
    shown = await page.evaluate("window.colabelClassify.S.patch")
    expected = await annotator.next_patch(secret, ihc)  # same labels, same model: the same answer
    assert {k: shown[k] for k in ("x0", "y0", "x1", "y1")} == {k: expected[k] for k in ("x0", "y0", "x1", "y1")}
    await page.wait_for_function("window.colabelClassify.S.busy === 0 && window.colabelClassify.viewRegion().width"
                                 f" < {shown['x1'] - shown['x0'] + 200}")
    # the cells and suggestions of the patch's view are in: the status line still describes the patch, with the
    # suggestions in its box and in view, and both it and the button say that "Accept all visible" takes all in view
    await page.wait_for_function("JSON.stringify(window.colabelClassify.S.shown) === "
                                 "JSON.stringify(window.colabelClassify.viewRegion())")
    await page.wait_for_function("window.colabelClassify.S.busy === 0")
    status_line = await page.text_content("#classify-status")
    in_view = len(await page.evaluate("window.colabelClassify.visibleSuggestions()"))
    assert status_line.startswith(f"next patch (dashed box) x {shown['x0']}–{shown['x1']}, "
                                  f"y {shown['y0']}–{shown['y1']}: holds {shown['count']} of the "), status_line
    assert f" in the box, {in_view} in view" in status_line and "Accept all visible" in status_line, status_line
    assert await page.text_content("#classify-accept") == f"Accept all visible ({in_view})"
    view = await page.evaluate("window.colabelClassify.viewRegion()")
    assert view["x"] <= shown["x0"] and view["y"] <= shown["y0"]
    assert view["x"] + view["width"] >= shown["x1"] and view["y"] + view["height"] >= shown["y1"]
    centre = (view["x"] + view["width"] / 2, view["y"] + view["height"] / 2)
    assert abs(centre[0] - (shown["x0"] + shown["x1"]) / 2) < 3 or view["x"] == 0 or view["x"] + view["width"] == 512
    assert abs(centre[1] - (shown["y0"] + shown["y1"]) / 2) < 3 or view["y"] == 0 or view["y"] + view["height"] == 512

    # accept all visible: every suggested cell in view gets its suggestion, recorded as accepted
    await page.wait_for_function("window.colabelClassify.visibleSuggestions().length > 0")
    visible = await page.evaluate("window.colabelClassify.visibleSuggestions()")
    assert len(visible) < len(cells) - 21  # the view is the patch, not the whole image
    await screenshot(page, tmp_path, "classify-patch")
    await page.click("#classify-accept")
    await page.wait_for_function("window.colabelClassify.S.labelling === 0", timeout=60_000)
    assert await page.evaluate("window.colabelClassify.S.events") == {
        "label": 1, "suggestion_corrected": 1, "suggestion_accepted": len(visible)}
    accepted = {e["cell_id"]: e for e in events_of(folder, session.session_id) if e["kind"] == "suggestion_accepted"}
    assert set(accepted) == {s["cell_id"] for s in visible}
    assert all(accepted[s["cell_id"]]["class"] == s["class"] and accepted[s["cell_id"]]["annotator_id"] == me
               for s in visible)
    assert await page.get_attribute("#classify", "data-suggestions") == "0"
    n_labelled = 21 + len(visible)
    await page.wait_for_function(f"document.getElementById('classify-progress').textContent"
                                 f".includes('{n_labelled} of {len(cells)} cells')")
    await screenshot(page, tmp_path, "classify-accepted")


async def test_switching_to_an_image_of_the_same_size_loads_its_cells_without_moving_the_map(hals_stack, page, connect):
    provider, services = hals_stack["provider"], hals_stack["services"]
    ids = {im.name: im.image_id for im in provider.list_images()}
    both = [ids["dsb2018_nuclei.tif"], ids["ihc_ki67.png"]]
    assert {provider.get_image(i).shape[:2] for i in both} == {(512, 512)}  # the same view fits both
    session, secret = provider.create_session(name="two images", classes=CLASSES, mode="classification",
                                              image_ids=both)
    # each image segmented beforehand, so the browser's cells requests answer at once
    client = await connect()
    annotator = await client.get_service(services.annotator_service_id)
    n_cells = {i: len((await annotator.cells(secret, i))["cells"]) for i in both}
    assert all(n_cells.values())

    await join_in_browser(page, services.share_url(secret), "Switcher")
    first = await page.evaluate("window.colabelClassify.S.image.image_id")
    view = await page.evaluate("window.colabelClassify.viewRegion()")
    for image_id in [next(i for i in both if i != first), first]:
        await page.select_option("#classify-image", image_id)
        # no pan or zoom: the page loads the new image's cells by itself (no moveend follows an unchanged view)
        await page.wait_for_function(
            "(id) => window.colabelClassify.S.image.image_id === id && window.colabelClassify.S.cells.size > 0 "
            "&& window.colabelClassify.S.busy === 0", arg=image_id, timeout=20_000)
        assert await page.evaluate("window.colabelClassify.S.cells.size") == n_cells[image_id]
        assert await page.evaluate("window.colabelClassify.viewRegion()") == view
        assert f"0 of {n_cells[image_id]} cells" in await page.text_content("#classify-progress")


# cells at least `gap` viewport pixels from each other (and from the map's edges): [[id, x, y], ...]
SPREAD_CELLS = """([n, gap]) => {
    const c = window.colabelClassify;
    const box = c.map.getTargetElement().getBoundingClientRect();
    const out = [];
    for (const id of c.S.cells.keys()) {
        const [x, y] = c.cellPixel(id);
        if (x < box.left + gap || x > box.right - gap || y < box.top + gap || y > box.bottom - gap) continue;
        if (out.every(([, u, v]) => Math.hypot(x - u, y - v) >= gap)) out.push([id, x, y]);
        if (out.length === n) break;
    }
    return out;
}"""
VIEW_STATE = "((v) => [v.getResolution(), ...v.getCenter()])(window.colabelClassify.map.getView())"


async def test_quick_clicks_and_shift_clicks_on_different_cells_select_them_without_zooming(hals_stack, page):
    provider, services = hals_stack["provider"], hals_stack["services"]
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name="quick clicks", classes=CLASSES, mode="classification",
                                              image_ids=[ihc])
    await join_in_browser(page, services.share_url(secret), "Quick Clicker")
    cells = await page.evaluate(SPREAD_CELLS, [6, 40])
    assert len(cells) == 6
    before = await page.evaluate(VIEW_STATE)

    # two plain clicks on two cells well within OpenLayers' 250 ms double-click time: the second cell selected
    await page.mouse.click(*cells[0][1:])
    await page.mouse.click(*cells[1][1:])
    await page.wait_for_timeout(600)  # a double-click zoom animates for 250 ms
    assert await page.evaluate("[...window.colabelClassify.S.selected]") == [cells[1][0]]
    assert await page.evaluate(VIEW_STATE) == before

    # four shift-clicks 100 ms apart (the multi-select): all five selected, the map neither zoomed out nor in
    await page.keyboard.down("Shift")
    try:
        for _, x, y in cells[2:]:
            await page.mouse.click(x, y)
            await page.wait_for_timeout(100)
    finally:
        await page.keyboard.up("Shift")
    await page.wait_for_timeout(600)
    assert sorted(await page.evaluate("[...window.colabelClassify.S.selected]")) == sorted(c[0] for c in cells[1:])
    assert await page.evaluate(VIEW_STATE) == before


async def test_manager_shows_the_live_classifier_and_cell_labels_per_annotator_of_a_classification_session(
        hals_stack, page, connect, tmp_path):
    provider, services, hals = hals_stack["provider"], hals_stack["services"], hals_stack["hals"]
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name="ki67 managed", classes=CLASSES, mode="classification",
                                              image_ids=[ihc])
    client = await connect()
    annotator = await client.get_service(services.annotator_service_id)
    joined = await annotator.join(secret, "Cell Counter")
    cells = (await annotator.cells(secret, ihc))["cells"]
    truth = dab_truth(provider.get_image(ihc), cells)
    by_class = {c: [i for i, t in truth.items() if t == c] for c in ("positive", "negative")}
    for cell_id in [*by_class["positive"][:10], *by_class["negative"][:10]]:
        await annotator.label_cell(secret, joined["annotator_key"], ihc, cell_id, truth[cell_id])
    await hals.wait_for_training(session)
    status = await annotator.classifier_status(secret)

    token = await hals_stack["server"].generate_token({"expires_in": 3600})
    await page.goto(services.manage_url(token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    card = page.locator(".session", has_text="ki67 managed")
    line = await card.locator(".classifier").text_content()
    # the accuracy worded as the self-check it is: on the 4 labels (25 % per class) held out of the 20, whole percent
    prefix = "20 cells labelled (positive 10, negative 10); classifier v1, self-check on 4 of its own 20 labels: "
    assert line.startswith(prefix), line
    assert abs(int(line[len(prefix):].split("%")[0]) - 100 * status["val_accuracy"]) <= 0.5, line
    (row,) = await card.locator("table.annotators tr[data-annotator-id]").all()
    assert await row.get_attribute("data-annotator-id") == joined["annotator"]["annotator_id"]
    assert await row.locator("td").all_text_contents() == ["Cell Counter", "0", "0", "0", "0 bytes", "20"]
    assert "cell classification" not in line and "classification" in await card.locator("h3").text_content()
    await card.scroll_into_view_if_needed()
    await screenshot(page, tmp_path, "manage-classification")


async def test_classification_page_without_model_services_shows_the_image_and_says_why(stack, page, tmp_path):
    ihc = next(im.image_id for im in stack.provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = stack.provider.create_session(name="no models", classes=CLASSES, mode="classification",
                                                    image_ids=[ihc])
    await page.goto(stack.services.share_url(secret))
    await page.wait_for_selector("#name-dialog[open]")
    await page.fill("#display-name", "Early")
    await page.click("#join")
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert "needs the nuclei and classifier model services" in await page.text_content("#classify-status")
    # OpenLayers draws its canvas on the next animation frame after the image is ready
    await page.wait_for_selector("#classify-map canvas", state="visible", timeout=10_000)
    assert await page.is_visible("#classify-map canvas")
    await page.keyboard.press("1")  # nothing selected: a hint, no error
    assert "select a cell first" in await page.text_content("#classify-status")
    await screenshot(page, tmp_path, "classify-no-models")


async def test_classification_page_with_unreachable_model_services_says_so_and_keeps_working(
        hypha_server, tmp_path, page):
    from hypha_rpc import connect_to_server

    from colabel.apps.provider.assist import ModelAssist
    from colabel.apps.provider.hals import HalsAssist
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices

    name = f"u{secrets.token_hex(3)}"
    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.root_token})
    try:
        # the HALS functions are offered, but the model services they call were never started
        ws = server.config.workspace
        ids = {kind: f"{ws}/gone-{name}:{name}-{kind}" for kind in ("nuclei", "classifier", "coreset")}
        provider = DataProvider(make_image_folder(tmp_path / "images"))
        hals = HalsAssist(ModelAssist(provider, server, ids))
        services = ProviderServices(provider, server, name=name, public_url=hypha_server.url,
                                    assist=hals.assist, hals=hals)
        await services.register()
        ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
        session, secret = provider.create_session(name="down", classes=CLASSES, mode="classification",
                                                  image_ids=[ihc])
        await page.goto(services.share_url(secret))
        await page.wait_for_selector("#name-dialog[open]")
        await page.fill("#display-name", "Patient")
        await page.click("#join")
        await page.wait_for_function(
            "document.getElementById('classify-status').textContent.startsWith('cells unavailable: ')",
            timeout=60_000)
        text = await page.text_content("#classify-status")
        assert "ModelServiceUnavailable: the nuclei model service" in text and "unreachable" in text
        assert await page.is_visible("#classify-map canvas")
        assert (await page.text_content("#classify-progress")).startswith("cells: unavailable")
        # the page still answers: next patch reports the same problem, the live status (no model needed) shows
        await page.click("#classify-next-patch")
        await page.wait_for_function(
            "document.getElementById('classify-status').textContent.startsWith('next patch unavailable: ')",
            timeout=60_000)
        assert "labels still needed per class: positive 10, negative 10" in await page.text_content(
            "#classify-model")
        await screenshot(page, tmp_path, "classify-services-down")
    finally:
        await server.disconnect()


async def session_with_suggestions(hals_stack, connect, name: str):
    """A classification session of the IHC image whose classifier is trained (10 labels per class sent from
    Python): ``(session, secret)``; the browser then shows a suggestion for every other cell of the image."""
    provider, services, hals = hals_stack["provider"], hals_stack["services"], hals_stack["hals"]
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name=name, classes=CLASSES, mode="classification", image_ids=[ihc])
    await label_from_python(provider, services, connect, secret, ihc, positive=10)
    await hals.wait_for_training(session)
    return session, secret


async def join_with_suggestions(page, hals_stack, secret: str, name: str) -> str:
    """Join in the browser and wait for the suggestions of the view; returns the annotator id."""
    me = await join_in_browser(page, hals_stack["services"].share_url(secret), name)
    await page.wait_for_function("Number(document.getElementById('classify').dataset.suggestions) > 0 && "
                                 "window.colabelClassify.S.busy === 0", timeout=120_000)
    return me


LABEL_KINDS = ("label", "suggestion_accepted", "suggestion_corrected")


def labels_by(folder, session_id: str, annotator_id: str) -> list[dict]:
    """The label events of one annotator (not the suggestions shown to them)."""
    return [e for e in events_of(folder, session_id) if e.get("annotator_id") == annotator_id
            and e["kind"] in LABEL_KINDS]


NOTHING_LABELLED = """() => { const S = window.colabelClassify.S;
    return S.labelling === 0 && S.events.label + S.events.suggestion_accepted + S.events.suggestion_corrected === 0;
}"""


async def test_keys_with_ctrl_alt_or_meta_are_not_classification_shortcuts(hals_stack, page, connect):
    session, secret = await session_with_suggestions(hals_stack, connect, "modified keys")
    me = await join_with_suggestions(page, hals_stack, secret, "Reflexive Keyboarder")
    suggestions = await page.evaluate("window.colabelClassify.visibleSuggestions()")
    labels_before = await page.evaluate("window.colabelClassify.S.labels.size")
    cell = suggestions[0]["cell_id"]
    await click_cell(page, cell)

    # Ctrl+A is "select all", Ctrl+1 / Alt+1 / Meta+1 switch browser tabs, Ctrl+P prints: none of them labels a
    # cell, accepts the suggestions in view or moves to the next patch
    for combo in ["Control+1", "Alt+1", "Meta+1", "Control+2", "Control+a", "Meta+a", "Alt+a", "Control+Shift+A",
                  "Control+p", "Alt+p", "Meta+p"]:
        await page.keyboard.press(combo)
    await page.wait_for_timeout(2000)  # a next patch or a label would have been asked for by now
    assert await page.evaluate(NOTHING_LABELLED)
    assert await page.evaluate("window.colabelClassify.S.labels.size") == labels_before
    assert await page.evaluate("window.colabelClassify.S.patch") is None
    assert len(await page.evaluate("window.colabelClassify.visibleSuggestions()")) == len(suggestions)
    assert await page.evaluate("(id) => window.colabelClassify.S.selected.has(id)", cell)
    assert not labels_by(hals_stack["folder"], session.session_id, me)

    # the plain key still labels the selected cell
    await page.keyboard.press("2")
    await page.wait_for_function("(id) => window.colabelClassify.S.labels.get(id) === 'negative' && "
                                 "window.colabelClassify.S.labelling === 0", arg=cell)
    mine = labels_by(hals_stack["folder"], session.session_id, me)
    assert [(e["cell_id"], e["class"]) for e in mine] == [(cell, "negative")]


async def test_shift_and_caps_lock_still_give_the_a_and_p_shortcuts(hals_stack, page, connect):
    session, secret = await session_with_suggestions(hals_stack, connect, "capital keys")
    me = await join_with_suggestions(page, hals_stack, secret, "Caps Lock")
    asked = []

    async def answer(dialog):
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", answer)
    # Caps Lock on: the key reads "P" without Shift
    await page.keyboard.press("P")
    await page.wait_for_function("window.colabelClassify.S.patch !== null", timeout=120_000)
    await page.wait_for_function("JSON.stringify(window.colabelClassify.S.shown) === "
                                 "JSON.stringify(window.colabelClassify.viewRegion()) && "
                                 "window.colabelClassify.S.busy === 0", timeout=120_000)
    await page.wait_for_function("window.colabelClassify.visibleSuggestions().length > 0", timeout=60_000)
    visible = await page.evaluate("window.colabelClassify.visibleSuggestions()")

    # Shift+A: every suggestion in view accepted (after a confirmation, were there over 100)
    await page.keyboard.press("Shift+A")
    await page.wait_for_function(f"window.colabelClassify.S.events.suggestion_accepted === {len(visible)} && "
                                 "window.colabelClassify.S.labelling === 0", timeout=60_000)
    accepted = {e["cell_id"] for e in events_of(hals_stack["folder"], session.session_id)
                if e.get("annotator_id") == me and e["kind"] == "suggestion_accepted"}
    assert accepted == {s["cell_id"] for s in visible}
    assert len(asked) == (len(visible) > 100)


async def test_the_a_key_asks_before_accepting_more_than_100_suggestions_at_once(hals_stack, page, connect):
    session, secret = await session_with_suggestions(hals_stack, connect, "mass accept")
    me = await join_with_suggestions(page, hals_stack, secret, "Careful")
    visible = await page.evaluate("window.colabelClassify.visibleSuggestions()")
    assert len(visible) > 100  # the whole image is in view
    answers = ["dismiss", "accept"]
    asked = []

    async def answer(dialog):
        asked.append(dialog.message)
        await getattr(dialog, answers[len(asked) - 1])()

    page.on("dialog", answer)
    # a stray A over the zoomed-out image: the page asks, and "Cancel" labels nothing
    await page.keyboard.press("a")
    await page.wait_for_function("document.getElementById('classify-status').textContent.startsWith('not accepted')")
    assert asked == [f"Accept all {len(visible)} suggestions in view? Each is recorded as your label of that cell "
                     "(and trains the classifier); this cannot be undone here."]
    assert await page.evaluate(NOTHING_LABELLED)
    assert not labels_by(hals_stack["folder"], session.session_id, me)

    # asked again and confirmed: all of them accepted
    await page.keyboard.press("a")
    await page.wait_for_function(f"window.colabelClassify.S.events.suggestion_accepted === {len(visible)} && "
                                 "window.colabelClassify.S.labelling === 0", timeout=120_000)
    assert len(asked) == 2
    accepted = [e["cell_id"] for e in events_of(hals_stack["folder"], session.session_id)
                if e.get("annotator_id") == me and e["kind"] == "suggestion_accepted"]
    assert sorted(accepted) == sorted(s["cell_id"] for s in visible)


ZOOM_TO_CELL = """(id) => { const c = window.colabelClassify; const [x, y] = c.S.cells.get(id).cell.centroid;
    c.map.getView().fit([x - 64, c.S.H - y - 64, x + 64, c.S.H - y + 64]); }"""
VIEW_LOADED = ("JSON.stringify(window.colabelClassify.S.shown) === JSON.stringify(window.colabelClassify.viewRegion())"
               " && window.colabelClassify.S.busy === 0")
# a page that has fallen behind: until its next label batch, its cells answers lack the label of cell `id` (another
# annotator's, given meanwhile), also the one read right before "Accept all visible"
HIDE_LABEL = """(id) => { const S = window.colabelClassify.S; const cells = S.annotate.cells;
    const behind = S.labelBatches;
    S.annotate.cells = async (...args) => { const r = await cells(...args);
        if (S.labelBatches === behind) for (const c of r.cells) if (c.cell_id === id) c.label = null;
        return r; }; }"""


async def test_two_annotators_in_one_patch_see_each_others_labels_and_a_stale_accept_keeps_the_human_label(
        hals_stack, browser, connect, tmp_path):
    folder = hals_stack["folder"]
    session, secret = await session_with_suggestions(hals_stack, connect, "two in a patch")
    ann_page, bob_page = await new_page(browser), await new_page(browser)
    try:
        ann = await join_with_suggestions(ann_page, hals_stack, secret, "Ann")
        bob = await join_with_suggestions(bob_page, hals_stack, secret, "Bob")
        first = (await ann_page.evaluate("window.colabelClassify.visibleSuggestions()"))[0]
        cell, other = first["cell_id"], "negative" if first["class"] == "positive" else "positive"
        for p in (ann_page, bob_page):  # both in the patch around the cell
            await p.evaluate(ZOOM_TO_CELL, cell)
            await p.wait_for_function(VIEW_LOADED, timeout=60_000)

        # Bob corrects the cell's suggestion while Ann's page, fallen behind, still draws it as a suggestion
        await ann_page.evaluate(HIDE_LABEL, cell)
        await click_cell(bob_page, cell)
        await bob_page.keyboard.press("2" if other == "negative" else "1")
        await bob_page.wait_for_function("window.colabelClassify.S.events.suggestion_corrected === 1 && "
                                         "window.colabelClassify.S.labelling === 0")
        visible = await ann_page.evaluate("window.colabelClassify.visibleSuggestions()")
        assert cell in {s["cell_id"] for s in visible} and len(visible) > 2

        # Ann accepts all visible: the provider writes every accept but the stale one, and answers with Bob's label
        await ann_page.click("#classify-accept")
        await ann_page.wait_for_function("window.colabelClassify.S.labelling === 0 && document.getElementById("
                                         "'classify-status').textContent.includes('meanwhile')", timeout=60_000)
        assert await ann_page.text_content("#classify-status") == (
            f"labelled {len(visible) - 1} cells; cell {cell} was labelled {other} meanwhile by Bob: kept")
        assert await ann_page.evaluate("(id) => window.colabelClassify.S.labels.get(id)", cell) == other
        on_cell = [(e["annotator_id"], e["kind"], e["class"]) for e in events_of(folder, session.session_id)
                   if e["kind"] in LABEL_KINDS and e["cell_id"] == cell]
        assert on_cell == [(bob, "suggestion_corrected", other)]
        accepted = {e["cell_id"]: e["class"] for e in labels_by(folder, session.session_id, ann)}
        assert set(accepted) == {s["cell_id"] for s in visible} - {cell}
        assert all(e["kind"] == "suggestion_accepted" for e in labels_by(folder, session.session_id, ann))

        # the open pages catch up by the status poll, no reload: Bob's shows Ann's labels (and keeps his own), and
        # both count the same cells labelled
        probe = next(iter(accepted))
        await bob_page.wait_for_function("([id, cls]) => window.colabelClassify.S.labels.get(id) === cls",
                                         arg=[probe, accepted[probe]], timeout=15_000)
        assert await bob_page.evaluate("(id) => window.colabelClassify.S.labels.get(id)", cell) == other
        n_labelled = 20 + len(visible)  # 20 from Python, Bob's correction, Ann's accepts
        for p in (ann_page, bob_page):
            await p.wait_for_function(f"document.getElementById('classify-progress').textContent"
                                      f".includes('{n_labelled} of ')", timeout=15_000)
        await screenshot(ann_page, tmp_path, "classify-stale-accept")

        # Ann's counts come from the provider: a reload keeps them
        mine = {"label": 0, "suggestion_accepted": len(visible) - 1, "suggestion_corrected": 0}
        assert await ann_page.evaluate("window.colabelClassify.S.events") == mine
        await ann_page.reload()
        await ann_page.wait_for_function("Number(document.getElementById('classify')?.dataset.cells) > 0",
                                         timeout=120_000)
        await ann_page.wait_for_function(f"window.colabelClassify.S.events.suggestion_accepted === {len(visible) - 1}")
        assert await ann_page.evaluate("window.colabelClassify.S.events") == mine
        assert f"you: 0 labelled, {len(visible) - 1} accepted, 0 corrected" in await ann_page.text_content(
            "#classify-progress")
        assert not ann_page.errors and not bob_page.errors, ann_page.errors + bob_page.errors
    finally:
        await ann_page.context.close()
        await bob_page.context.close()


async def test_a_failed_training_shows_on_both_pages_and_a_pause_withdraws_the_suggestions_drawn(
        hals_stack, page, browser, connect, monkeypatch):
    from colabel.services.hals.service import ClassifierService

    provider, services, hals = hals_stack["provider"], hals_stack["services"], hals_stack["hals"]
    ihc = next(im.image_id for im in provider.list_images() if im.name == "ihc_ki67.png")
    session, secret = provider.create_session(name="failing fit", classes=CLASSES, mode="classification",
                                              image_ids=[ihc])

    def out_of_memory(self, *args):
        raise RuntimeError("out of memory on the classifier replica")

    monkeypatch.setattr(ClassifierService, "fit", out_of_memory)
    _, _, by_class = await label_from_python(provider, services, connect, secret, ihc, positive=10)
    await hals.wait_for_training(session)
    error = hals.status(session)["retrain_error"]
    assert "out of memory on the classifier replica" in error
    failed = f"training failed: {error} (tried again on the next label change)"

    # the annotator page says why no suggestion comes (not "labels still needed: positive 0, negative 0")
    await join_in_browser(page, services.share_url(secret), "Waiting")
    model = page.locator("#classify-model")
    await page.wait_for_function("document.getElementById('classify-model').textContent.startsWith("
                                 "'classifier training failed: ')")
    assert (await model.text_content()).startswith(f"classifier {failed}")
    red = "rgb(198, 40, 40)"
    assert await model.evaluate("(e) => getComputedStyle(e).color") == red
    # and so does the manager's card
    manager = await new_page(browser)
    try:
        token = await hals_stack["server"].generate_token({"expires_in": 3600})
        await manager.goto(services.manage_url(token))
        await manager.wait_for_selector("body[data-state=ready]", timeout=30_000)
        line = manager.locator(".session", has_text="failing fit").locator(".classifier")
        assert (await line.text_content()).startswith(
            f"20 cells labelled (positive 10, negative 10); no classifier yet (10 labels per class needed); {failed}")
        assert await line.evaluate("(e) => getComputedStyle(e).color") == red
        assert not manager.errors, manager.errors
    finally:
        await manager.context.close()

    # the classifier service works again: the next label change trains, and suggestions come
    monkeypatch.undo()
    await click_cell(page, by_class["negative"][10])
    await page.keyboard.press("2")
    await page.wait_for_function("Number(document.getElementById('classify').dataset.suggestions) > 0",
                                 timeout=120_000)
    await page.wait_for_function("document.getElementById('classify-model').textContent.startsWith('classifier v1')")
    assert "failed" not in await model.text_content()
    assert await model.evaluate("(e) => getComputedStyle(e).color") != red

    # a relabel takes positive below 10: suggestions pause, and the page withdraws those it draws
    await click_cell(page, by_class["positive"][0])
    await page.keyboard.press("2")
    await page.wait_for_function("document.getElementById('classify').dataset.suggestions === '0' && "
                                 "document.getElementById('classify-accept').disabled", timeout=15_000)
    assert "labels still needed per class: positive 1, negative 0" in await model.text_content()
    await page.keyboard.press("a")
    await page.wait_for_function("document.getElementById('classify-status').textContent === 'no suggestions in view'")
    assert not [e for e in events_of(hals_stack["folder"], session.session_id) if e["kind"] == "suggestion_accepted"]
