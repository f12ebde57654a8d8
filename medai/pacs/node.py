"""The DICOM node (``python -m medai pacs listen``): a C-ECHO and C-STORE SCP that files what it receives
(:func:`medai.pacs.work.receive`), one worker thread that analyses the queue and one that delivers results,
with retries, so that sending one image's results overlaps analysing the next. A malformed or hostile object is
refused with a log line; the node stays up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from medai.inference import Predictor
from medai.pacs import queue, work
from medai.pacs.work import Endpoint
from medai.store import Store

log = logging.getLogger("medai.pacs")
SUCCESS, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xC210, 0xA700
IDLE_S = 0.2


class Node:
    def __init__(self, predictor: Predictor, model_name: str, ae_title: str = "MEDAI", host: str = "127.0.0.1",
                 port: int = 11112, destination: Endpoint | None = None, store: Store | None = None):
        self.predictor, self.model_name = predictor, model_name
        self.ae_title, self.host, self.port = ae_title, host, port
        self.destination = destination or Endpoint()
        self.store = store or Store()
        self._server: Any = None
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    # ---- receiving -----------------------------------------------------------------------------
    def on_store(self, event: Any) -> int:
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a peer's malformed data must never take the node down
            log.warning("refused an object from %s: cannot encode it (%s)", _peer(event), type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            state, reason = work.receive(self.store, raw, self.predictor, self.model_name)
        except OSError as exc:
            log.error("cannot file an object from %s (%s); the sender will retry", _peer(event), exc.strerror or exc)
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - not DICOM, or missing the UIDs it needs to be filed
            log.warning("refused an object from %s: not a readable DICOM instance (%s: %s)", _peer(event),
                        type(exc).__name__, str(exc)[:200])
            return CANNOT_UNDERSTAND
        log.info("received an object from %s: %s%s", _peer(event), state, f" ({reason})" if reason else "")
        return SUCCESS

    def start(self) -> Node:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        recovered = queue.recover(self.store)
        if recovered:
            log.warning("%d image(s) were being analysed when the node stopped; queued again", recovered)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self._workers = [threading.Thread(target=self.run_worker, args=(step,), name=f"medai-pacs-{name}", daemon=True)
                         for name, step in (("analyser", self.analyse_next), ("sender", self.deliver_due))]
        for worker in self._workers:
            worker.start()
        log.info("PACS node %s listening on %s:%s (model %s)", self.ae_title, self.host, self.port, self.model_name)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for worker in self._workers:
            worker.join(timeout=60)

    # ---- working -------------------------------------------------------------------------------
    def analyse_next(self) -> bool:
        """Analyse one queued item; False when there was none."""
        item = queue.claim(self.store)
        if item is not None:
            work.analyse(self.store, item, self.predictor)
        return item is not None

    def deliver_due(self) -> bool:
        """Deliver every analysed item that is due; False when there was none (or no destination)."""
        due = queue.due_for_delivery(self.store) if self.destination.configured else []
        for item in due:
            work.deliver(self.store, item, self.destination)
        return bool(due)

    def step(self) -> bool:
        """Analyse one queued item, then deliver what is due; False when there was nothing to do."""
        analysed = self.analyse_next()
        return self.deliver_due() or analysed

    def run_worker(self, step: Callable[[], bool]) -> None:
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception:  # noqa: BLE001 - logged; the item's lease runs out and it is retried
                log.exception("PACS worker step failed")
                busy = False
            if not busy:
                self._stop.wait(IDLE_S)

    def drain(self, timeout: float = 120.0) -> None:
        """Run the worker in this thread until nothing is queued or due (tests, ``pacs analyze``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.step():
            pass


def _peer(event: Any) -> str:
    try:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title}@{requestor.address}"
    except AttributeError:
        return "?"
