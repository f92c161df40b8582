"""One HTTP client for the tests' own requests (and the Kubernetes emulator's), instead of
``httpx.get`` / ``httpx.post``: those make a new client per call, and every client builds a TLS context
(loading certifi's CA bundle: about 30 ms of CPU, more than a request to a local server costs).

No keep-alive: each request opens its own connection, as ``httpx.get`` / ``httpx.post`` do, so a server
replaced or killed between two requests leaves no stale connection to fail the next one.
"""

from __future__ import annotations

import httpx

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
