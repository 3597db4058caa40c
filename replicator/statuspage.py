"""The master's status page, `GET /ui`: one HTML file (statuspage.html)
with its style and script inside, no build step and nothing fetched from
elsewhere (no CDN, no web fonts). Its script reads `GET /ui/status`
(overview.py) every two seconds and redraws.

Open, like `GET /` whose facts it shows; a site that wants it private puts
it behind its proxy's auth. The page's Content-Security-Policy allows only
its own inline style and script (by their SHA-256) and calls to this
origin, so nothing injected into the data (a node id, an error text) can
run: the script also only ever sets text, never HTML.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def _page() -> tuple[bytes, str]:
    html = resources.files(__package__).joinpath("statuspage.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_hash(s) for s in scripts),
        "style-src " + " ".join(_hash(s) for s in styles),
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return html.encode("utf-8"), policy


async def status_page(request: Request) -> Response:
    body, policy = _page()
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })
