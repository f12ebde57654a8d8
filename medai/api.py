"""HTTP API: the dashboard's inference and explanations for hospital systems and scripts (FastAPI).

``python -m medai serve`` runs it with uvicorn. Endpoints:

- ``GET /health``: liveness and readiness (store reachable, default model loaded); no token needed.
- ``GET /models``, ``GET /models/{name}``: the servable checkpoints and their model cards.
- ``POST /api/analyze``: one image (PNG, JPEG or DICOM, multipart field ``file``) -> probabilities,
  thresholds, findings, attention shares, cardiothoracic ratio, and heatmap/overlay PNGs when asked.
- ``POST /api/analyze/batch``: several images (field ``files``); one failing image does not fail the rest.
- ``GET /openapi.json``: the schema.

Every call except ``/health`` and the schema needs ``Authorization: Bearer <token>``: per-user tokens made
by an admin (``python -m medai tokens create`` or the Users page), stored as SHA-256 only, revocable. The
token's user and role apply as in the dashboard, and every call is written to the audit log (who, what,
status, model, image SHA-256; never pixels or the token). Limits: upload bytes, decoded pixels, images per
batch, requests per minute per token, queued inferences. Every error is a JSON body
``{"error": {"code": ..., "message": ...}}`` with a 4xx status; an unexpected failure is a 500 with the same
shape and no traceback (the traceback goes to the server log).

Inference and explanations run in a fixed pool of worker threads, so a slow request never blocks
``/health`` or the event loop. Each model is loaded once per process and shared: prediction is read-only
(``torch.inference_mode``) and Grad-CAM works on a private copy of the model (medai.explain.cam).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medai import __version__, auth, backup
from medai.analysis import analyze_and_explain, analyze_bytes, chest_check, result_dict
from medai.catalog import ModelEntry, default_index, list_models
from medai.data.io import DecodeLimits, ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from medai.errors import CheckpointError, MedaiError
from medai.explain.cam import CAM_METHODS
from medai.explain.overlay import render_overlay, to_png
from medai.inference import Predictor
from medai.paths import env_number
from medai.store import Store, StoreError, User

log = logging.getLogger("medai.api")
CATALOG_TTL_S = 10.0  # newly shipped or trained models appear within this many seconds
UNAUDITED = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass(frozen=True)
class ApiSettings:
    max_upload_mb: float = 32  # per image
    max_pixels: int = 50_000_000  # per decoded image (about 7,000 x 7,000)
    max_batch: int = 16  # images per batch request
    rate_per_min: float = 120  # requests per token (a burst of this many, refilled evenly)
    workers: int = 2  # inference threads
    max_queue: int = 32  # inferences waiting or running; more -> 503 with Retry-After

    @classmethod
    def from_env(cls) -> ApiSettings:
        d = cls()
        return cls(max_upload_mb=env_number("MEDAI_API_MAX_UPLOAD_MB", d.max_upload_mb),
                   max_pixels=int(env_number("MEDAI_API_MAX_PIXELS", d.max_pixels)),
                   max_batch=int(env_number("MEDAI_API_MAX_BATCH", d.max_batch)),
                   rate_per_min=env_number("MEDAI_API_RATE_PER_MIN", d.rate_per_min),
                   workers=max(1, int(env_number("MEDAI_API_WORKERS", d.workers))),
                   max_queue=max(1, int(env_number("MEDAI_API_MAX_QUEUE", d.max_queue))))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable machine-readable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _medai_error(exc: MedaiError) -> ApiError:
    """A user-caused failure from the medai package as an HTTP answer."""
    if isinstance(exc, UnsupportedFormatError):
        return ApiError(415, "unsupported_format", str(exc))
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "image_too_large", str(exc))
    if isinstance(exc, ImageDecodeError):
        return ApiError(422, "bad_image", str(exc))
    if isinstance(exc, CheckpointError):
        return ApiError(503, "model_unavailable", str(exc))
    return ApiError(422, "bad_request", str(exc))


class RateLimiter:
    """A token bucket per key: ``per_min`` requests at once, refilled at ``per_min`` a minute."""

    def __init__(self, per_min: float):
        self.capacity, self.rate = per_min, per_min / 60.0
        self._buckets: dict[Any, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: Any, now: float | None = None) -> float:
        """0 when the request may go ahead, otherwise the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            level, since = self._buckets.get(key, (self.capacity, now))
            level = min(self.capacity, level + (now - since) * self.rate)
            if level >= 1:
                self._buckets[key] = (level - 1, now)
                return 0.0
            self._buckets[key] = (level, now)
            return (1 - level) / self.rate


class ModelPool:
    """The servable checkpoints (medai.catalog); each loaded once and kept while its file is unchanged."""

    def __init__(self, limits: DecodeLimits):
        self.limits = limits
        self._loaded: dict[str, tuple[tuple[str, int, int], Predictor]] = {}
        self._entries: tuple[float, list[ModelEntry]] | None = None
        self._catalog_lock = threading.Lock()
        self._lock = threading.Lock()

    def entries(self) -> list[ModelEntry]:
        """The catalogue, re-read at most every ``CATALOG_TTL_S`` (it reads every checkpoint's header)."""
        now = time.monotonic()
        with self._catalog_lock:  # not the load lock: /health must not wait for a model to load
            if self._entries is None or now - self._entries[0] > CATALOG_TTL_S:
                self._entries = (now, list_models()[0])
            return self._entries[1]

    def entry(self, name: str | None) -> ModelEntry:
        entries = self.entries()
        if not entries:
            raise ApiError(503, "no_models", "no model is installed; ship or train one first")
        if name is None:
            return entries[default_index(entries)]
        for entry in entries:
            if entry.name == name:
                return entry
        raise ApiError(404, "unknown_model", f"no model named {name!r}; GET /models lists them")

    def predictor(self, entry: ModelEntry) -> Predictor:
        stat = entry.path.stat()
        key = (str(entry.path.resolve()), stat.st_mtime_ns, stat.st_size)
        with self._lock:  # one load at a time; later callers get the loaded model
            cached = self._loaded.get(entry.name)
            if cached is None or cached[0] != key:
                log.info("loading model %s from %s", entry.name, entry.path)
                self._loaded[entry.name] = (key, Predictor(entry.path, limits=self.limits))
            return self._loaded[entry.name][1]

    def loaded(self) -> list[str]:
        return sorted(list(self._loaded))  # list() of a dict is atomic; no waiting for a load in progress


@dataclass
class Options:
    """What one analysis should compute (from the query string)."""

    findings: str | list[str] = "positive"
    explain: bool = True
    heatmaps: bool = False
    method: str | None = None
    opacity: float = 0.45


def _b64png(array: np.ndarray) -> str:
    return base64.b64encode(to_png(array)).decode("ascii")


def analyze_one(predictor: Predictor, entry: ModelEntry, data: bytes, file_name: str, opts: Options) -> dict[str, Any]:
    """The API's result for one image: the Analyze page's result JSON plus flat probabilities/thresholds,
    and base64 PNGs (8-bit heatmap, RGB overlay) per explained finding when ``opts.heatmaps``."""
    explanation, warnings, images = None, [], {}
    if opts.explain or opts.heatmaps:  # one forward pass serves the prediction and the heatmaps
        analysis, exp = analyze_and_explain(predictor, entry.name, data, file_name, opts.findings, opts.method)
        explanation = exp.to_dict()
        warnings = [w for w in [chest_check(predictor, exp.anatomy.applicable, exp.anatomy.reason)] if w]
        warnings += [f"{label}: {text}" for label, text in exp.warnings.items()]
        if opts.heatmaps:
            pixels = analysis.image.pixels
            images = {label: {"heatmap_png": _b64png((np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8)),
                              "overlay_png": _b64png(render_overlay(pixels, heat, opts.opacity, exp.anatomy))}
                      for label, heat in exp.heatmaps.items()}
    else:
        analysis = analyze_bytes(predictor, entry.name, data, file_name)
    thresholds = dict(zip(predictor.labels, predictor.thresholds))
    result = result_dict(analysis, thresholds, entry.card, explanation)
    result["probabilities"] = dict(zip(analysis.labels, analysis.prediction.probabilities))
    result["thresholds"] = thresholds
    result["warnings"] = warnings
    if opts.heatmaps:
        result["heatmaps"] = images
    return result


def _safe_name(name: str | None) -> str:
    base = PurePath((name or "").replace("\\", "/")).name.strip()
    return base[:200] or "upload"


async def _read_upload(upload: UploadFile, limit: int) -> tuple[str, bytes]:
    name = _safe_name(upload.filename)
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "upload_too_large", f"{name}: larger than the {limit / 2**20:.0f} MB limit per image")
        chunks.append(chunk)
    if total == 0:
        raise ApiError(422, "empty_file", f"{name}: the upload is empty")
    return name, b"".join(chunks)


def _options(findings: str, explain_: bool, heatmaps: bool, method: str | None, opacity: float) -> Options:
    if method is not None and method not in CAM_METHODS:
        raise ApiError(422, "unknown_method", f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    parsed: str | list[str] = findings if findings in ("positive", "all") else \
        [f.strip() for f in findings.split(",") if f.strip()]
    if not parsed:
        raise ApiError(422, "bad_findings", "findings must be 'positive', 'all' or comma-separated label names")
    return Options(parsed, explain_, heatmaps, method, opacity)


@dataclass
class Caller:
    user: User
    token_id: int


def create_app(settings: ApiSettings | None = None, store: Store | None = None, preload: bool = True) -> FastAPI:
    """The API application. ``preload`` loads the default model at start-up (readiness waits for it)."""
    settings = settings or ApiSettings.from_env()
    recovered = backup.recover_interrupted()  # a restore killed half way is undone before anything reads the files
    if recovered:
        log.warning("recovered after an interruption: %s", recovered)
    store = store or Store()
    pool = ModelPool(DecodeLimits(max_file_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels))
    limiter = RateLimiter(settings.rate_per_min)
    executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="medai-infer")
    pending = {"n": 0}
    pending_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if preload:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, lambda: pool.predictor(pool.entry(None)))
            except (MedaiError, ApiError) as exc:
                log.error("default model not loaded: %s", exc)
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="MedAI CXR API", version=__version__, lifespan=lifespan,
                  description="Chest X-ray findings with Grad-CAM heatmaps and anatomical attention. Decision "
                              "support for trained readers, not a diagnosis. Send `Authorization: Bearer <token>`.")
    app.state.settings, app.state.pool, app.state.executor = settings, pool, executor

    async def run_job(job: Callable[[], Any]) -> Any:
        with pending_lock:
            if pending["n"] >= settings.max_queue:
                raise ApiError(503, "busy", f"{pending['n']} analyses are already queued; retry shortly",
                               {"Retry-After": "2"})
            pending["n"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job)
        finally:
            with pending_lock:
                pending["n"] -= 1

    bearer = HTTPBearer(auto_error=False, description="an API token made by an admin")

    def caller(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        challenge = {"WWW-Authenticate": "Bearer"}
        if creds is None:
            raise ApiError(401, "unauthorized", "send an API token: 'Authorization: Bearer <token>'", challenge)
        try:
            user, token_id = auth.user_for_token(store, creds.credentials)
        except auth.AuthError as exc:
            raise ApiError(401, "invalid_token", str(exc), challenge) from None
        request.state.username, request.state.token_id = user.username, token_id
        wait = limiter.acquire(token_id)
        if wait:
            raise ApiError(429, "rate_limited", f"over {settings.rate_per_min:g} requests a minute for this "
                           f"token; retry in {math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})
        return Caller(user, token_id)

    def role(page: str) -> Callable[..., Caller]:
        def check(who: Caller = Depends(caller)) -> Caller:
            if not auth.can_open(who.user.role, page):
                raise ApiError(403, "forbidden", f"the role {who.user.role} may not use {page}")
            return who
        return check

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(MedaiError)
    async def _medai(_request: Request, exc: MedaiError) -> JSONResponse:
        err = _medai_error(exc)
        return _error_response(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.middleware("http")
    async def guard_and_audit(request: Request, call_next: Callable) -> Any:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        limit = settings.max_upload_bytes * settings.max_batch + 1024 * 1024  # images + multipart overhead
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = _error_response(413, "request_too_large", f"the request body is over {limit / 2**20:.0f} MB")
        else:
            try:
                response = await call_next(request)
            except Exception:  # noqa: BLE001 - the last line of defence: no traceback leaves the server
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = _error_response(500, "internal", "internal error; the server log has the details")
        if request.url.path not in UNAUDITED:
            detail = {"method": request.method, "path": request.url.path, "status": response.status_code,
                      "ms": round(1000 * (time.perf_counter() - started), 1)}
            for key in ("token_id", "model", "images"):
                if hasattr(request.state, key):
                    detail[key] = getattr(request.state, key)
            try:
                await run_in_threadpool(store.audit, getattr(request.state, "username", None), "api_call", **detail)
            except StoreError as exc:
                log.error("audit entry not written: %s", exc)
        return response

    @app.get("/health", tags=["service"], summary="Liveness and readiness")
    def health() -> JSONResponse:
        try:
            store.schema_version()
            store_ok = True
        except StoreError as exc:
            log.error("store unreachable: %s", exc)
            store_ok = False
        entries = pool.entries()
        loaded = pool.loaded()
        ready = store_ok and bool(loaded if preload else entries)
        body = {"status": "ok" if ready else "unavailable", "live": True, "ready": ready, "version": __version__,
                "store": store_ok, "models": {"available": len(entries), "loaded": len(loaded)},
                "queue": {"pending": pending["n"], "workers": settings.workers}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/models", tags=["models"], summary="Servable models")
    def models(_who: Caller = Depends(role("models"))) -> list[dict[str, Any]]:
        entries = pool.entries()
        default = entries[default_index(entries)].name if entries else None
        return [{"name": e.name, "source": e.source, "architecture": e.card["architecture"],
                 "task": e.card["task"].get("name") or e.card["task"]["kind"], "labels": e.card["labels"],
                 "val_auroc": e.val_auroc, "default": e.name == default} for e in entries]

    @app.get("/models/{name}", tags=["models"], summary="A model's card")
    def model_card(name: str, _who: Caller = Depends(role("models"))) -> dict[str, Any]:
        entry = pool.entry(name)
        return {"name": entry.name, "source": entry.source, "card": entry.card}

    def query_options(
            model: str | None = Query(None, description="model name (GET /models); default: the default model"),
            findings: str = Query("positive", description="'positive', 'all' or comma-separated labels to explain"),
            explain: bool = Query(True, description="Grad-CAM, attention shares and CTR"),
            heatmaps: bool = Query(False, description="also return heatmap and overlay PNGs (base64)"),
            method: str | None = Query(None, description=f"CAM method: {', '.join(CAM_METHODS)}"),
            opacity: float = Query(0.45, ge=0, le=1, description="overlay opacity"),
    ) -> tuple[str | None, Options]:
        return model, _options(findings, explain, heatmaps, method, opacity)

    def prepare(request: Request, model: str | None) -> tuple[ModelEntry, Predictor]:
        entry = pool.entry(model)
        request.state.model = entry.name
        return entry, pool.predictor(entry)

    @app.post("/api/analyze", tags=["analysis"], summary="Analyze one image")
    async def analyze(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM"),
                      query: tuple[str | None, Options] = Depends(query_options),
                      _who: Caller = Depends(role("analyze"))) -> dict[str, Any]:
        name, data = await _read_upload(file, settings.max_upload_bytes)
        model, opts = query

        def job() -> dict[str, Any]:
            entry, predictor = prepare(request, model)
            request.state.images = [{"file": name, "sha256": hashlib.sha256(data).hexdigest()}]
            return analyze_one(predictor, entry, data, name, opts)
        return await run_job(job)

    @app.post("/api/analyze/batch", tags=["analysis"], summary="Analyze several images")
    async def analyze_batch(request: Request, files: list[UploadFile] = File(..., description="images"),
                            query: tuple[str | None, Options] = Depends(query_options),
                            _who: Caller = Depends(role("analyze"))) -> dict[str, Any]:
        if len(files) > settings.max_batch:
            raise ApiError(413, "too_many_files", f"{len(files)} images; at most {settings.max_batch} per batch")
        uploads = []
        for upload in files:
            try:
                uploads.append((*await _read_upload(upload, settings.max_upload_bytes), None))
            except ApiError as exc:
                uploads.append((_safe_name(upload.filename), b"", exc))
        model, opts = query

        def job() -> dict[str, Any]:
            entry, predictor = prepare(request, model)
            request.state.images = [{"file": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d, _ in uploads]
            results = []
            for name, data, problem in uploads:
                try:
                    if problem:
                        raise problem
                    results.append({"file": name, "result": analyze_one(predictor, entry, data, name, opts)})
                except (ApiError, MedaiError) as exc:
                    err = exc if isinstance(exc, ApiError) else _medai_error(exc)
                    results.append({"file": name, "error": {"code": err.code, "message": err.message,
                                                            "status": err.status}})
            return {"model": entry.name, "count": len(results),
                    "failed": sum("error" in r for r in results), "results": results}
        return await run_job(job)

    return app


def serve(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level=log_level, access_log=True)
