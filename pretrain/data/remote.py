"""Reading shards over HTTP(S), with what a retry needs: a start offset, a read timeout and
errors that say what happened.

``open_http(url, offset)`` asks for ``bytes=offset-`` (a ``Range`` request); a server that
ignores ranges and sends the whole file (``200`` instead of ``206``, as ``python -m http.server``
does) is read past the first ``offset`` bytes instead, so a retry continues at the same byte
either way. Every connect and every read waits at most ``timeout_s`` seconds.

Failures are :class:`RemoteError` with a ``reason`` for the lost-sample counts:
``missing_shard`` (404 / 410: the name is wrong), ``unreachable`` (refused, reset, timed out,
DNS, 5xx / 429, a body cut before the length the server announced: the storage is down or busy,
worth retrying) and ``truncated_shard`` (the bytes that did arrive are not a whole tar).
Retries themselves are the reader's business (:func:`pretrain.data.stream.read_shard`).
"""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request

_CHUNK = 1 << 20


class RemoteError(OSError):
    """A remote shard read failed; ``reason`` classifies it (see the module docstring)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.reason != "missing_shard"


def classify(err: BaseException) -> str:
    """The lost-sample reason of an exception raised while opening or reading a URL."""
    if isinstance(err, RemoteError):
        return err.reason
    if isinstance(err, urllib.error.HTTPError):
        return "missing_shard" if err.code in (404, 410) else "unreachable"
    if isinstance(err, http.client.IncompleteRead):  # fewer bytes than announced: the connection was cut
        return "unreachable"
    if isinstance(err, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                        http.client.HTTPException, OSError)):
        return "unreachable"
    return "truncated_shard"


class HttpStream:
    """A read-only binary stream of one HTTP response body (what ``tarfile``'s stream mode reads)."""

    def __init__(self, url: str, response, skip: int):
        self.url, self.response = url, response
        self.left = response.length  # None when the server sent no Content-Length
        if skip:
            self._discard(skip)

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.read(min(n, _CHUNK))
            if not chunk:
                raise RemoteError(f"{self.url}: the body ended {n} bytes before the offset to resume at",
                                  "truncated_shard")
            n -= len(chunk)

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size if size is not None and size >= 0 else None)
        except (OSError, http.client.HTTPException) as err:
            raise RemoteError(f"{self.url}: read failed ({type(err).__name__}: {err})", classify(err)) from err
        if self.left is not None:
            self.left -= len(data)
        if not data and size and self.left:  # the connection closed before Content-Length bytes came
            raise RemoteError(f"{self.url}: the connection closed {self.left} bytes before the end",
                              "unreachable")
        return data

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> HttpStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_http(url: str, offset: int = 0, timeout_s: float = 60.0) -> HttpStream:
    """The body of ``url`` from byte ``offset`` on; :class:`RemoteError` when it cannot be opened."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - the user's shard URL
    except (OSError, http.client.HTTPException) as err:
        detail = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else f"{type(err).__name__}: {err}"
        raise RemoteError(f"{url}: {detail}", classify(err)) from err
    ranged = offset and response.status == 206
    return HttpStream(url, response, 0 if ranged or not offset else offset)
