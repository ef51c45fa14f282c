"""The session manager page (web/src/manage.js, index.html) in a real headless Chromium against a real provider on
a real Hypha server, with annotators saving through the real annotator service (skipped without the built
pages, playwright or Chromium: see web_support)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from web_support import CLASSES, browser, new_page, screenshot  # noqa: F401 - fixtures

from conftest import collection, square

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def image_ids(stack) -> dict[str, str]:
    return {im.name: im.image_id for im in stack.provider.list_images()}


def byte_size(n: int) -> str:
    """The manage page's byte count, as the provider's messages give it (``_mib`` of storage.py)."""
    from colabel.apps.provider.storage import _mib

    return _mib(n)


async def test_manager_shows_progress_per_image_and_annotator_copies_the_link_and_revokes_a_session(
        stack, browser, connect, tmp_path):
    ids = image_ids(stack)
    session, secret = stack.provider.create_session(name="tumour outlines", classes=CLASSES, annotators_per_image=2)
    client = await connect()
    annotate = await client.get_service(stack.services.annotator_service_id)
    ada = await annotate.join(secret, "Ada")
    bob = await annotate.join(secret, "Bob")
    for version in range(2):
        await annotate.save_annotation(secret, ada["annotator_key"], ids["ihc_ki67.png"],
                                       collection(square(10 + version, 10, 20)))
    await annotate.save_annotation(secret, bob["annotator_key"], ids["ihc_ki67.png"], collection(square(50, 50, 20)))
    await annotate.save_annotation(secret, ada["annotator_key"], ids["dsb2018_nuclei.tif"], collection())
    await annotate.finish_image(secret, bob["annotator_key"], ids["ihc_ki67.png"])  # Bob's outline is complete

    stored = stack.provider.store.usage(session.session_id)
    stack.provider.store.max_session_bytes = sum(stored.values()) + 100  # as COLABEL_MAX_SESSION_BYTES sets it

    page = await new_page(browser)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    card = page.locator(".session", has_text="tumour outlines")
    # the id the command line takes (colabel report / pull --session), shown, not only in an attribute
    assert await card.locator(".session-id").inner_text() == (
        f"id {session.session_id} for colabel report FOLDER {session.session_id}")

    # progress per annotator: images saved on and versions
    rows = {(await r.get_attribute("data-annotator-id")): await r.locator("td").all_text_contents()
            for r in await card.locator("table.annotators tr[data-annotator-id]").all()}
    a, b = ada["annotator"]["annotator_id"], bob["annotator"]["annotator_id"]
    assert rows == {a: ["Ada", "2", "0", "3", byte_size(stored[a])], b: ["Bob", "1", "1", "1", byte_size(stored[b])]}
    # what the session's versions take on disk, nearly at the provider's limit: shown in red
    line = card.locator(".stored.error")
    assert await line.text_content() == (f"annotations stored: {byte_size(sum(stored.values()))} of the session's "
                                         f"limit of {byte_size(sum(stored.values()) + 100)} (saves past the limit "
                                         "are refused)")
    # progress per image: status, and who saved how many versions
    images = {(await r.get_attribute("data-image-id")): [t.replace("return", "") for t in  # the return buttons
                                                         await r.locator("td").all_text_contents()]
              for r in await card.locator(".image-progress tr").all()}
    assert await card.locator(".image-progress button.return").count() == 3  # one per annotator of each image
    assert images[ids["ihc_ki67.png"]] == ["ihc_ki67.png", "annotated",
                                           "Ada (2 versions), Bob (1 version, finished)"]
    assert images[ids["dsb2018_nuclei.tif"]] == ["dsb2018_nuclei.tif", "in progress", "Ada (1 version)"]
    assert images[ids["sub/he_histo.jpg"]][1] == "unannotated"
    assert images[ids["broken.png"]][1] == "unreadable"
    assert await card.locator(".progress").text_content() == (
        " 1 of 3 images done, 1 in progress · 0 finished by all 2 annotators")
    # the folder's images: status over the sessions
    folder = {r[0]: r[-1] for r in [await r.locator("td").all_text_contents()
                                    for r in await page.locator("#images tbody tr").all()]}
    assert folder["ihc_ki67.png"] == "annotated in tumour outlines"
    assert folder["dsb2018_nuclei.tif"] == "in progress in tumour outlines"
    assert folder["sub/he_histo.jpg"] == "unannotated" and folder["broken.png"].startswith("unreadable: ")

    # the copy button puts the session's share URL on the clipboard
    share = await card.locator("input.share-url").first.input_value()
    assert share == stack.services.share_url(secret)
    await card.locator("button.copy").first.click()
    await page.wait_for_function("document.querySelector('button.copy').textContent === 'copied'")
    assert await page.evaluate("navigator.clipboard.readText()") == share

    # a class colour that is not #rrggbb: shown while typing, refused by the provider, nothing created
    before = len(stack.provider.sessions.list())
    await page.fill("#session-name", "ki67 cells")
    await page.fill("#session-classes", "positive:#8b4513, negative:blue")
    assert "colour 'blue' is not #rrggbb" in await page.text_content("#classes-preview")
    await page.select_option("#session-mode", "classification")
    await page.click("#create-session")
    await page.wait_for_function("document.getElementById('create-error').textContent.includes('#rrggbb')")
    assert len(stack.provider.sessions.list()) == before
    # a cell-classification session, with a colour from the palette for the class given none
    await page.fill("#session-classes", "positive:#8b4513, negative")
    await page.click("#create-session")
    await page.locator(".session", has_text="ki67 cells").wait_for(timeout=15_000)
    (created,) = [s for s in stack.provider.sessions.list() if s.name == "ki67 cells"]
    assert created.mode == "classification"
    # the class without a colour gets the palette's (Okabe-Ito) colour
    assert [(c.name, c.color) for c in created.classes] == [("positive", "#8b4513"), ("negative", "#56b4e9")]
    assert "classification" in await page.locator(".session", has_text="ki67 cells").locator("h3").text_content()

    # revoke the session: closed, every link revoked; the share link no longer opens anything
    stack.provider.sessions.issue_token(session.session_id, label="second link")
    await page.reload()
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    page.once("dialog", lambda dialog: dialog.accept())
    await card.locator("button.revoke-session").click()
    revoked = page.locator(".session.closed", has_text="tumour outlines")
    await revoked.wait_for(timeout=15_000)
    assert await revoked.locator("button.revoke").count() == 0
    assert "every link revoked" in await revoked.locator("h3").text_content()
    info = stack.provider.sessions.get(session.session_id)
    assert info.state == "closed" and len(info.tokens) == 2 and all(t.revoked for t in info.tokens)
    with pytest.raises(Exception, match="invalid or revoked session token"):
        await annotate.session_info(secret)
    await screenshot(page, tmp_path, "manage-progress-revoked")
    assert not page.errors, page.errors
    await page.context.close()


async def test_manager_page_polls_the_progress_without_losing_what_the_provider_types(
        stack, browser, connect, tmp_path):
    ids = image_ids(stack)
    session, secret = stack.provider.create_session(name="watched live", classes=CLASSES)
    page = await new_page(browser)
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    await page.clock.install()  # the page's timers, run forward below instead of waited for
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    card = page.locator(".session", has_text="watched live")
    assert await card.locator("div.annotators").text_content() == "nobody joined yet"
    assert "0 of 3 images done" in await card.locator(".progress").text_content()
    first_update = await page.text_content("#updated")
    assert first_update.startswith("updated ")

    # the provider half-types a new session's name, then a trainer label (the focus stays in it)
    await page.fill("#session-name", "ki67 ro")
    await card.locator("input.trainer-label").fill("U-Net rou")

    # an annotator joins and saves through the API; the open page shows it by its own poll (every 10 s)
    client = await connect()
    annotate = await client.get_service(stack.services.annotator_service_id)
    ada = await annotate.join(secret, "Ada")
    await annotate.save_annotation(secret, ada["annotator_key"], ids["ihc_ki67.png"], collection(square(10, 10, 20)))
    await page.clock.run_for(10_500)  # the poll comes due
    await card.locator("table.annotators tr[data-annotator-id]").wait_for(timeout=15_000)
    (stored,) = stack.provider.store.usage(session.session_id).values()
    assert await card.locator("table.annotators tr[data-annotator-id] td").all_text_contents() == [
        "Ada", "1", "0", "1", byte_size(stored)]
    assert await card.locator(".progress").text_content() == (
        " 1 of 3 images done, 0 in progress · 0 finished by their annotator")
    assert await page.text_content("#updated") != first_update
    # what was being typed survived the refresh, and typing goes on where it stopped
    assert await page.input_value("#session-name") == "ki67 ro"
    assert await card.locator("input.trainer-label").input_value() == "U-Net rou"
    await page.keyboard.type("nd 2")
    assert await card.locator("input.trainer-label").input_value() == "U-Net round 2"

    # just after a poll, the refresh button shows a second save at once (the next poll is ~10 s away)
    await annotate.save_annotation(secret, ada["annotator_key"], ids["dsb2018_nuclei.tif"],
                                   collection(square(30, 30, 20)))
    await page.click("#refresh")
    await card.locator(".progress", has_text="2 of 3 images done").wait_for(timeout=5_000)
    assert await card.locator("input.trainer-label").input_value() == "U-Net round 2"
    await screenshot(page, tmp_path, "manage-polled")
    assert not page.errors, page.errors
    assert not console_errors, console_errors  # no favicon.ico 404 either
    await page.context.close()


async def test_a_poll_while_the_mouse_is_held_on_a_card_waits_for_the_release_so_the_click_lands(
        stack, browser, connect):
    """The provider presses "new share link" just as a poll is due: the cards are not rebuilt under the held
    button (that would drop the click), the poll's news shows after the release, and the link is issued."""
    session, secret = stack.provider.create_session(name="held click", classes=CLASSES)
    page = await new_page(browser)
    await page.clock.install()  # the page's timers, run forward below instead of waited for
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    card = page.locator(".session", has_text="held click")
    before = await page.text_content("#updated")
    box = await card.locator("button.issue").bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    client = await connect()
    annotate = await client.get_service(stack.services.annotator_service_id)
    await annotate.join(secret, "Ada")
    await page.clock.run_for(12_000)  # a poll (every 10 s) came due while the button was held
    await asyncio.sleep(1)  # and had time to answer
    assert await page.text_content("#updated") == before
    assert await card.locator("div.annotators").text_content() == "nobody joined yet"
    await page.mouse.up()
    await card.locator("table.annotators tr[data-annotator-id]").wait_for(timeout=15_000)
    await card.locator("table.tokens tr[data-role=annotate]").nth(1).wait_for(timeout=15_000)
    assert len(stack.provider.sessions.get(session.session_id).tokens) == 2
    assert not page.errors, page.errors
    await page.context.close()


def colabel_pull(url: str, out) -> subprocess.CompletedProcess:
    """``colabel pull URL --out OUT`` as a trainer runs it."""
    return subprocess.run([sys.executable, "-m", "colabel.apps.cli", "pull", url, "--out", str(out)],
                          capture_output=True, text=True, timeout=180)


async def test_trainer_link_issued_from_the_page_pulls_until_revoked_from_the_page(stack, browser, connect, tmp_path):
    ids = image_ids(stack)
    session, secret = stack.provider.create_session(name="nuclei for the U-Net", classes=CLASSES)
    client = await connect()
    annotate = await client.get_service(stack.services.annotator_service_id)
    ada = await annotate.join(secret, "Ada")
    await annotate.save_annotation(secret, ada["annotator_key"], ids["dsb2018_nuclei.tif"],
                                   collection(square(10, 10, 20), square(100, 50, 10, "other")))

    page = await new_page(browser)
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    card = page.locator(".session", has_text="nuclei for the U-Net")

    # issue a labelled trainer link: listed with its role and its URL, which is the trainer URL of that token
    await card.locator("input.trainer-label").fill("U-Net round 1")
    await card.locator("button.issue-trainer").click()
    row = card.locator("table.tokens tr[data-role=train]")
    await row.locator("input.token-url").wait_for(timeout=15_000)
    cells = await row.locator("td").all_text_contents()
    assert cells[:2] == ["U-Net round 1", "trainer, read-only"]
    url = await row.locator("input.token-url").input_value()
    (token,) = [t for t in stack.provider.sessions.get(session.session_id).tokens if t.role == "train"]
    assert token.label == "U-Net round 1" and token.revoked is None
    assert await row.get_attribute("data-token-id") == token.token_id
    assert url == stack.services.trainer_url(stack.provider.sessions.secret(session.session_id, token.token_id))
    # the annotators' link is listed beside it with its own role; the session's share link is unchanged
    annotator_rows = card.locator("table.tokens tr[data-role=annotate]")
    assert (await annotator_rows.locator("td.role").all_text_contents()) == ["annotator link"]
    assert await card.locator("input.share-url").first.input_value() == stack.services.share_url(secret)
    await screenshot(page, tmp_path, "manage-trainer-link")

    # a trainer pulls with it: the annotated image and its labels
    out = tmp_path / "pulled"
    first = await asyncio.to_thread(colabel_pull, url, out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pulled 1 new annotation versions (0 up to date)" in first.stdout
    (mask_file,) = (out / "tiff").glob("dsb2018_nuclei*__*_mask.tif")
    mask = tifffile.imread(mask_file)
    assert mask.shape == (512, 512) and mask.dtype.itemsize >= 2
    assert np.count_nonzero(mask == mask[20, 20]) == 400 and len(np.unique(mask)) == 3  # 2 squares + background
    # the link cannot annotate
    with pytest.raises(Exception, match="train token; it cannot be used to annotate"):
        await annotate.join(url.split("#trainer=", 1)[1], "Mallory")

    # revoke it from the page: the row says so, the annotators' link lives on, and the next pull is refused
    await row.locator("button.revoke").click()
    await row.locator("td.state", has_text="revoked").wait_for(timeout=15_000)
    assert await row.locator("input.token-url").count() == 0
    assert next(t for t in stack.provider.sessions.get(session.session_id).tokens
               if t.token_id == token.token_id).revoked is not None
    await annotate.session_info(secret)
    again = await asyncio.to_thread(colabel_pull, url, tmp_path / "again")
    assert again.returncode == 2, again.stdout + again.stderr
    assert "colabel: pull failed: " in again.stderr and "invalid or revoked session token" in again.stderr, again.stderr
    assert "pulled" not in again.stdout
    await screenshot(page, tmp_path, "manage-trainer-link-revoked")
    assert not page.errors, page.errors
    await page.context.close()


async def open_manager(stack, browser):
    page = await new_page(browser)
    await page.goto(stack.services.manage_url(stack.provider_token))
    await page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    return page


async def test_editing_the_form_clears_the_error_of_a_failed_create(stack, browser):
    page = await open_manager(stack, browser)
    await page.fill("#session-name", "bad colour")
    await page.fill("#session-classes", "a:#abc")
    await page.click("#create-session")
    await page.wait_for_function("document.getElementById('create-error').textContent.includes(\"'#abc'\")")
    assert not [s for s in stack.provider.sessions.list() if s.name == "bad colour"]

    # emptying the field: the browser's own "required" check blocks the next Create, so only the edit itself can
    # take away the refusal of a colour that is no longer there
    await page.fill("#session-classes", "")
    assert await page.text_content("#create-error") == ""
    await page.click("#create-session")
    assert await page.text_content("#create-error") == ""
    assert await page.text_content("#classes-preview") == ""

    # a cell-classification session needs two classes at least (its classifier tells classes apart): refused
    await page.fill("#session-name", "one class")
    await page.fill("#session-classes", "tumour:#ff0000")
    await page.select_option("#session-mode", "classification")
    await page.click("#create-session")
    await page.wait_for_function("document.getElementById('create-error').textContent === 'a classification "
                                 "session needs at least 2 classes (its classifier tells classes apart), got 1'")
    assert not [s for s in stack.provider.sessions.list() if s.name == "one class"]
    assert not page.errors, page.errors
    await page.context.close()


async def test_a_later_failed_create_takes_away_the_status_line_of_an_earlier_successful_one(
        stack, browser, monkeypatch):
    page = await open_manager(stack, browser)
    await page.fill("#session-name", "made first")
    await page.fill("#session-classes", "tumour:#ff0000, stroma:#00ff00")
    await page.click("#create-session")
    await page.locator(".session", has_text="made first").wait_for(timeout=15_000)
    assert await page.text_content("#status") == "created made first"
    assert await page.text_content("#create-error") == ""

    # Create again, the form unchanged, and the provider fails (say its disk is full): the refusal is shown, and the
    # status line no longer says "created made first" beside it
    from colabel.errors import StorageError

    def full_disk(**kwargs):
        raise StorageError("cannot write the session: no space left on the device")

    monkeypatch.setattr(stack.provider, "create_session", full_disk)
    await page.click("#create-session")
    await page.wait_for_function("document.getElementById('create-error').textContent.includes('no space left')")
    assert await page.text_content("#status") == ""
    monkeypatch.undo()

    # an edit after a success takes its "created" line away too: it speaks of the form as it was
    await page.fill("#session-name", "made second")
    await page.click("#create-session")
    await page.locator(".session", has_text="made second").wait_for(timeout=15_000)
    assert await page.text_content("#status") == "created made second"
    await page.fill("#session-name", "made third")
    assert await page.text_content("#status") == ""
    assert not page.errors, page.errors
    await page.context.close()


async def test_the_class_preview_warns_about_two_classes_of_the_same_colour(stack, browser):
    page = await open_manager(stack, browser)
    preview = page.locator("#classes-preview")
    await page.fill("#session-classes", "tumour:#FF0000, stroma:#ff0000, other:#00ff00")
    assert await preview.locator(".warning").all_text_contents() == [
        " tumour and stroma have the same colour #ff0000: annotators cannot tell them apart"]
    # a class without a colour gets the palette's: the second class's palette colour is #56b4e9
    await page.fill("#session-classes", "sky:#56B4E9, stroma")
    assert await preview.locator(".warning").all_text_contents() == [
        " sky and stroma have the same colour #56b4e9: annotators cannot tell them apart"]
    await page.fill("#session-classes", "tumour:#ff0000, stroma, immune:#0000ff")
    assert await preview.locator(".warning").count() == 0
    assert await preview.locator(".class").all_text_contents() == ["tumour", "stroma", "immune"]
    # a warning, not a refusal: the provider takes such a session
    await page.fill("#session-name", "same colours")
    await page.fill("#session-classes", "a:#123456, b:#123456")
    assert await preview.locator(".warning").count() == 1
    await page.click("#create-session")
    await page.locator(".session", has_text="same colours").wait_for(timeout=15_000)
    assert not page.errors, page.errors
    await page.context.close()


async def test_the_provider_returns_a_finished_image_and_its_annotator_gets_it_back_with_what_to_change(
        stack, browser, tmp_path):
    from test_web import draw_polygon, wait_saved
    from web_support import join

    ihc = image_ids(stack)["ihc_ki67.png"]
    session, secret = stack.provider.create_session(name="second look", classes=CLASSES, image_ids=[ihc])
    annotator = await new_page(browser)
    await join(annotator, stack.services.share_url(secret), "Ada")
    await draw_polygon(annotator, [(20, 20), (120, 20), (120, 80)])
    await wait_saved(annotator, 1)
    (ada,) = stack.provider.sessions.annotators(session.session_id)
    # returned while Ada's page is still on the image: her Next does not end a return she has not seen
    stack.provider.return_image(session, ihc, ada, "split the touching pair")
    await annotator.click("#next-image")
    await annotator.wait_for_selector("#returned:not([hidden])", timeout=30_000)
    assert await annotator.text_content("#returned") == (
        "Returned to you for changes: “split the touching pair”. Change what is asked, then Next image finishes it "
        "again.")
    assert stack.provider.store.finished(session.session_id) == {}
    await annotator.click("#next-image")  # seen: this Next answers the return
    await annotator.wait_for_selector("body[data-state=done]", timeout=30_000)
    assert stack.provider.store.returned(session.session_id) == {}
    assert stack.provider.store.finished(session.session_id)[ihc][ada]["answered"] == "split the touching pair"

    manager = await new_page(browser)
    await manager.goto(stack.services.manage_url(stack.provider_token))
    await manager.wait_for_selector("body[data-state=ready]", timeout=30_000)
    row = manager.locator(".session", has_text="second look").locator(f'.image-progress tr[data-image-id="{ihc}"]')
    assert "Ada (1 version, finished)" in await row.text_content()
    manager.once("dialog", lambda dialog: dialog.accept("outline the cell at the top too"))
    await row.locator("button.return").click()
    await row.filter(has_text="Ada (1 version, returned: “outline the cell at the top too”)").wait_for(timeout=15_000)
    await screenshot(manager, tmp_path, "manage-returned")

    await annotator.reload()  # the returned image comes first, with what to change, also after a reload
    await annotator.wait_for_selector("body[data-state=ready]", timeout=30_000)
    await annotator.reload()
    await annotator.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert await annotator.text_content("#returned") == (
        "Returned to you for changes: “outline the cell at the top too”. Change what is asked, then Next image "
        "finishes it again.")
    await screenshot(annotator, tmp_path, "annotate-returned")

    await row.locator("button.withdraw").click()  # taken back: Ada's finish counts again
    await row.filter(has_text="Ada (1 version, finished)").wait_for(timeout=15_000)
    assert stack.provider.store.returned(session.session_id) == {}
    await annotator.reload()  # the page asks again: a withdrawn return is no longer said
    await annotator.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert await annotator.locator("#returned").is_hidden()
    assert not annotator.errors and not manager.errors, (annotator.errors, manager.errors)
    await annotator.context.close()
    await manager.context.close()
