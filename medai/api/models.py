"""The servable models of the API process: the catalogue, each checkpoint loaded once."""

from __future__ import annotations

import logging
import threading
import time

from medai.imaging import file_key
from medai.api.errors import ApiError
from medai.catalog import ModelEntry, default_index, list_models
from medai.data.io import DecodeLimits
from medai.inference import Predictor

log = logging.getLogger("medai.api")
CATALOG_TTL_S = 10.0  # newly shipped or trained models appear within this many seconds


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
        key = file_key(entry.path)
        with self._lock:  # one load at a time; later callers get the loaded model
            cached = self._loaded.get(entry.name)
            if cached is None or cached[0] != key:
                log.info("loading model %s from %s", entry.name, entry.path)
                self._loaded[entry.name] = (key, Predictor(entry.path, limits=self.limits))
            return self._loaded[entry.name][1]

    def loaded(self) -> list[str]:
        return sorted(list(self._loaded))  # list() of a dict is atomic; no waiting for a load in progress
