"""The API's outermost layer (pure ASGI): who calls, how much they send, and the audit of it.

For every path but the public ones (:data:`PUBLIC`) the bearer token is checked *before a byte of the body
is read*, so an anonymous upload of any size costs the server nothing; a declared ``Content-Length`` over
the cap is refused at once and a chunked body is counted while it streams and cut off at the cap (413).
Failed or missing tokens are limited per client address (429 with Retry-After) and audited as one
``api_auth_failed`` row per address and minute with their count, not one row each. Authenticated calls
are audited as ``api_call`` (user, path, status, model, image SHA-256, time).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medai.audit import AuditAction
from medai import auth
from medai.api.errors import error_response
from medai.api.limits import RateLimiter
from medai.api.settings import ApiSettings
from medai.store import Store, StoreError, User

log = logging.getLogger("medai.api")
PUBLIC = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass
class Caller:
    user: User
    token_id: int


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the cap (FastAPI passes HTTP exceptions on)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit / 2**20:.0f} MB")


class FailureAudit:
    """Audit rows for failed or missing tokens, aggregated: the first failure of a client address writes
    a row at once; later ones within ``window_s`` are counted into the next row (or :meth:`flush`)."""

    def __init__(self, store: Store, window_s: float = 60.0):
        self.store, self.window_s = store, window_s
        self._last: dict[str, float] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, client: str, code: str, path: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._pending.setdefault(client, {"count": 0, "codes": {}, "paths": set()})
            entry["count"] += 1
            entry["codes"][code] = entry["codes"].get(code, 0) + 1
            entry["paths"].add(path)
            if now - self._last.get(client, -math.inf) < self.window_s:
                return
            self._last[client] = now
            row = self._pending.pop(client)
        self._write(client, row)

    def flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, {}
        for client, row in rows.items():
            self._write(client, row)

    def _write(self, client: str, row: dict[str, Any]) -> None:
        try:
            self.store.audit(None, AuditAction.API_AUTH_FAILED, client=client, count=row["count"], codes=row["codes"],
                             paths=sorted(row["paths"])[:10], window_s=self.window_s)
        except StoreError as exc:
            log.error("audit entry not written: %s", exc)


class Guard:
    def __init__(self, app: ASGIApp, store: Store, settings: ApiSettings):
        self.app, self.store, self.settings = app, store, settings
        self.per_token = RateLimiter(settings.rate_per_min)
        self.failures = RateLimiter(settings.auth_failures_per_min)
        self.failure_audit = FailureAudit(store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status: dict[str, Any] = {"code": None}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._oversized(scope)
        if refusal is None and scope["path"] not in PUBLIC:
            refusal = await self._authenticate(scope, state)
        if refusal is not None:
            await refusal(scope, receive, tracked)
        else:
            try:
                await self.app(scope, self._capped(receive), tracked)
            except Exception:  # noqa: BLE001 - the last line of defence: no traceback leaves the server
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                if status["code"] is None:
                    await error_response(500, "internal", "internal error; the server log has the details")(
                        scope, receive, tracked)
        if "caller" in state:
            await self._audit_call(scope, state, status["code"], started)

    def _oversized(self, scope: Scope) -> Any:
        limit = self.settings.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(413, "request_too_large", f"the request body is over {limit / 2**20:.0f} MB")
        return None

    def _capped(self, receive: Receive) -> Receive:
        limit, seen = self.settings.max_request_bytes, {"n": 0}

        async def capped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > limit:
                    raise BodyTooLarge(limit)
            return message
        return capped

    async def _authenticate(self, scope: Scope, state: dict[str, Any]) -> Any:
        """None when the bearer token is good (the caller goes into the request state), else the refusal."""
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.failures.wait(client)
        if wait:  # this address has failed too often: not even looked up
            return self._too_many(wait, f"too many failed or missing API tokens from {client}")
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        presented = scheme.lower() == "bearer" and bool(token.strip())
        try:
            if not presented:
                raise auth.AuthError("send an API token: 'Authorization: Bearer <token>'")
            user, token_id = await run_in_threadpool(auth.user_for_token, self.store, token.strip())
        except auth.AuthError as exc:
            code = "invalid_token" if presented else "unauthorized"
            self.failures.acquire(client)
            await run_in_threadpool(self.failure_audit.record, client, code, scope["path"])
            return error_response(401, code, str(exc), CHALLENGE)
        state["caller"], state["username"], state["token_id"] = Caller(user, token_id), user.username, token_id
        wait = self.per_token.acquire(token_id)
        if wait:
            return self._too_many(wait, f"over {self.settings.rate_per_min:g} requests a minute for this token")
        return None

    @staticmethod
    def _too_many(wait: float, why: str) -> Any:
        seconds = math.ceil(wait)
        return error_response(429, "rate_limited", f"{why}; retry in {seconds} s", {"Retry-After": str(seconds)})

    async def _audit_call(self, scope: Scope, state: dict[str, Any], status: int | None, started: float) -> None:
        detail = {"method": scope["method"], "path": scope["path"], "status": status,
                  "ms": round(1000 * (time.perf_counter() - started), 1)}
        for key in ("token_id", "model", "images"):
            if key in state:
                detail[key] = state[key]
        try:
            await run_in_threadpool(self.store.audit, state["username"], "api_call", **detail)
        except StoreError as exc:
            log.error("audit entry not written: %s", exc)
