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
from pathlib import Path
from typing import Any

from lmstack.evaluation.votes import (
    CHOICES,
    LABELLER,
    Item,
    VoteStore,
    labeller_sequence,
    order_shown,
)

PAGE_DIR = Path(__file__).with_name("label_page")
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
            page = page_html().replace("{{nonce}}", nonce).replace("{{title}}", self.app.title)
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


@cache
def page_html() -> str:
    """The page (label_page/: its HTML, CSS and script, kept as files), its style and script
    inlined, so one nonce in the Content-Security-Policy admits exactly them."""
    parts = {name: (PAGE_DIR / f"page.{name}").read_text() for name in ("html", "css", "js")}
    return parts["html"].replace("{{style}}", parts["css"]).replace("{{script}}", parts["js"])


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
