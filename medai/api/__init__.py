"""HTTP API: the dashboard's inference and explanations for hospital systems and scripts (FastAPI).

``python -m medai serve`` runs it with uvicorn. Endpoints:

- ``GET /health``: liveness and readiness (store reachable, default model loaded); no token needed.
- ``GET /models``, ``GET /models/{name}``: the servable checkpoints and their model cards.
- ``POST /api/analyze``: one image (PNG, JPEG or DICOM, multipart field ``file``) -> probabilities,
  thresholds, findings, attention shares, cardiothoracic ratio, and heatmap/overlay PNGs when asked.
- ``POST /api/analyze/batch``: several images (field ``files``); one failing image does not fail the rest.
- ``GET /openapi.json``: the schema.

Every call except ``/health`` and the schema needs ``Authorization: Bearer <token>``: per-user tokens made
by an admin (``python -m medai tokens create`` or the Users page), stored as SHA-256 only, revocable; the
token is checked before the body is read (:mod:`medai.api.guard`). The token's user and role apply as in the
dashboard, and every call is written to the audit log (who, what, status, model, image SHA-256; never pixels
or the token). Limits: upload bytes (also for chunked bodies), decoded pixels, images per batch, requests per
minute per token, failed tokens per client address, queued inferences. Every error is a JSON body
``{"error": {"code": ..., "message": ...}}`` with a 4xx status; an unexpected failure is a 500 with the same
shape and no traceback (the traceback goes to the server log).

Inference and explanations run in a fixed pool of worker threads, so a slow request never blocks
``/health`` or the event loop. Each model is loaded once per process and shared: prediction is read-only
(``torch.inference_mode``) and Grad-CAM works on a private copy of the model (medai.explain.cam).

Modules: ``settings`` (limits), ``errors`` (the error shape), ``limits`` (rate buckets, inference queue),
``guard`` (authentication, body cap, audit), ``models`` (the model pool), ``routes`` (endpoints), ``app``.
"""

from medai.api.app import create_app, serve
from medai.api.limits import RateLimiter
from medai.api.routes import Options, analyze_one
from medai.api.settings import ApiSettings

__all__ = ["ApiSettings", "Options", "RateLimiter", "analyze_one", "create_app", "serve"]
