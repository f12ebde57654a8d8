"""The node's durable work queue, a table in the store (``pacs_queue``): one row per received SOP instance
and model (unique), so the same image with the same model is analysed and sent once.

States: ``queued`` (received, file in the inbox) -> ``analysing`` (leased by a worker; a lease that runs
out, e.g. after ``kill -9``, puts it back in reach) -> ``done`` (results written to the outbox, not yet
delivered; retried with backoff while the destination is unreachable) -> ``sent``. ``skipped`` (not a
chest radiograph the model reads, with the reason) and ``failed`` (unreadable, with the reason) are final.
Retention (``medai pacs prune``) deletes a final item's files after a while; its row stays, with ``path``
NULL and the result's ``outbox`` NULL, so the worklist keeps the history and a pruned item is not re-sent.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from medai.runs import process_alive
from medai.store import Store

QUEUED, ANALYSING, DONE, SENT, SKIPPED, FAILED = "queued", "analysing", "done", "sent", "skipped", "failed"
STATES = (QUEUED, ANALYSING, DONE, SENT, SKIPPED, FAILED)
FINAL = (SENT, SKIPPED, FAILED)  # nothing more will be done with these; ``done`` still waits to be sent
LEASE_S = 300.0  # a worker that has not finished an analysis in this long is presumed dead
BACKOFF_S = (5, 15, 60, 300, 900)  # wait before the n-th retry of a delivery (the last repeats)


def add(store: Store, *, sop_uid: str, study_uid: str, series_uid: str, modality: str, model: str,
        model_sha256: str, path: str | None, state: str, reason: str = "") -> bool:
    """Record a received instance; False when this instance was already received for this model."""
    now = time.time()
    with store.connect() as conn:
        cur = conn.execute(
            "INSERT OR IGNORE INTO pacs_queue (sop_uid, study_uid, series_uid, modality, model, model_sha256, path,"
            " state, reason, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sop_uid, study_uid, series_uid, modality, model, model_sha256, path, state, reason, now, now))
        return cur.rowcount == 1


def claim(store: Store, lease_s: float = LEASE_S) -> dict[str, Any] | None:
    """Lease the oldest queued instance (or one whose worker died) for analysis."""
    now = time.time()
    with store.connect() as conn:
        row = conn.execute(
            "SELECT * FROM pacs_queue WHERE state = ? OR (state = ? AND lease_until < ?) ORDER BY received_at, id"
            " LIMIT 1", (QUEUED, ANALYSING, now)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE pacs_queue SET state = ?, lease_until = ?, lease_owner = ?, updated_at = ? WHERE id = ?",
                     (ANALYSING, now + lease_s, _owner(), now, row["id"]))
        return dict(row)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover(store: Store) -> int:
    """Put back in the queue what a worker of this machine was analysing when it died (``kill -9``, power
    loss), without waiting for its lease to run out. Returns how many."""
    host = socket.gethostname()
    with store.connect() as conn:
        dead = [r["id"] for r in conn.execute("SELECT id, lease_owner FROM pacs_queue WHERE state = ?", (ANALYSING,))
                if r["lease_owner"].rpartition(":")[0] == host and not process_alive(int(r["lease_owner"].rpartition(":")[2] or 0))]
        conn.executemany("UPDATE pacs_queue SET state = ?, lease_until = 0 WHERE id = ?", [(QUEUED, i) for i in dead])
    return len(dead)


def update(store: Store, item_id: int, **fields: Any) -> None:
    fields["updated_at"] = time.time()
    if "result" in fields and not isinstance(fields["result"], (str, type(None))):
        fields["result"] = json.dumps(fields["result"])
    if "findings" in fields and not isinstance(fields["findings"], str):
        fields["findings"] = json.dumps(fields["findings"])
    with store.connect() as conn:
        conn.execute(f"UPDATE pacs_queue SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                     (*fields.values(), item_id))


def due_for_delivery(store: Store) -> list[dict[str, Any]]:
    with store.connect() as conn:
        return [_row(r) for r in conn.execute(
            "SELECT * FROM pacs_queue WHERE state = ? AND next_try <= ? ORDER BY next_try, id", (DONE, time.time()))]


def delivery_failed(store: Store, item: dict[str, Any], reason: str) -> float:
    """Count a failed delivery and schedule the next try; returns the wait in seconds."""
    wait = BACKOFF_S[min(item["attempts"], len(BACKOFF_S) - 1)]
    update(store, item["id"], attempts=item["attempts"] + 1, next_try=time.time() + wait,
           reason=f"destination unreachable, retry in {wait} s: {reason}")
    return wait


def resend(store: Store, study_uid: str) -> int:
    """Deliver a study's results again (they are replaced, not duplicated: same UIDs)."""
    with store.connect() as conn:
        return conn.execute("UPDATE pacs_queue SET state = ?, next_try = 0, attempts = 0, updated_at = ? "
                            "WHERE study_uid = ? AND state = ? AND path IS NOT NULL",
                            (DONE, time.time(), study_uid, SENT)).rowcount


def finished_before(store: Store, cutoff: float) -> list[dict[str, Any]]:
    """Final items last changed before ``cutoff`` that still have files (a received image or results)."""
    with store.connect() as conn:
        return [_row(r) for r in conn.execute(
            f"SELECT * FROM pacs_queue WHERE state IN ({', '.join('?' * len(FINAL))}) AND updated_at < ? "
            "AND (path IS NOT NULL OR json_extract(result, '$.outbox') IS NOT NULL) ORDER BY id", (*FINAL, cutoff))]


def items(store: Store, states: tuple[str, ...] | None = None, since: float | None = None,
          modality: str | None = None, by_priority: bool = False, limit: int = 500) -> list[dict[str, Any]]:
    """The worklist: newest first, or the most urgent first (``by_priority``)."""
    where, args = [], []
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        args += list(states)
    if since is not None:
        where.append("received_at >= ?")
        args.append(since)
    if modality:
        where.append("modality = ?")
        args.append(modality)
    order = "priority DESC, received_at DESC" if by_priority else "received_at DESC"
    sql = (f"SELECT * FROM pacs_queue {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {order}, id DESC"
           f" LIMIT {int(limit)}")
    with store.connect() as conn:
        return [_row(r) for r in conn.execute(sql, args)]


def _row(row: Any) -> dict[str, Any]:
    item = dict(row)
    item["findings"] = json.loads(item["findings"] or "[]")
    item["result"] = json.loads(item["result"]) if item["result"] else None
    return item
