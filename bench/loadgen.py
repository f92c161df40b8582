"""A keep-alive HTTP load generator that runs in its own process (the fallback for ``wrk``, and the
client of the replace-under-load benchmark, which needs every request's time and outcome).

Each client is a thread with one persistent ``http.client`` connection that POSTs the body in a loop
and only reconnects when the server said ``Connection: close`` or the connection failed. Every
request is recorded as ``[start (epoch s), latency (s), outcome]`` where outcome is ``ok``, ``http-<code>``,
``refused`` (connection refused) or ``error-<ExceptionName>``; a failed request is never retried.

Usage::

    python bench/loadgen.py --url http://127.0.0.1:5200/invocations --body body.json --clients 16 \
        --out results.json [--duration 10]

Without ``--duration`` it runs until SIGTERM or SIGINT. The results file is written at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit


def client(host: str, port: int, path: str, body: bytes, stop: threading.Event, out: list[list]) -> None:
    headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        start, t0 = time.time(), time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("POST", path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            outcome = "ok" if answer.status == 200 else f"http-{answer.status}"
            if answer.will_close:
                conn.close()
                conn = None
        except ConnectionRefusedError:
            outcome = "refused"
        except Exception as exc:
            outcome = f"error-{type(exc).__name__}"
        if outcome not in ("ok",) and conn is not None and not outcome.startswith("http-"):
            conn.close()
            conn = None
        out.append([start, time.perf_counter() - t0, outcome])
        if outcome == "refused":
            time.sleep(0.01)  # nothing listens: do not spin
    if conn is not None:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", type=Path, required=True, help="file holding the JSON request body")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, help="seconds to run (default: until SIGTERM/SIGINT)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    url = urlsplit(args.url)
    body = args.body.read_bytes()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    results: list[list[list]] = [[] for _ in range(args.clients)]
    threads = [
        threading.Thread(target=client, args=(url.hostname, url.port or 80, url.path, body, stop, results[i]))
        for i in range(args.clients)
    ]
    started = time.time()
    for t in threads:
        t.start()
    print("started", flush=True)  # the parent waits for this line
    stop.wait(args.duration)
    stop.set()
    for t in threads:
        t.join()
    records = [r for per_client in results for r in per_client]
    args.out.write_text(json.dumps({"started": started, "ended": time.time(), "requests": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
