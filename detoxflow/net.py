"""Plain HTTP requests and URL redaction, on the standard library only (no prefect or mlflow imports).

:func:`request` is the one HTTP call of the shell: the team stack's health checks and Prefect admin calls
(detoxflow.team) and ``detoxflow doctor`` go through it. It never raises for an HTTP error status or for a
service that does not answer: the :class:`Response` says which happened. :func:`redact_url` hides a URL's
password before it is printed (doctor, the gate lock's messages).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Response:
    """What a request got. `status` 0: nothing answered (`error` says why); `error` None: a success answer."""

    status: int
    text: str = ""
    error: OSError | None = None

    @property
    def reason(self) -> str:
        """Why nothing answered (the socket error, without urllib's wrapping); "" when something did."""
        return "" if self.status or self.error is None else str(getattr(self.error, "reason", self.error))

    def json(self) -> object:
        """The body as JSON; None for an empty body."""
        return json.loads(self.text) if self.text else None


def request(url: str, method: str = "GET", body: object | None = None, headers: Mapping[str, str] | None = None,
            timeout: float = 3.0) -> Response:
    """Send `body` (as JSON, when given) with exactly `headers`; an HTTP error status is an answer too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the stack's or configured URLs
            return Response(resp.status, resp.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read().decode("utf-8", "replace"), e)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return Response(0, "", e)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answered. Never raises for network errors."""
    r = request(url, timeout=timeout)
    return r.status, r.text


def redact_url(url: str, *, mask_empty_password: bool = False) -> str:
    """The URL with its password shown as ``***``, for printing.

    An empty password (``user:@host``) is left as it is, unless `mask_empty_password` (doctor's report)."""
    parts = urlsplit(url)
    if parts.password is None or (parts.password == "" and not mask_empty_password):
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
