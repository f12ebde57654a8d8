"""The run folder contract: one place that knows a training run's files and states.

``results/runs/<run_id>/`` holds

- ``config.yaml``: the experiment config the run was created with (written once, by :func:`new_run`);
- ``status.json``: ``state`` (one of :data:`STATES`), pid, heartbeat, step, epoch, ETA and, at the end,
  the summary or the error; readable by a UI in another process;
- ``progress.jsonl``: one JSON object per logged step and per epoch;
- ``cancel.request``: present when someone asked the run to stop (the trainer ends its step, saves,
  and reports ``cancelled``);
- ``best.safetensors`` (weights + model card), ``last.pt`` (resume state), ``eval.json``,
  ``predictions*.csv``, ``train.log`` and ``process.log`` (a job's stdout and stderr);
- ``epochs/epoch-NNN.safetensors``: every epoch's weights, N from 1, with ``train.keep_epochs`` (what
  ``medai ship --epoch N`` ships instead of the best).

The trainer writes the status through :class:`~medai.training.callbacks.StatusFile`; the job system
(:mod:`medai.jobs`) writes it only for runs whose process is not (or no longer) there to do it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from medai.atomic import write_json, write_text
from medai.errors import MedaiError, StorageError
from medai.paths import runs_dir

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
STATES = (QUEUED, RUNNING, FINISHED, FAILED, CANCELLED)
ACTIVE_STATES = (QUEUED, RUNNING)
FINAL_STATES = (FINISHED, FAILED, CANCELLED)
RESUMABLE_STATES = (CANCELLED, FAILED)

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
PROGRESS_FILE = "progress.jsonl"
CANCEL_FILE = "cancel.request"
BEST_WEIGHTS = "best.safetensors"
RESUME_STATE = "last.pt"
TRAIN_LOG = "train.log"
PROCESS_LOG = "process.log"
EPOCH_WEIGHTS_DIR = "epochs"


def epoch_weights(run_dir: Path, epoch: int) -> Path:
    """Where ``train.keep_epochs`` keeps the weights after ``epoch`` (counted from 1, as the Train page does)."""
    return Path(run_dir) / EPOCH_WEIGHTS_DIR / f"epoch-{epoch:03d}.safetensors"


def kept_epochs(run_dir: Path) -> list[int]:
    """The epochs (from 1) whose weights the run kept with ``train.keep_epochs``."""
    files = (Path(run_dir) / EPOCH_WEIGHTS_DIR).glob("epoch-*.safetensors")
    return sorted(int(p.stem.removeprefix("epoch-")) for p in files)


def new_run(cfg: Any) -> Path:
    """Create ``<runs>/<name>-<stamp>-<hex>/`` with the config in it and the run ``queued``."""
    from medai.config import dump_config

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    try:
        path.mkdir(parents=True)
        write_text(path / CONFIG_FILE, dump_config(cfg))
        write_status(path, {"state": QUEUED, "run_id": path.name, "queued_at": time.time()})
    except OSError as exc:
        raise StorageError(f"cannot create the run folder {path}: {exc.strerror or exc}; the results folder "
                           f"{runs_dir()} must be writable by this user (is the disk full or read-only?)") from None
    return path


def find_run(run: str | os.PathLike) -> Path:
    """A run folder from its id or path."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        run_dir = runs_dir() / str(run)
    if not (run_dir / CONFIG_FILE).is_file():
        raise MedaiError(f"no run folder with a {CONFIG_FILE} at {run} (looked in {runs_dir()})")
    return run_dir


def load_run_config(run_dir: Path) -> Any:
    from medai.config import load_config

    return load_config(run_dir / CONFIG_FILE)


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status; {} when the file is missing or torn."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    if status.get("state") not in STATES:
        raise ValueError(f"unknown run state {status.get('state')!r}")
    write_json(run_dir / STATUS_FILE, status)


def state_of(run_dir: Path) -> str | None:
    return read_status(run_dir).get("state")


def is_finished(run_dir: Path) -> bool:
    return state_of(run_dir) == FINISHED and (run_dir / BEST_WEIGHTS).is_file()


def request_cancel(run_dir: Path) -> None:
    (run_dir / CANCEL_FILE).touch()


def cancel_requested(run_dir: Path) -> bool:
    return (run_dir / CANCEL_FILE).exists()


def clear_cancel(run_dir: Path) -> None:
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)


def append_progress(run_dir: Path, record: dict[str, Any]) -> None:
    """One record as one JSON line, flushed at once so readers in other processes see it."""
    with open(run_dir / PROGRESS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def read_progress(run_dir: Path) -> list[dict[str, Any]]:
    """Progress records; a torn last line (process killed mid-write) is ignored."""
    path = run_dir / PROGRESS_FILE
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_progress(run_dir) if r.get("type") == "epoch"]


def truncate_progress(run_dir: Path, before_epoch: int) -> None:
    """Keep only records of epochs before ``before_epoch`` (used on resume: no duplicated epoch)."""
    kept = [r for r in read_progress(run_dir) if r.get("epoch", 0) < before_epoch]
    write_text(run_dir / PROGRESS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


def log_tail(run_dir: Path, lines: int = 30) -> str:
    """The last lines of the run's own log and of its process output (tracebacks land there)."""
    parts = []
    for name in (TRAIN_LOG, PROCESS_LOG):
        path = run_dir / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` of this machine runs (an exited child of ours is reaped; a zombie is not)."""
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that has exited (reap the zombie)
            return False
    except ChildProcessError:
        pass  # started by another dashboard process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def storage_failure(exc: BaseException, run_dir: Path) -> StorageError | None:
    """A write failure (full disk, file-size limit, read-only folder, permissions) as a StorageError that
    says how to go on; None for any other exception. safetensors reports I/O errors as its own type."""
    import errno

    codes = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file grew past the size limit",
             errno.EDQUOT: "the disk quota is used up", errno.EROFS: "the folder is on a read-only file system",
             errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there"}
    if isinstance(exc, OSError) and exc.errno in codes:
        why = codes[exc.errno]
    elif type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        why = str(exc).split("I/O error:", 1)[1].strip()
    else:
        return None
    return StorageError(f"cannot write the run's files in {run_dir} ({why}; {exc}). The last completed epoch "
                        f"is kept: free space or fix the folder, then resume with "
                        f"`python -m medai train --resume {run_dir}`")

