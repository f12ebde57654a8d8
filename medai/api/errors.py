"""Every answer other than success: ``{"error": {"code", "message"}}`` with its HTTP status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medai.data.io import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from medai.errors import CheckpointError, MedaiError


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable machine-readable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def medai_error(exc: MedaiError) -> ApiError:
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


def install_handlers(app: FastAPI) -> None:
    """The JSON error shape for our own errors, the package's, FastAPI's validation and Starlette's."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(MedaiError)
    async def _medai(_request: Request, exc: MedaiError) -> JSONResponse:
        err = medai_error(exc)
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code,
                                                                                         "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
