"""The API's endpoints, on one router; the services they use hang on ``app.state`` (see medai.api.app)."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from medai import __version__, auth
from medai.analysis import HEATMAP_METHODS, analyze_and_explain, analyze_bytes, flat_result, overlay, to_png
from medai.api.errors import ApiError, medai_error
from medai.api.guard import CHALLENGE, Caller
from medai.catalog import ModelEntry, default_index
from medai.errors import MedaiError
from medai.inference import Predictor
from medai.store import StoreError

log = logging.getLogger("medai.api")
router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="an API token made by an admin")


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
        explanation = exp.to_dict() if exp else None
        warnings = [f"{label}: {text}" for label, text in exp.warnings.items()] if exp else []
        if opts.heatmaps and exp:
            pixels = analysis.image.pixels
            images = {label: {"heatmap_png": _b64png((np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8)),
                              "overlay_png": _b64png(overlay(pixels, exp, label, opts.opacity))}
                      for label, heat in exp.heatmaps.items()}
    else:
        analysis = analyze_bytes(predictor, entry.name, data, file_name)
    result = flat_result(analysis, entry.card, explanation, warnings)
    if opts.heatmaps and not analysis.refused:
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
    if method is not None and method not in HEATMAP_METHODS:
        raise ApiError(422, "unknown_method", f"unknown CAM method {method!r}; choose one of {', '.join(HEATMAP_METHODS)}")
    parsed: str | list[str] = findings if findings in ("positive", "all") else \
        [f.strip() for f in findings.split(",") if f.strip()]
    if not parsed:
        raise ApiError(422, "bad_findings", "findings must be 'positive', 'all' or comma-separated label names")
    return Options(parsed, explain_, heatmaps, method, opacity)


def caller(request: Request, _creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
    """The caller the guard authenticated (``_creds`` only documents the scheme in the OpenAPI schema)."""
    who = getattr(request.state, "caller", None)
    if who is None:  # the guard lets no unauthenticated request reach a route; this is a safety net
        raise ApiError(401, "unauthorized", "send an API token: 'Authorization: Bearer <token>'", CHALLENGE)
    return who


def role(page: str) -> Callable[..., Caller]:
    def check(who: Caller = Depends(caller)) -> Caller:
        if not auth.can_open(who.user.role, page):
            raise ApiError(403, "forbidden", f"the role {who.user.role} may not use {page}")
        return who
    return check


@router.get("/health", tags=["service"], summary="Liveness and readiness")
def health(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        state.store.schema_version()
        store_ok = True
    except StoreError as exc:
        log.error("store unreachable: %s", exc)
        store_ok = False
    entries = state.pool.entries()
    loaded = state.pool.loaded()
    ready = store_ok and bool(loaded if state.preload else entries)
    body = {"status": "ok" if ready else "unavailable", "live": True, "ready": ready, "version": __version__,
            "store": store_ok, "models": {"available": len(entries), "loaded": len(loaded)},
            "queue": {"pending": state.queue.pending, "workers": state.queue.workers}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/models", tags=["models"], summary="Servable models")
def models(request: Request, _who: Caller = Depends(role("models"))) -> list[dict[str, Any]]:
    entries = request.app.state.pool.entries()
    default = entries[default_index(entries)].name if entries else None
    return [{"name": e.name, "source": e.source, "architecture": e.card["architecture"],
             "task": e.card["task"].get("name") or e.card["task"]["kind"], "labels": e.card["labels"],
             "val_auroc": e.val_auroc, "default": e.name == default} for e in entries]


@router.get("/models/{name}", tags=["models"], summary="A model's card")
def model_card(request: Request, name: str, _who: Caller = Depends(role("models"))) -> dict[str, Any]:
    entry = request.app.state.pool.entry(name)
    return {"name": entry.name, "source": entry.source, "card": entry.card}


def query_options(
        model: str | None = Query(None, description="model name (GET /models); default: the default model"),
        findings: str = Query("positive", description="'positive', 'all' or comma-separated labels to explain"),
        explain: bool = Query(True, description="Grad-CAM, attention shares and CTR"),
        heatmaps: bool = Query(False, description="also return heatmap and overlay PNGs (base64)"),
        method: str | None = Query(None, description=f"CAM method: {', '.join(HEATMAP_METHODS)}"),
        opacity: float = Query(0.45, ge=0, le=1, description="overlay opacity"),
) -> tuple[str | None, Options]:
    return model, _options(findings, explain, heatmaps, method, opacity)


def _prepare(request: Request, model: str | None) -> tuple[ModelEntry, Predictor]:
    pool = request.app.state.pool
    entry = pool.entry(model)
    request.state.model = entry.name
    return entry, pool.predictor(entry)


@router.post("/api/analyze", tags=["analysis"], summary="Analyze one image")
async def analyze(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM"),
                  query: tuple[str | None, Options] = Depends(query_options),
                  _who: Caller = Depends(role("analyze"))) -> dict[str, Any]:
    name, data = await _read_upload(file, request.app.state.settings.max_upload_bytes)
    model, opts = query

    def job() -> dict[str, Any]:
        entry, predictor = _prepare(request, model)
        request.state.images = [{"file": name, "sha256": hashlib.sha256(data).hexdigest()}]
        return analyze_one(predictor, entry, data, name, opts)
    return await request.app.state.queue.run(job)


@router.post("/api/analyze/batch", tags=["analysis"], summary="Analyze several images")
async def analyze_batch(request: Request, files: list[UploadFile] = File(..., description="images"),
                        query: tuple[str | None, Options] = Depends(query_options),
                        _who: Caller = Depends(role("analyze"))) -> dict[str, Any]:
    settings = request.app.state.settings
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
        entry, predictor = _prepare(request, model)
        request.state.images = [{"file": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d, _ in uploads]
        results = []
        for name, data, problem in uploads:
            try:
                if problem:
                    raise problem
                results.append({"file": name, "result": analyze_one(predictor, entry, data, name, opts)})
            except (ApiError, MedaiError) as exc:
                err = exc if isinstance(exc, ApiError) else medai_error(exc)
                results.append({"file": name, "error": {"code": err.code, "message": err.message,
                                                        "status": err.status}})
        return {"model": entry.name, "count": len(results),
                "failed": sum("error" in r for r in results), "results": results}
    return await request.app.state.queue.run(job)
