// The provider's session manager (the manage URL, with a token of the provider's workspace).
import "./manage.css";
import { connect, errorText, el, pageContext } from "./common.js";

const $ = (id) => document.getElementById(id);
let provider = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

/** "nucleus:#e6194b, other" -> [{name, color}] (a class without a colour gets one from a palette). */
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
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

function shareLink(url) {
  return el("span", { class: "share" }, el("input", { class: "share-url", value: url, readonly: true, size: 60 }),
    copyButton(url));
}

async function act(promise) {
  try {
    await promise;
    await refresh();
  } catch (err) {
    status(errorText(err), true);
  }
}

async function sessionCard(s) {
  const p = await provider.progress(s.session_id);
  const annotators = Object.values(p.per_annotator);
  const id = s.session_id;
  return el("div", { class: `session ${s.state}`, "data-session-id": id },
    el("h3", {}, s.name, " ", el("small", {}, `${s.state} · ${s.mode} · ${s.annotators_per_image} per image`)),
    el("div", { class: "classes" }, s.classes.map((c) => el("span", { class: "class", style: `--c:${c.color}` }, c.name))),
    el("div", { class: "progress" },
      el("progress", { max: p.n_images || 1, value: p.images_done }),
      ` ${p.images_done} of ${p.n_images} images done, ${p.images_in_progress} in progress; `,
      annotators.length
        ? annotators.map((a) => `${a.display_name} (${a.images} images, ${a.versions} versions)`).join(", ")
        : "nobody joined yet"),
    s.share_url ? el("div", {}, "Share link: ", shareLink(s.share_url)) : null,
    el("table", { class: "tokens" }, s.tokens.map((t) => el("tr", {},
      el("td", {}, t.label || t.token_id), el("td", {}, t.created.slice(0, 16).replace("T", " ")),
      el("td", {}, t.revoked ? `revoked ${t.revoked.slice(0, 16).replace("T", " ")}` :
        el("button", { class: "revoke", onclick: () => act(provider.revoke_token(id, t.token_id)) }, "revoke"))))),
    el("div", { class: "actions" },
      el("button", { class: "issue", onclick: async () => {
        try {
          const issued = await provider.issue_token(id, `link ${s.tokens.length + 1}`);
          await refresh();
          document.querySelector(`[data-session-id="${id}"]`)
            ?.append(el("div", { class: "issued" }, "New link: ", shareLink(issued.share_url)));
        } catch (err) { status(errorText(err), true); }
      } }, "new share link"),
      s.state === "open"
        ? el("button", { class: "close", onclick: () => act(provider.close_session(id)) }, "close")
        : el("button", { class: "reopen", onclick: () => act(provider.reopen_session(id)) }, "reopen")));
}

async function refresh() {
  const [images, sessions] = await Promise.all([provider.list_images(), provider.list_sessions()]);
  $("images").tBodies[0].replaceChildren(...images.map((im) => el("tr", { class: im.status },
    el("td", {}, im.name), el("td", {}, im.format), el("td", {}, im.shape ? im.shape.join(" × ") : ""),
    el("td", {}, im.dtype || ""), el("td", { title: im.error || "" }, im.error ? `unreadable: ${im.error}` : im.status))));
  const cards = await Promise.all(sessions.slice().reverse().map(sessionCard));
  $("sessions").replaceChildren(...(cards.length ? cards : [el("p", {}, "no sessions yet")]));
  document.body.dataset.state = "ready";
}

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("create-error").textContent = "";
  try {
    const created = await provider.create_session($("session-name").value, parseClasses($("session-classes").value),
      $("session-mode").value, Number($("session-per-image").value), null);
    await refresh();
    status(`created ${created.session.name}`);
  } catch (err) {
    $("create-error").textContent = errorText(err);
  }
});

async function main() {
  try {
    const ctx = pageContext();
    if (!ctx.token) throw new Error("this link has no workspace token (#token=...)");
    status("connecting…");
    const server = await connect({ server_url: ctx.serverUrl, token: ctx.token, workspace: ctx.workspace });
    provider = await server.getService(`${ctx.workspace}/${ctx.name}-provider`);
    const info = await provider.info();
    $("provider-info").textContent = `${info.name}: folder ${info.folder}, ${info.n_images} images`;
    await refresh();
    status("");
  } catch (err) {
    document.body.dataset.state = "error";
    status(errorText(err), true);
  }
}

main();
