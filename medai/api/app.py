"""The API application: settings, store, models and queue on ``app.state``, the guard, the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from medai import __version__, backup
from medai.api.errors import ApiError, install_handlers
from medai.api.guard import Guard
from medai.api.limits import InferenceQueue
from medai.api.models import ModelPool
from medai.api.routes import router
from medai.api.settings import ApiSettings
from medai.data.io import DecodeLimits
from medai.errors import MedaiError
from medai.store import Store

log = logging.getLogger("medai.api")


def create_app(settings: ApiSettings | None = None, store: Store | None = None, preload: bool = True) -> FastAPI:
    """The API application. ``preload`` loads the default model at start-up (readiness waits for it)."""
    settings = settings or ApiSettings.from_env()
    recovered = backup.recover_interrupted()  # a restore killed half way is undone before anything reads the files
    if recovered:
        log.warning("recovered after an interruption: %s", recovered)
    store = store or Store()
    pool = ModelPool(DecodeLimits(max_file_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels))
    queue = InferenceQueue(settings.workers, settings.max_queue)
    guard: dict[str, Guard] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if preload:
            try:
                await asyncio.get_running_loop().run_in_executor(queue.executor,
                                                                 lambda: pool.predictor(pool.entry(None)))
            except (MedaiError, ApiError) as exc:
                log.error("default model not loaded: %s", exc)
        yield
        queue.shutdown()
        if "guard" in guard:
            guard["guard"].failure_audit.flush()

    app = FastAPI(title="MedAI CXR API", version=__version__, lifespan=lifespan,
                  description="Chest X-ray findings with Grad-CAM heatmaps and anatomical attention. Decision "
                              "support for trained readers, not a diagnosis. Send `Authorization: Bearer <token>`.")
    app.state.settings, app.state.store, app.state.pool, app.state.queue = settings, store, pool, queue
    app.state.preload = preload
    app.state.executor = queue.executor  # the worker pool (tests occupy it to provoke 503s)
    install_handlers(app)
    app.include_router(router)

    def make_guard(inner):  # Starlette builds the middleware stack lazily; keep the instance for flushing
        guard["guard"] = Guard(inner, store, settings)
        return guard["guard"]
    app.add_middleware(make_guard)
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level=log_level, access_log=True)
