"""The one masking function for everything the provider shows: CLI output, the Served Models page and
its JSON API, XCom, and the log lines it relays.

What is masked, wherever it appears in a value (strings inside dicts and lists included):

* credentials in a URL's userinfo, whatever characters the password holds (``scheme://user:***@host``,
  ``scheme://***@host`` for a bare token);
* query parameters that carry credentials (``?token=``, ``&sig=``, ``X-Amz-Signature=``, ...);
* name/value pairs whose name looks secret (``password=...``, ``"api_key": "..."``,
  ``Authorization: Bearer ...``), and dict entries whose key looks secret.

"Looks secret" is Airflow's own rule (a normalised name containing one of its sensitive field names,
plus ``[core] sensitive_var_conn_names``), widened by a few names Airflow's list lacks. Masking more
than needed is the safe error: a value is never shown half-masked.
"""

from __future__ import annotations

import functools
import re
from typing import Any

MASK = "***"

# Airflow's DEFAULT_SENSITIVE_FIELDS (airflow/_shared/secrets_masker), which tests compare with, and
# names that carry credentials in URLs and headers but are missing there.
SENSITIVE_SUBSTRINGS = frozenset(
    {
        "access_key", "access_token", "api_key", "apikey", "auth_header", "authorization", "bearer",
        "connection_string", "dsn", "passphrase", "passwd", "password", "private_key", "proxy",
        "proxy_password", "proxies", "secret", "service_account", "service_key", "token", "keyfile_dict",
        "webhook_url",
        # not in Airflow's list
        "credential", "signature", "cookie", "session_id", "sessionid", "pwd", "client_secret",
    }
)  # fmt: skip
# Short query parameter names that are credentials by convention (Azure SAS ``sig``, Google ``key``,
# OAuth ``code``), too short to be searched for inside longer names.
SENSITIVE_QUERY_NAMES = frozenset({"sig", "key", "code", "auth", "pass", "pw", "jwt", "sas"})

_SCHEME = r"\b[A-Za-z][A-Za-z0-9+.\-]*://"
# A URL runs to the next whitespace, quote or angle bracket: a password may hold anything else.
_URL = re.compile(_SCHEME + r"[^\s\"'<>`]+")
# What follows userinfo: a host (name, IPv4 or [IPv6]), an optional port, then the end or a path.
_HOST_REST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%\-]+)(?::\d*)?(?:[/?#]|$)")
_PORT_THEN_PATH = re.compile(r"\d{1,5}[/?#]")
_QUERY_PAIR = re.compile(r"([?&;])([^=&#\s\"'<>]+)=([^&#\s\"'<>]*)")
# name: a word holding a sensitive name (built in _name_value_pattern); value: quoted, or a scheme word
# and its credential (``Bearer abc``), or a run of characters up to a separator.
_NAME_VALUE = (
    r"(?P<q>[\"']?)(?P<name>[\w.\-]*(?:{names})[\w.\-]*)(?P=q)(?P<sep>\s*[:=]\s*)"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*'|(?:(?i:bearer|basic|token|digest)\s+)?[^\s,;&}\]\)\"']+)"
)
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|digest)\s+[A-Za-z0-9._~+/=\-]{8,}")


@functools.cache
def _configured_names() -> frozenset[str]:
    """``[core] sensitive_var_conn_names``, which Airflow adds to its own list (when Airflow is here)."""
    try:
        from airflow.configuration import conf

        extra = conf.get("core", "sensitive_var_conn_names", fallback="") or ""
    except Exception:  # masking must work where Airflow's configuration cannot load
        return frozenset()
    return frozenset(n.strip().lower() for n in extra.split(",") if n.strip())


def is_secret_name(name: Any) -> bool:
    """Airflow's rule: lower-cased, non-word runs turned into ``_``, holding a sensitive field name."""
    if not isinstance(name, str):
        return False
    normalized = re.sub(r"\W+", "_", name.strip().lower())
    # camelCase names (clientSecret, accessToken) read as their snake_case spelling too
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip()).lower()
    snake = re.sub(r"\W+", "_", snake)
    names = SENSITIVE_SUBSTRINGS | _configured_names()
    return any(s in normalized or s in snake for s in names)


def _is_secret_query_name(name: str) -> bool:
    from urllib.parse import unquote

    name = unquote(name)
    return name.lower() in SENSITIVE_QUERY_NAMES or is_secret_name(name)


def _mask_userinfo(url: str) -> str:
    scheme_end = url.index("://") + 3
    rest = url[scheme_end:]
    # The userinfo ends at the last "@" that a host follows: a password may hold "@", "/", "?" or "#".
    at = -1
    for i in range(len(rest) - 1, -1, -1):
        if rest[i] == "@" and _HOST_REST.match(rest, i + 1):
            at = i
            break
    if at <= 0:
        return url
    userinfo = rest[:at]
    user, colon, password = userinfo.partition(":")
    # A bare user name holds no "/", "?" or "#" and "host:8080/..." is a port, not a password: such an
    # "@" belongs to the path or query (``/p?email=a@b.com``) and nothing is masked.
    if any(c in user for c in "/?#") or (not colon and any(c in userinfo for c in "/?#")):
        return url
    if colon and _PORT_THEN_PATH.match(password):
        return url
    shown = f"{user}:{MASK}" if colon and user else MASK
    return url[:scheme_end] + shown + rest[at:]


def _mask_query(text: str) -> str:
    def pair(match: re.Match[str]) -> str:
        sep, name, value = match.groups()
        return f"{sep}{name}={MASK}" if value and _is_secret_query_name(name) else match.group(0)

    return _QUERY_PAIR.sub(pair, text)


@functools.cache
def _name_value_pattern() -> re.Pattern[str]:
    """name=value / name: value where the name holds a sensitive name: found by the regex itself, so
    that a harmless pair (``failed: password=...``) never swallows the secret one after it."""
    names = sorted(SENSITIVE_SUBSTRINGS | _configured_names(), key=len, reverse=True)
    # "api_key" also spelled api-key, api.key, apiKey, APIKEY
    alternatives = "|".join(re.escape(n).replace("_", r"[\W_]?") for n in names)
    return re.compile(_NAME_VALUE.replace("{names}", alternatives), re.IGNORECASE)


def _mask_pairs(text: str) -> str:
    def pair(match: re.Match[str]) -> str:
        value = match.group("value")
        quote = value[0] if value[:1] in ("'", '"') else ""
        return f"{match.group('q')}{match.group('name')}{match.group('q')}{match.group('sep')}{quote}{MASK}{quote}"

    return _name_value_pattern().sub(pair, text)


def mask_text(text: str) -> str:
    """``text`` with every credential this module recognises replaced by ``***``."""
    if not text:
        return text
    text = _URL.sub(lambda m: _mask_query(_mask_userinfo(m.group(0))), text)
    text = _mask_query(text)  # query strings outside a full URL (a path with ?sig=...)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _mask_pairs(text)


def mask(value: Any, _depth: int = 0) -> Any:
    """``value`` as it may be shown: strings masked, dict entries with secret-looking keys hidden,
    lists, tuples and nested dicts walked (to a depth that no record reaches)."""
    if _depth > 20:
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {
            k: (MASK if is_secret_name(k) and v not in (None, "") else mask(v, _depth + 1)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(mask(v, _depth + 1) for v in value)
    return value
