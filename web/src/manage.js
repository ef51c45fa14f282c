// The provider's session manager (the manage URL, with a token of the provider's workspace).
import "./manage.css";
import { connect, errorText, el, pageContext, selfCheck } from "./common.js";

const $ = (id) => document.getElementById(id);
let provider = null;
let server = null;
let ctx = null;
let annotate = null; // the annotator service: live classifier status of classification sessions
const STATUS_TIMEOUT_MS = 15_000;
/** The page reloads the sessions and images this often while it is visible (annotators save meanwhile). */
export const POLL_MS = 10_000;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

/** "nucleus:#e69f00, other" -> [{name, color}] (a class without a colour gets one from a palette). */
// Okabe-Ito: distinguishable with every common colour-vision deficiency
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#000000"];
export function parseClasses(text) {
  return text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean).map((item, i) => {
    const [name, color] = item.split(":").map((s) => s.trim());
    return { name, color: color || PALETTE[i % PALETTE.length] };
  });
}

function copyButton(text) {
  return el("button", {
    class: "copy", onclick: async (e) => {
      try {
        await navigator.clipboard.writeText(text);
        e.target.textContent = "copied";
      } catch {
        // no clipboard (http page): select the text instead
        const input = e.target.previousElementSibling;
        input.select();
        document.execCommand("copy");
        e.target.textContent = "selected";
      }
      setTimeout(() => { e.target.textContent = "copy"; }, 1500);
    },
  }, "copy");
}

function shareLink(url, inputClass = "share-url") {
  return el("span", { class: "share" }, el("input", { class: inputClass, value: url, readonly: true, size: 60 }),
    copyButton(url));
}

// URLs of the tokens issued from this page, by token id: the provider lists tokens without their secrets, so a
// trainer link (and any link but a session's first) can be shown only while the page that issued it is open.
const issuedUrls = new Map();
let newTokenId = null; // the token issued last: its row is highlighted
const ROLES = { annotate: "annotator link", train: "trainer, read-only" };

async function act(promise) {
  try {
    await promise;
    await refresh();
  } catch (err) {
    status(errorText(err), true);
  }
}

const shortTime = (t) => t.slice(0, 16).replace("T", " ");

// What the provider typed or opened in the cards, by session id: the cards are rebuilt on every refresh (also the
// polled ones), from this state, so a refresh keeps a half-typed trainer label and an opened image list.
const typedLabels = new Map();
const openImages = new Map();

/** The live classifier of a classification session, through the annotator service with the session's link. */
async function classifierStatus(s) {
  if (s.mode !== "classification" || !s.share_url) return null;
  const token = new URLSearchParams(new URL(s.share_url).hash.slice(1)).get("token");
  try {
    annotate ??= await server.getService(`${ctx.workspace}/${ctx.name}-annotate`);
    if (typeof annotate.classifier_status !== "function") return { error: "the provider runs no HALS services" };
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("the classifier did not answer")), STATUS_TIMEOUT_MS);
    });
    return await Promise.race([annotate.classifier_status(token), late]).finally(() => clearTimeout(timer));
  } catch (err) {
    return { error: errorText(err) };
  }
}

function classifierLine(st) {
  if (!st) return null;
  if (st.error) return el("div", { class: "classifier error" }, `classifier: ${st.error}`);
  const perClass = Object.entries(st.per_class).map(([name, n]) => `${name} ${n}`).join(", ");
  const check = st.ready ? selfCheck(st) : null;
  let model = st.ready
    ? `classifier ${st.start_model && !st.version ? `${st.start_model} (trained beforehand)` : `v${st.version}`}`
      + (check ? `, ${check}` : "")
    : `no classifier yet (${st.min_labels_per_class} labels per class needed)`;
  if (st.retrain_error) {
    model += `; ${st.ready ? "the last retrain" : "training"} failed: ${st.retrain_error} (tried again on the next `
      + "label change)";
  }
  return el("div", { class: `classifier${st.retrain_error ? " error" : ""}`,
    title: check ? "the classifier's accuracy on the labels it held out of its training: a self-check, not its "
      + "accuracy on the cells still unlabelled" : "" },
  `${st.n_labels} cells labelled (${perClass}); ${model}`, st.training ? " · retraining…" : "");
}

/** A byte count as the provider's messages give it: "850 bytes", "12.3 KiB", "3.4 MiB", "1.2 GiB" (powers of 1024). */
export function byteSize(n) {
  const v = Number(n) || 0;
  for (const [unit, power] of [["GiB", 3], ["MiB", 2], ["KiB", 1]]) {
    if (Math.abs(v) >= 1024 ** power) return `${(v / 1024 ** power).toFixed(1)} ${unit}`;
  }
  return `${v} bytes`;
}

/** The session's stored annotations, against the provider's limit when it has one. */
function storedLine(p) {
  const limit = p.max_session_bytes || 0;
  const full = limit && p.stored_bytes >= 0.9 * limit;
  return el("div", { class: `stored${full ? " error" : ""}`,
    title: "every saved version of every annotator: GeoJSON and label image" },
  `annotations stored: ${byteSize(p.stored_bytes)}`
    + (limit ? ` of the session's limit of ${byteSize(limit)}` : "")
    + (full ? " (saves past the limit are refused)" : ""));
}

function annotatorTable(p, st) {
  const rows = Object.entries(p.per_annotator);
  if (!rows.length) return el("div", { class: "annotators" }, "nobody joined yet");
  const cells = st && !st.error ? st.per_annotator || {} : null;
  return el("table", { class: "annotators" },
    el("tr", {}, el("th", {}, "annotator"), el("th", {}, "images"), el("th", {}, "finished"),
      el("th", {}, "versions"), el("th", {}, "stored"), cells ? el("th", {}, "cell labels") : null),
    rows.map(([id, a]) => el("tr", { "data-annotator-id": id }, el("td", { title: id }, a.display_name),
      el("td", {}, a.images), el("td", {}, a.finished), el("td", {}, a.versions),
      el("td", { class: "stored" }, byteSize(a.stored_bytes)), cells ? el("td", {}, cells[id] || 0) : null)));
}

function imageTable(id, images, p, returnable) {
  const names = Object.fromEntries(Object.entries(p.per_annotator).map(([id, a]) => [id, a.display_name]));
  const counts = {};
  for (const im of images) counts[im.status] = (counts[im.status] || 0) + 1;
  const summary = Object.entries(counts).map(([k, n]) => `${n} ${k.replace("_", " ")}`).join(", ");
  const open = openImages.get(id) ?? images.length <= 12;
  return el("details", { class: "image-progress", ...(open ? { open: true } : {}),
    ontoggle: (e) => openImages.set(id, e.target.open) },
    el("summary", {}, `Images: ${summary || "none"}`),
    el("table", {}, images.map((im) => el("tr", { class: im.status, "data-image-id": im.image_id },
      el("td", {}, im.name), el("td", { class: "status" }, im.status.replace("_", " ")),
      el("td", {}, Object.entries(im.annotations).map(([who, n], i) => el("span", { class: "work",
        "data-annotator-id": who }, i ? ", " : "", `${names[who] || who} (${n} version${n === 1 ? "" : "s"}`
          + `${who in (im.finished || {}) ? ", finished" : ""}`
          + `${who in (im.returned || {}) ? `, returned${im.returned[who] ? `: “${im.returned[who]}”` : ""}` : ""})`,
        !returnable ? null : who in (im.returned || {})
          ? el("button", { class: "return withdraw", type: "button",
            title: `take the return back: ${names[who] || who}'s finish before it counts again`,
            onclick: () => withdrawReturn(id, im, who, names[who] || who) }, "withdraw")
          : el("button", { class: "return", type: "button",
            title: `send ${im.name} back to ${names[who] || who} with what to change; it comes first among their images`,
            onclick: () => returnImage(id, im, who, names[who] || who) }, "return"))))))));
}

/** Take back a return of an image (asked by mistake, or its annotator left). */
async function withdrawReturn(sessionId, image, annotatorId, name) {
  try {
    await provider.withdraw_return(sessionId, image.image_id, annotatorId);
    await refresh();
    status(`withdrew the return of ${image.name} to ${name}`);
  } catch (err) {
    status(errorText(err), true);
  }
}

/** Return an image to an annotator for changes, asking the provider what to change. */
async function returnImage(sessionId, image, annotatorId, name) {
  const comment = window.prompt(`What should ${name} change on ${image.name}? (sent with the image)`, "");
  if (comment === null) return;
  try {
    await provider.return_image(sessionId, image.image_id, annotatorId, comment);
    await refresh();
    status(`returned ${image.name} to ${name}`);
  } catch (err) {
    status(errorText(err), true);
  }
}

async function revokeSession(s) {
  const live = s.tokens.filter((t) => !t.revoked);
  if (!window.confirm(`Revoke session "${s.name}"? Its ${live.length} live link(s), share and trainer links, `
    + "stop working at once and the session is closed; saved annotations are kept.")) return;
  try {
    await provider.close_session(s.session_id);
    for (const t of live) await provider.revoke_token(s.session_id, t.token_id);
    await refresh();
    status(`revoked ${s.name}`);
  } catch (err) {
    status(errorText(err), true);
  }
}

/** A new token of a session ("annotate": a share link; "train": a read-only trainer link), listed with its URL. */
async function issueToken(s, label, role) {
  try {
    const issued = await provider.issue_token(s.session_id, label, role);
    issuedUrls.set(issued.token_id, issued.share_url);
    newTokenId = issued.token_id;
    if (role === "train") typedLabels.delete(s.session_id); // used: the form offers the next default label
    await refresh();
    status(role === "train"
      ? `trainer link "${issued.label}" issued: copy it now, it is shown only while this page is open`
      : `share link "${issued.label}" issued`);
  } catch (err) {
    status(errorText(err), true);
  }
}

/** Every token of a session: label, role, created, its URL when this page issued it, revoked or a revoke button. */
function tokenTable(s) {
  return el("table", { class: "tokens" },
    el("tr", {}, ["link", "role", "created", "URL", ""].map((h) => el("th", {}, h))),
    s.tokens.map((t) => {
      const url = !t.revoked && issuedUrls.get(t.token_id);
      return el("tr", { "data-token-id": t.token_id, "data-role": t.role,
        class: `${t.revoked ? "revoked" : "live"}${t.token_id === newTokenId ? " new" : ""}` },
        el("td", {}, t.label || t.token_id), el("td", { class: "role" }, ROLES[t.role] || t.role),
        el("td", {}, shortTime(t.created)), el("td", {}, url ? shareLink(url, "token-url") : ""),
        el("td", { class: "state" }, t.revoked ? `revoked ${shortTime(t.revoked)}` : el("button", {
          class: "revoke", title: "every later call with this link is refused",
          onclick: () => act(provider.revoke_token(s.session_id, t.token_id)) }, "revoke")));
    }));
}

/** Issue a trainer link: what `colabel pull TRAINER_URL --out DIR` takes (read-only, revocable). */
function trainerForm(s) {
  const n = s.tokens.filter((t) => t.role === "train").length;
  const label = el("input", { class: "trainer-label", maxlength: 100, size: 30, value: `trainer ${n + 1}`,
    title: "who or what pulls with this link, e.g. U-Net round 2",
    oninput: (e) => typedLabels.set(s.session_id, e.target.value) });
  if (typedLabels.has(s.session_id)) label.value = typedLabels.get(s.session_id);
  return el("form", { class: "trainer", onsubmit: (e) => {
    e.preventDefault();
    issueToken(s, label.value.trim() || `trainer ${n + 1}`, "train");
  } }, "Trainer link: ", label, " ", el("button", { class: "issue-trainer", type: "submit" }, "issue trainer link"),
  el("small", {}, " read-only: ", el("code", {}, "colabel pull TRAINER_URL --out DIR"),
    " pulls the session's images and labels; it cannot annotate"));
}

async function sessionCard(s, images) {
  const id = s.session_id;
  const [p, st] = await Promise.all([provider.progress(id), classifierStatus(s)]);
  const live = s.tokens.filter((t) => !t.revoked);
  return el("div", { class: `session ${s.state}`, "data-session-id": id },
    el("h3", {}, s.name, " ", el("small", {}, `${s.state} · ${s.mode} · ${s.annotators_per_image} per image`
      + (live.length ? "" : " · every link revoked"))),
    // the id the command line takes (`colabel report FOLDER ID`, `colabel pull FOLDER --session ID`)
    el("div", { class: "session-id" }, "id ", el("code", {}, id),
      el("small", {}, " for ", el("code", {}, `colabel report FOLDER ${id}`))),
    el("div", { class: "classes" }, s.classes.map((c) => el("span", { class: "class", style: `--c:${c.color}` }, c.name))),
    el("div", { class: "progress" },
      el("progress", { max: p.n_images || 1, value: p.images_done }),
      ` ${p.images_done} of ${p.n_images} images done, ${p.images_in_progress} in progress`
        + ` · ${p.images_finished} finished by ${s.annotators_per_image === 1 ? "their annotator"
          : `all ${s.annotators_per_image} annotators`}`),
    classifierLine(st),
    storedLine(p),
    annotatorTable(p, st),
    imageTable(id, images, p, s.state === "open"),
    s.share_url ? el("div", {}, "Share link: ", shareLink(s.share_url)) : null,
    tokenTable(s),
    trainerForm(s),
    el("div", { class: "actions" },
      el("button", { class: "issue", onclick: () => issueToken(s, `link ${s.tokens.length + 1}`, "annotate") },
        "new share link"),
      s.state === "open"
        ? el("button", { class: "close", onclick: () => act(provider.close_session(id)) }, "close")
        : el("button", { class: "reopen", onclick: () => act(provider.reopen_session(id)) }, "reopen"),
      live.length || s.state === "open"
        ? el("button", { class: "revoke-session", title: "close the session and revoke every link",
          onclick: () => revokeSession(s) }, "revoke session") : null));
}

/** An image's status over the sessions: "annotated in A; in progress in B", or "unannotated". */
function folderStatus(image, sessions, perSession) {
  if (image.error) return `unreadable: ${image.error}`;
  const parts = [];
  sessions.forEach((s, i) => {
    const st = perSession[i].find((im) => im.image_id === image.image_id)?.status;
    if (st && st !== "unannotated") parts.push(`${st.replace("_", " ")} in ${s.name}`);
  });
  return parts.length ? parts.join("; ") : image.status;
}

/** Where the focus is in the session cards (session, element, caret), to put it back into the rebuilt cards. */
function focusInCards() {
  const active = document.activeElement;
  const card = active && active.closest && active.closest("#sessions .session");
  if (!card) return null;
  const selector = active.tagName.toLowerCase() + [...active.classList].map((c) => `.${CSS.escape(c)}`).join("");
  const caret = typeof active.selectionStart === "number"
    ? [active.selectionStart, active.selectionEnd, active.selectionDirection] : null;
  return { id: card.dataset.sessionId, selector, index: [...card.querySelectorAll(selector)].indexOf(active), caret };
}

function restoreFocus(kept) {
  if (!kept) return;
  const card = [...$("sessions").children].find((c) => c.dataset.sessionId === kept.id);
  const target = card && card.querySelectorAll(kept.selector)[kept.index];
  if (!target) return;
  target.focus({ preventScroll: true });
  if (kept.caret) target.setSelectionRange(...kept.caret);
}

// A rebuild of the cards under a held mouse button would drop the click (the button pressed is gone at release)
// and a rebuild clears a selection being copied: a refresh waits for the release, and polls skip a selection.
let pointerHeld = false;
let onRelease = [];
document.addEventListener("pointerdown", (e) => {
  if (e.target.closest && e.target.closest("#sessions")) pointerHeld = true;
}, true);
for (const type of ["pointerup", "pointercancel"]) {
  window.addEventListener(type, () => {
    if (!pointerHeld) return;
    pointerHeld = false;
    // after the click event that follows this pointerup has run
    setTimeout(() => { const waiting = onRelease; onRelease = []; waiting.forEach((resolve) => resolve()); }, 0);
  }, true);
}
const released = () => (pointerHeld ? new Promise((resolve) => onRelease.push(resolve)) : null);
function selectingInCards() {
  const selection = document.getSelection();
  return Boolean(selection && !selection.isCollapsed && $("sessions").contains(selection.anchorNode));
}

let refreshes = 0; // refreshes started: one that finishes after a later one started is not shown
let refreshing = 0; // refreshes in flight
let updated = 0; // when the page last showed the provider's state (ms since the epoch)

/** Reloads the images and sessions from the provider and rebuilds the page, keeping what is being typed. */
async function refresh() {
  const mine = ++refreshes;
  refreshing++;
  try {
    const [images, sessions] = await Promise.all([provider.list_images(), provider.list_sessions()]);
    const perSession = await Promise.all(sessions.map((s) => provider.list_images(s.session_id)));
    const cards = await Promise.all(sessions.map((s, i) => sessionCard(s, perSession[i])));
    while (pointerHeld) await released();
    if (mine !== refreshes) return; // a later refresh shows a newer state
    $("images").tBodies[0].replaceChildren(...images.map((im) => el("tr", { class: im.status },
      el("td", {}, im.name), el("td", {}, im.format), el("td", {}, im.shape ? im.shape.join(" × ") : ""),
      el("td", {}, im.dtype || ""), el("td", { title: im.error || "" }, folderStatus(im, sessions, perSession)))));
    cards.reverse(); // newest first
    const focus = focusInCards();
    $("sessions").replaceChildren(...(cards.length ? cards : [el("p", {}, "no sessions yet")]));
    restoreFocus(focus);
    updated = Date.now();
    $("updated").textContent = `updated ${new Date(updated).toTimeString().slice(0, 8)}`;
    $("updated").classList.remove("error");
    document.body.dataset.state = "ready";
  } finally {
    refreshing--;
  }
}

/** A refresh from the button or the poll: a failure is shown beside the time of the last update. */
async function refreshNow() {
  try {
    await refresh();
  } catch (err) {
    $("updated").textContent = `not updated since ${updated ? new Date(updated).toTimeString().slice(0, 8) : "loading"}: `
      + errorText(err);
    $("updated").classList.add("error");
  }
}

// polled while the page is visible (a hidden tab asks nothing), and at once when it is shown again
function poll() {
  if (document.visibilityState === "visible" && !refreshing && !selectingInCards()) refreshNow();
}
function startPolling() {
  setInterval(poll, POLL_MS);
  document.addEventListener("visibilitychange", () => {
    if (Date.now() - updated >= POLL_MS) poll();
  });
}

/** "a and b have the same colour #ff0000: …" for each colour given to more than one class (any case), or []. */
export function sameColours(classes) {
  const byColour = new globalThis.Map();
  for (const c of classes) {
    if (!/^#[0-9a-fA-F]{6}$/.test(c.color)) continue;
    const colour = c.color.toLowerCase();
    byColour.set(colour, [...(byColour.get(colour) || []), c.name]);
  }
  return [...byColour].filter(([, names]) => names.length > 1).map(([colour, names]) =>
    `${names.slice(0, -1).join(", ")} and ${names[names.length - 1]} have the same colour ${colour}: `
    + "annotators cannot tell them apart");
}

function previewClasses() {
  const classes = parseClasses($("session-classes").value);
  $("classes-preview").replaceChildren(...classes.map((c) => /^#[0-9a-fA-F]{6}$/.test(c.color)
    ? el("span", { class: "class", style: `--c:${c.color}` }, c.name)
    : el("span", { class: "error" }, `${c.name}: colour '${c.color}' is not #rrggbb`)),
  ...sameColours(classes).map((text) => el("span", { class: "warning", style: "color:#ef6c00" }, ` ${text}`)));
}
$("session-classes").addEventListener("input", previewClasses);
previewClasses();

// what the create form last said on the status line ("created …"): replaced by the next create's outcome
let createdStatus = null;
/** Clears what the form said about an earlier create: its error, and its "created …" on the status line. */
function clearCreateMessages() {
  $("create-error").textContent = "";
  if (createdStatus !== null && $("status").textContent === createdStatus) status("");
  createdStatus = null;
}
// an edit makes the last create's error (or success) old news: e.g. no refusal of '#abc' beside an emptied field
$("create-form").addEventListener("input", clearCreateMessages);

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearCreateMessages();
  let created;
  const classes = parseClasses($("session-classes").value);
  if ($("session-mode").value === "classification" && classes.length < 2) { // as the provider refuses it
    $("create-error").textContent = "a classification session needs at least 2 classes (its classifier tells "
      + `classes apart), got ${classes.length}`;
    return;
  }
  $("create-session").disabled = true; // one session per click, also while the provider is slow to answer
  try {
    created = await provider.create_session($("session-name").value, classes,
      $("session-mode").value, Number($("session-per-image").value), null);
  } catch (err) {
    $("create-error").textContent = errorText(err);
    return;
  } finally {
    $("create-session").disabled = false;
  }
  createdStatus = `created ${created.session.name}`;
  status(createdStatus);
  await refreshNow(); // a failed reload is said beside "updated", not as a failed create
});

async function main() {
  try {
    ctx = pageContext();
    if (!ctx.token) throw new Error("this link has no workspace token (#token=...)");
    status("connecting…");
    server = await connect({ server_url: ctx.serverUrl, token: ctx.token, workspace: ctx.workspace });
    provider = await server.getService(`${ctx.workspace}/${ctx.name}-provider`);
    const info = await provider.info();
    $("provider-info").textContent = `${info.name}: folder ${info.folder}, ${info.n_images} images`;
    await refresh();
    status("");
    $("refresh").addEventListener("click", refreshNow);
    $("refresh").disabled = false;
    startPolling();
  } catch (err) {
    document.body.dataset.state = "error";
    status(errorText(err), true);
  }
}

main();
