"""The blind pairwise labelling page: a small HTTP server over a VoteStore.

    GET  /?labeller=NAME[&token=T]   the page (prompt, answers A and B, vote buttons)
    GET  /api/next?labeller=NAME     the labeller's next item, progress, everyone's counts
    POST /api/vote                   {labeller, item_id, choice: A|B|tie|both_bad, order, reason}
    GET  /api/progress               votes per labeller
    GET  /health

Answers are Markdown rendered on the server with raw HTML escaped (markdown-it, html off, its
link check drops javascript: URLs), and the page carries a Content-Security-Policy that runs
only its own script (by nonce) and loads no images: model output cannot run script in it.

When a token is set, every request needs it (`?token=` or the X-Lmstack-Token header); bad input
(an unknown item, a malformed body, a missing token) gets a 4xx naming the problem, stores
nothing, and the server goes on serving. The standard library's threading server is enough:
a handful of people click a few times a minute.

Deferred imports, for start-up time: markdown_it (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import urllib.parse
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmstack.evaluation.votes import (
    CHOICES,
    LABELLER,
    Item,
    VoteStore,
    labeller_sequence,
    order_shown,
)

TOKEN_HEADER = "X-Lmstack-Token"
MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@cache
def _markdown() -> Any:
    from markdown_it import MarkdownIt

    # html off: a model's <script> or <img onerror> is shown as text, never parsed as HTML
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(text: str) -> str:
    return _markdown().render(text)


class LabelApp:
    """Items, the store and the token: what every request handler shares."""

    def __init__(self, items: list[Item], store: VoteStore, token: str = "", title: str = ""):
        self.items = {item.id: item for item in items}
        self.ordered = items
        self.store, self.token = store, token
        self.title = title or "lmstack · blind comparison"
        self._sequences: dict[str, list[Item]] = {}

    # ---- answers

    def next_for(self, labeller: str) -> dict[str, Any]:
        done = self.store.voted_items(labeller)
        if labeller not in self._sequences:
            self._sequences[labeller] = labeller_sequence(self.ordered, labeller)
        upcoming = next((i for i in self._sequences[labeller] if i.id not in done), None)
        answer: dict[str, Any] = {
            "labeller": labeller,
            "done": len(done & self.items.keys()),
            "total": len(self.items),
            "labellers": self.store.counts(),
            "item": None,
        }
        if upcoming is not None:
            order = order_shown(labeller, upcoming.id)
            left, right = (upcoming.x, upcoming.y) if order == "xy" else (upcoming.y, upcoming.x)
            answer["item"] = {
                "id": upcoming.id,
                "order": order,
                "prompt_html": render_markdown(upcoming.prompt),
                "a_html": render_markdown(left),
                "b_html": render_markdown(right),
            }
        return answer

    def vote(self, body: dict[str, Any]) -> dict[str, Any]:
        labeller = checked_labeller(body.get("labeller"))
        item_id = body.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise BadRequest(400, "item_id: missing (the id of the item voted on)")
        if item_id not in self.items:
            raise BadRequest(404, f"item_id: no item '{item_id[:80]}' in this session")
        choice = body.get("choice")
        if choice not in CHOICES:
            raise BadRequest(400, f"choice: {choice!r} is not one of {', '.join(CHOICES)}")
        order = order_shown(labeller, item_id)
        if body.get("order", order) != order:
            raise BadRequest(
                409, f"order: the page showed {body.get('order')!r}, this item is shown {order!r}"
            )
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise BadRequest(400, f"reason: must be text of at most {MAX_REASON_CHARS} characters")
        recorded = self.store.add(labeller, item_id, order, choice, reason.strip())
        done = len(self.store.voted_items(labeller) & self.items.keys())
        return {"recorded": recorded, "done": done, "total": len(self.items)}

    def authorized(self, query: dict[str, list[str]], headers: Any) -> None:
        if not self.token:
            return
        given = headers.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
        if not given:
            raise BadRequest(401, "token: this page needs its access token (?token=...)")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise BadRequest(403, "token: wrong access token")


def checked_labeller(value: Any) -> str:
    if not isinstance(value, str) or not LABELLER.match(value):
        raise BadRequest(
            400,
            f"labeller: {str(value)[:80]!r} is not a labeller id (1-64 letters, digits, _ . @ -)",
        )
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(400, f"body: not JSON ({error})") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "body: must be a JSON object")
    return body


class Handler(BaseHTTPRequestHandler):
    app: LabelApp  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per click would bury the URL the user needs

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, handler: Any) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        try:
            if url.path != "/health":
                self.app.authorized(query, self.headers)
            handler(url.path, query)
        except BadRequest as error:
            # a body left unread would be parsed as the next request: end the connection
            self.close_connection = True
            self._json(error.status, {"error": str(error)})
        except Exception as error:  # the page goes on serving whatever one request did
            self.close_connection = True
            self._json(500, {"error": f"{type(error).__name__}: {error}"})

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            page = PAGE.replace("{{nonce}}", nonce).replace("{{title}}", self.app.title)
            self._send(200, page.encode(), "text/html; charset=utf-8", csp(nonce))
        elif path == "/api/next":
            labeller = checked_labeller((query.get("labeller") or [""])[0])
            self._json(200, self.app.next_for(labeller))
        elif path == "/api/progress":
            counts = self.app.store.counts()
            self._json(200, {"total": len(self.app.items), "labellers": counts})
        elif path == "/health":
            self._json(200, {"status": "ok", "items": len(self.app.items)})
        else:
            raise BadRequest(404, f"no page {path!r}")

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        if path != "/api/vote":
            raise BadRequest(404, f"no endpoint {path!r} (votes go to POST /api/vote)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest(400, "Content-Length: not a number") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, f"body: {length} bytes, more than {MAX_BODY_BYTES}")
        self._json(200, self.app.vote(parse_body(self.rfile.read(length))))

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str, policy: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if policy:
            self.send_header("Content-Security-Policy", policy)
        self.end_headers()
        self.wfile.write(body)


def csp(nonce: str) -> str:
    """Only the page's own script and style run; no images, frames or other origins."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def make_server(app: LabelApp, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("LabelHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def page_url(host: str, port: int, token: str, labeller: str = "") -> str:
    # bound to every interface: the name other machines reach this one by
    shown = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    query = {k: v for k, v in (("labeller", labeller), ("token", token)) if v}
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"http://{shown}:{port}/{suffix}"


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style nonce="{{nonce}}">
:root { --ink:#1f2430; --muted:#6b7280; --line:#e3e6ec; --bg:#f5f6f8; --card:#fff;
        --accent:#3858e9; --a:#2563eb; --b:#c2410c; --ok:#15803d; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--ink); background:var(--bg); }
header { position:sticky; top:0; z-index:2; background:var(--card);
         border-bottom:1px solid var(--line); }
.bar { max-width:1280px; margin:0 auto; padding:10px 20px; display:flex; gap:16px;
       align-items:center; }
.brand { font-weight:650; letter-spacing:.2px; }
.brand small { color:var(--muted); font-weight:400; margin-left:6px; }
.progress { flex:1; display:flex; align-items:center; gap:10px; color:var(--muted); }
.track { flex:1; max-width:360px; height:8px; background:var(--line); border-radius:4px;
         overflow:hidden; }
.fill { height:100%; width:0; background:var(--accent); transition:width .25s; }
.who { color:var(--muted); font-size:13px; }
.who b { color:var(--ink); }
main { max-width:1280px; margin:0 auto; padding:16px 20px 24px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; }
.prompt { padding:12px 16px; margin-bottom:14px; }
.label { font-size:12px; text-transform:uppercase; letter-spacing:.08em; color:var(--muted);
         font-weight:600; margin-bottom:4px; }
.answers { display:grid; grid-template-columns:1fr 1fr; gap:14px; }
.answer { display:flex; flex-direction:column; min-height:0; }
.answer .head { padding:8px 16px; border-bottom:1px solid var(--line); display:flex;
                justify-content:space-between; align-items:center; }
.answer .tag { font-weight:700; }
#a .tag { color:var(--a); } #b .tag { color:var(--b); }
.answer .body { padding:4px 16px 10px; overflow:auto; max-height:calc(100vh - 390px);
                min-height:120px; overflow-wrap:anywhere; }
.body p { margin:.6em 0; }
pre { background:#f2f4f7; border:1px solid var(--line); border-radius:6px; padding:8px 10px;
      overflow:auto; font-size:13px; }
code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px;
       background:#f2f4f7; padding:1px 4px; border-radius:4px; }
pre code { background:none; padding:0; }
.vote { margin-top:14px; padding:12px 16px; display:flex; flex-wrap:wrap; gap:10px;
        align-items:center; }
button { font:inherit; border:1px solid var(--line); background:#fff; border-radius:8px;
         padding:8px 14px; cursor:pointer; display:inline-flex; gap:8px; align-items:center; }
button:hover { border-color:var(--accent); }
button:disabled { opacity:.5; cursor:default; }
button.a { color:var(--a); font-weight:600; } button.b { color:var(--b); font-weight:600; }
kbd { font:12px ui-monospace,monospace; border:1px solid var(--line); border-bottom-width:2px;
      border-radius:4px; padding:0 5px; color:var(--muted); background:#fafbfc; }
textarea { flex:1; min-width:220px; font:inherit; border:1px solid var(--line); border-radius:8px;
           padding:7px 10px; resize:vertical; height:38px; }
.prompt p, .body p { margin:.5em 0; }
.prompt > div > :first-child, .body > :first-child { margin-top:.4em; }
.prompt > div > :last-child { margin-bottom:0; }
.foot { margin-top:8px; display:flex; justify-content:space-between; gap:12px; }
.keys { color:var(--muted); font-size:13px; }
.status { min-height:20px; color:var(--muted); font-size:13px; }
.status.warn { color:var(--b); } .status.ok { color:var(--ok); }
.done { padding:40px; text-align:center; }
.hidden { display:none; }
form.name { padding:28px; max-width:420px; margin:60px auto; }
form.name input { font:inherit; padding:8px 10px; border:1px solid var(--line);
                  border-radius:8px; width:100%; margin:10px 0; }
@media (max-width: 820px) { .answers { grid-template-columns:1fr; }
  .answer .body { max-height:none; } }
</style>
</head>
<body>
<header><div class="bar">
  <div class="brand">lmstack<small>blind comparison</small></div>
  <div class="progress"><div class="track"><div class="fill" id="fill"></div></div>
    <span id="count">–</span></div>
  <div class="who" id="who"></div>
</div></header>
<main>
  <form class="card name hidden" id="nameform">
    <div class="label">Who is labelling?</div>
    <input id="name" placeholder="your labeller id, e.g. alice" autocomplete="off">
    <button type="submit">Start</button>
  </form>
  <div id="task" class="hidden">
    <section class="card prompt"><div class="label">Prompt</div><div id="prompt"></div></section>
    <section class="answers">
      <article class="card answer" id="a"><div class="head"><span class="tag">Answer A</span>
        <kbd>A</kbd></div><div class="body" id="a_body"></div></article>
      <article class="card answer" id="b"><div class="head"><span class="tag">Answer B</span>
        <kbd>B</kbd></div><div class="body" id="b_body"></div></article>
    </section>
    <section class="card vote">
      <button class="a" data-choice="A">A is better <kbd>A</kbd></button>
      <button data-choice="tie">Tie <kbd>T</kbd></button>
      <button class="b" data-choice="B">B is better <kbd>B</kbd></button>
      <button data-choice="both_bad">Both bad <kbd>X</kbd></button>
      <textarea id="reason" placeholder="Why? (optional; R to type, Esc to leave)"></textarea>
    </section>
    <div class="foot"><div class="status" id="status"></div>
      <div class="keys">Keys: <kbd>A</kbd> <kbd>B</kbd> better · <kbd>T</kbd> tie ·
        <kbd>X</kbd> both bad · <kbd>R</kbd> reason</div></div>
  </div>
  <section class="card done" id="done" hidden><h2>All done — thank you!</h2>
    <p id="donecount"></p></section>
</main>
<script nonce="{{nonce}}">
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
let labeller = params.get("labeller") || localStorage.getItem("lmstack-labeller") || "";
let current = null, busy = false;
const $ = (id) => document.getElementById(id);
const headers = () => Object.assign({"Content-Type": "application/json"},
  token ? {"X-Lmstack-Token": token} : {});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function status(text, kind) { const s = $("status"); s.textContent = text;
  s.className = "status" + (kind ? " " + kind : ""); }

// the server may be restarting: try again until it answers (a vote is stored once anyway)
async function call(path, options) {
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch(path, Object.assign({headers: headers()}, options || {}));
      const payload = await response.json();
      if (!response.ok) throw Object.assign(new Error(payload.error), {fatal: true});
      if (attempt) status("Reconnected.", "ok");
      return payload;
    } catch (error) {
      if (error.fatal) throw error;
      status("The server is not answering; retrying…", "warn");
      await sleep(Math.min(500 * (attempt + 1), 3000));
    }
  }
}

function progress(data) {
  const pct = data.total ? 100 * data.done / data.total : 0;
  $("fill").style.width = pct + "%";
  $("count").textContent = data.done + " of " + data.total;
  others(data);
}

function others(data) {
  const names = Object.entries(data.labellers || {}).filter(([n]) => n !== labeller)
    .map(([n, c]) => n + " " + c);
  $("who").innerHTML = "";
  const me = document.createElement("b"); me.textContent = labeller;
  $("who").append("Labeller ", me, names.length ? " · others: " + names.join(", ") : "");
}

async function next() {
  const data = await call("/api/next?labeller=" + encodeURIComponent(labeller));
  progress(data);
  current = data.item;
  if (!current) { $("task").classList.add("hidden"); $("done").hidden = false;
    $("donecount").textContent = data.done + " of " + data.total + " items voted."; return; }
  $("prompt").innerHTML = current.prompt_html;  // rendered and escaped by the server
  $("a_body").innerHTML = current.a_html;
  $("b_body").innerHTML = current.b_html;
  $("a_body").scrollTop = $("b_body").scrollTop = 0;
  $("reason").value = "";
  document.body.dataset.item = current.id;
  $("task").classList.remove("hidden");
}

async function vote(choice) {
  if (!current || busy) return;
  busy = true;
  document.querySelectorAll("button[data-choice]").forEach((b) => b.disabled = true);
  try {
    const body = {labeller, item_id: current.id, choice, order: current.order,
                  reason: $("reason").value};
    const answer = await call("/api/vote", {method: "POST", body: JSON.stringify(body)});
    status(answer.recorded ? "Saved." : "Already saved.", "ok");
    await next();
  } catch (error) { status(error.message, "warn"); }
  finally { busy = false;
    document.querySelectorAll("button[data-choice]").forEach((b) => b.disabled = false); }
}

document.querySelectorAll("button[data-choice]").forEach((b) =>
  b.addEventListener("click", () => vote(b.dataset.choice)));
document.addEventListener("keydown", (event) => {
  if (event.target === $("reason")) {
    if (event.key === "Escape") $("reason").blur();
    return;
  }
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const keys = {a: "A", b: "B", t: "tie", x: "both_bad", "1": "A", "2": "B", "3": "tie",
                "4": "both_bad"};
  const choice = keys[event.key.toLowerCase()];
  if (choice) { event.preventDefault(); vote(choice); }
  else if (event.key.toLowerCase() === "r") { event.preventDefault(); $("reason").focus(); }
});
$("nameform").addEventListener("submit", (event) => {
  event.preventDefault();
  labeller = $("name").value.trim();
  if (!labeller) return;
  localStorage.setItem("lmstack-labeller", labeller);
  $("nameform").classList.add("hidden");
  next().catch((error) => status(error.message, "warn"));
});
// everyone's counts, now and then (the page's own count changes with each vote)
setInterval(() => { if (labeller && !busy) fetch("/api/progress", {headers: headers()})
  .then((r) => r.ok ? r.json() : null).then((d) => d && others(d)).catch(() => {}); }, 3000);
if (labeller) next().catch((error) => { $("task").classList.remove("hidden");
  status(error.message, "warn"); });
else $("nameform").classList.remove("hidden");
</script>
</body>
</html>
"""
