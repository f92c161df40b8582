"""The TLS context the provider's HTTP clients share: one per process.

httpx builds a new ``ssl.SSLContext`` for every client and transport it makes, loading certifi's CA
bundle each time: about 30 ms of CPU, more than a request to a local server costs. The provider makes
clients in loops (readiness and health polls, the serving agent's metrics sampling, a client per agent
call), so each is given this one context instead, made once the way httpx makes its default
(``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured). An ``ssl.SSLContext`` serves any number of
connections and threads.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl


@functools.cache
def default_tls() -> ssl.SSLContext:
    """httpx's default verifying context, built on first use and then shared."""
    import httpx

    return httpx.create_ssl_context()
