"""Load test of the HTTP API on loopback: ``python -m medai serve`` in a fresh temporary home, N concurrent
clients (one API token each), a fixed number of requests each; prints p50/p95/max latency, throughput and
errors as Markdown.

    .venv/bin/python benchmarks/api_load.py [--clients 4 8] [--requests 12] [--image PATH] [--model NAME]

Bounded in count and time: every request has a timeout, and the whole run stops the server at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _common import DATA, ROOT, machine, table

from medai.catalog import DEFAULT_MODEL

PASSWORD = "correct horse battery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _medai(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "medai", *args], cwd=ROOT, env=env, input=stdin, text=True,
                          check=True, capture_output=True).stdout.strip()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout} s")


def _client(url: str, token: str, image: Path, requests: int, params: dict[str, str]) -> list[tuple[float, int]]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        data = image.read_bytes()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                status = c.post("/api/analyze", params=params, files={"file": (image.name, data)}).status_code
            except httpx.HTTPError:
                status = 0
            out.append((time.perf_counter() - t0, status))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=12, help="requests per client")
    ap.add_argument("--image", type=Path,
                    default=sorted((DATA / "kermany-pneumonia" / "val" / "PNEUMONIA").glob("*.jpeg"))[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a served model's name (default: the default model)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="medai-api-load-"))
    env = {**os.environ, "MEDAI_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    _medai(env, "users", "add", "loadtest", "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n")
    tokens = [_medai(env, "tokens", "create", "loadtest", "--label", f"client {i}") for i in range(max(args.clients))]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "medai", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        _wait_ready(url, proc)
        workers = httpx.get(f"{url}/health").json()["queue"]["workers"]
        served = httpx.post(f"{url}/api/analyze", params={"explain": "false", "model": args.model}, timeout=120,
                            headers={"Authorization": f"Bearer {tokens[0]}"},
                            files={"file": (args.image.name, args.image.read_bytes())}).json()["model"]["name"]
        if served != args.model:
            raise SystemExit(f"asked for {args.model}, the API served {served}")
        for mode, params in (("predict", {"explain": "false", "model": args.model}),
                             ("predict + Grad-CAM + anatomy", {"model": args.model})):
            _client(url, tokens[0], args.image, 2, params)  # warm-up
            for n in args.clients:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    done = list(pool.map(lambda t: _client(url, t, args.image, args.requests, params), tokens[:n]))
                wall = time.perf_counter() - t0
                lat = sorted(s for client in done for s, _ in client)
                errors = sum(status != 200 for client in done for _, status in client)
                rows.append([mode, n, len(lat), 1000 * statistics.median(lat),
                             1000 * lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], 1000 * lat[-1],
                             len(lat) / wall, errors])
    finally:
        proc.terminate()
        proc.wait(15)
    print(f"## HTTP API under load, loopback ({machine()})\n")
    print(f"`python -m medai serve` with {workers} inference workers (MEDAI_API_WORKERS); each client has its "
          f"own token and sends {args.requests} requests one after another; image {args.image.name} "
          f"(Kermany val, JPEG); model {args.model}. Latency in ms, per request, as the client sees it.\n")
    print(table([[m, n, k, f"{p50:.0f}", f"{p95:.0f}", f"{mx:.0f}", f"{rps:.1f}", e]
                 for m, n, k, p50, p95, mx, rps, e in rows],
                ["mode", "clients", "requests", "p50 ms", "p95 ms", "max ms", "requests/s", "errors"]))


if __name__ == "__main__":
    main()
