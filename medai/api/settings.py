"""The HTTP API's limits, read from the environment (``MEDAI_API_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from medai.paths import env_number


@dataclass(frozen=True)
class ApiSettings:
    max_upload_mb: float = 32  # per image
    max_pixels: int = 50_000_000  # per decoded image (about 7,000 x 7,000)
    max_batch: int = 16  # images per batch request
    rate_per_min: float = 120  # requests per token (a burst of this many, refilled evenly)
    workers: int = 2  # inference threads
    max_queue: int = 32  # inferences waiting or running; more -> 503 with Retry-After
    auth_failures_per_min: float = 20  # failed or missing tokens per client address; more -> 429

    @classmethod
    def from_env(cls) -> ApiSettings:
        d = cls()
        return cls(max_upload_mb=env_number("MEDAI_API_MAX_UPLOAD_MB", d.max_upload_mb),
                   max_pixels=int(env_number("MEDAI_API_MAX_PIXELS", d.max_pixels)),
                   max_batch=int(env_number("MEDAI_API_MAX_BATCH", d.max_batch)),
                   rate_per_min=env_number("MEDAI_API_RATE_PER_MIN", d.rate_per_min),
                   workers=max(1, int(env_number("MEDAI_API_WORKERS", d.workers))),
                   max_queue=max(1, int(env_number("MEDAI_API_MAX_QUEUE", d.max_queue))),
                   auth_failures_per_min=env_number("MEDAI_API_AUTH_FAILURES_PER_MIN", d.auth_failures_per_min))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        """A whole request: a full batch of images plus multipart overhead."""
        return self.max_upload_bytes * self.max_batch + 1024 * 1024
