"""Who may use the server: the API key (Server.api_key) and the review station's browser session.

API clients send the key as X-API-Key or Authorization: Bearer. The station's pages answer a key
form (401) until the key is posted once to `POST /login`; the browser then holds a session cookie
(HttpOnly, SameSite=Strict, signed with a secret derived from the key, so changing the key ends
every session). The key never goes into a URL. A request authorised by the cookie alone that
changes something must carry the header `X-IDC-Station: 1`, which a cross-site form cannot send.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from flask import Blueprint, redirect, render_template, request, session

from idc.core.errors import ApiError
from idc.edge.web.state import ServerState, current_state

SESSION_HOURS = 12
PAGES = ("/", "/review", "/slides")  # where a login may send the browser back to, and a slide's viewer
SLIDE_PAGE = re.compile(r"/slides/[A-Za-z0-9][A-Za-z0-9._-]*")

bp = Blueprint("auth", __name__)


def authorize(state: ServerState, headers) -> None:
    """Raise 401 unless the request carries the API key (X-API-Key or Authorization: Bearer)."""
    if state.api_key is None:
        return
    given = headers.get("X-API-Key")
    if given is None:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    # WSGI gives headers as latin-1 decoded strings: encoding them back gives the bytes sent
    # (so a UTF-8 key sent as UTF-8 matches), and nothing a client sends can raise here.
    if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), state.api_key):
        why = "API key required: send it as X-API-Key or Authorization: Bearer <key>" if given is None \
            else "wrong API key"
        raise ApiError(401, why, {"WWW-Authenticate": 'Bearer realm="idc"'})


def session_ok() -> bool:
    started = session.get("idc_since")
    return isinstance(started, (int, float)) and 0 <= time.time() - started < SESSION_HOURS * 3600


def check_access(changes: bool = False) -> None:
    """Raise 401 unless no key is set, the browser session holds it, or the request carries it.
    A change authorised by the session alone also needs the X-IDC-Station header (CSRF)."""
    state = current_state()
    if not state.auth_required:
        return
    if session_ok():
        if changes and request.headers.get("X-IDC-Station") != "1":
            raise ApiError(403, "send the header X-IDC-Station: 1 with changes made from the review station")
        return
    authorize(state, request.headers)


def session_secret(api_key: str | None) -> bytes:
    """The session cookie's signing secret: derived from the API key (a new key ends every session)."""
    return hmac.new(b"idc-review-station-session", (api_key or "").encode("utf-8"), hashlib.sha256).digest()


def safe_next(path: str | None) -> str:
    return path if path in PAGES or (path and SLIDE_PAGE.fullmatch(path)) else "/"


def login_page(message: str, status: int, target: str | None = None):
    return render_template("login.html", message=message, next=safe_next(target or request.path)), status


@bp.post("/login")
def login():
    state = current_state()
    target = safe_next(request.form.get("next"))
    if not state.auth_required:
        return redirect(target, 303)
    key = request.form.get("key", "")
    try:
        authorize(state, {"X-API-Key": key})
    except ApiError:
        time.sleep(0.5)  # slows guessing; the key is compared in constant time
        return login_page("Wrong key." if key else "Enter the key.", 401, target)
    session.clear()
    session["idc_since"] = time.time()
    return redirect(target, 303)


@bp.post("/logout")
def logout():
    session.clear()
    return redirect("/", 303)
