"""Exceptions raised by the etcd v2 client.

etcd answers a failed keys-API request with a JSON body such as
``{"errorCode": 100, "message": "Key not found", "cause": "/foo", "index": 3}``.
Each common ``errorCode`` gets its own `EtcdError` subclass so callers can write
``except KeyNotFoundError``; any other code maps to `EtcdError` itself.
"""

from __future__ import annotations

import json
from typing import Any


class EtcdError(Exception):
    """An error answered by etcd (or an HTTP error without etcd's JSON body).

    ``error_code`` is etcd's ``errorCode`` (None when the body was not an etcd error),
    ``index`` the etcd index at the time of the error, ``status`` the HTTP status.
    """

    code: int | None = None

    def __init__(
        self,
        message: str,
        *,
        error_code: int | None = None,
        cause: str | None = None,
        index: int | None = None,
        status: int | None = None,
    ) -> None:
        self.error_code = self.code if error_code is None else error_code
        self.message = message
        self.cause = cause
        self.index = index
        self.status = status
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.cause:
            parts.append(f"({self.cause})")
        if self.error_code is not None:
            parts.append(f"[errorCode {self.error_code}]")
        if self.index is not None:
            parts.append(f"[index {self.index}]")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(error_code={self.error_code!r}, message={self.message!r}, "
            f"cause={self.cause!r}, index={self.index!r})"
        )


class KeyNotFoundError(EtcdError):
    """100: the key (or a directory on its path) does not exist."""

    code = 100


class TestFailedError(EtcdError):
    """101: a compare-and-swap / compare-and-delete condition did not hold."""

    code = 101
    # pytest would otherwise try to collect this class when a test module imports it.
    __test__ = False


class NotFileError(EtcdError):
    """102: the operation needs a key but found a directory."""

    code = 102


class NotDirError(EtcdError):
    """104: the operation needs a directory but found a key."""

    code = 104


class NodeExistError(EtcdError):
    """105: the key already exists (create / mkdir / prevExist=false)."""

    code = 105


class RootReadOnlyError(EtcdError):
    """107: the root directory cannot be modified."""

    code = 107


class DirNotEmptyError(EtcdError):
    """108: a directory must be empty for a non-recursive delete."""

    code = 108


class UnauthorizedError(EtcdError):
    """110: the request needs authentication."""

    code = 110


class InvalidRequestError(EtcdError):
    """2xx codes: a malformed request (bad TTL or index, missing value, refresh misuse...)."""


class RaftInternalError(EtcdError):
    """300: etcd failed internally to commit the request."""

    code = 300


class LeaderElectionError(EtcdError):
    """301: the cluster is electing a leader; retry later."""

    code = 301


class WatcherClearedError(EtcdError):
    """400: the watcher was cleared by an etcd recovery; watch again."""

    code = 400


class EventIndexClearedError(EtcdError):
    """401: the requested watch index is older than etcd's event history (1000 events)."""

    code = 401


class EtcdUnavailable(ConnectionError):
    """No endpoint answered; ``errors`` lists (endpoint, exception) for each attempt."""

    def __init__(self, message: str, errors: list[tuple[str, BaseException]] | None = None):
        self.errors = list(errors or [])
        detail = "; ".join(f"{ep}: {type(e).__name__}: {e}" for ep, e in self.errors)
        super().__init__(f"{message}: {detail}" if detail else message)


class EtcdInterrupted(EtcdUnavailable):
    """A non-retryable request was sent but its connection failed before the answer.

    etcd may or may not have applied it, so it was not retried on another endpoint.
    """


_BY_CODE: dict[int, type[EtcdError]] = {
    cls.code: cls
    for cls in (
        KeyNotFoundError,
        TestFailedError,
        NotFileError,
        NotDirError,
        NodeExistError,
        RootReadOnlyError,
        DirNotEmptyError,
        UnauthorizedError,
        RaftInternalError,
        LeaderElectionError,
        WatcherClearedError,
        EventIndexClearedError,
    )
    if cls.code is not None
}


def error_class(error_code: int) -> type[EtcdError]:
    """The exception class for an etcd ``errorCode``."""
    cls = _BY_CODE.get(error_code)
    if cls is not None:
        return cls
    if 200 <= error_code < 300:
        return InvalidRequestError
    return EtcdError


def error_from_response(status: int, body: bytes) -> EtcdError:
    """Build the exception for an HTTP error response from etcd."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("errorCode"), int):
        code = data["errorCode"]
        index = data.get("index")
        return error_class(code)(
            str(data.get("message", "")),
            error_code=code,
            cause=data.get("cause"),
            index=index if isinstance(index, int) else None,
            status=status,
        )
    # Non-keys endpoints answer {"message": "..."} (e.g. stats/leader on a follower)
    # or plain text (e.g. Go's "404 page not found").
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        message = data["message"]
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return EtcdError(message, status=status)
