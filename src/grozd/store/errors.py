"""etcd v2 error codes with etcd 3.4's messages and HTTP statuses.

A failed keys request is answered with ``{"errorCode": 100, "message": "Key not found",
"cause": "/foo", "index": 7}``. `EtcdError` is that answer as a value: the state machine
returns it from `Store.apply` (a failed compare-and-swap is still a committed entry) and
raises it from local reads, since it is also an exception.
"""

from __future__ import annotations

from grozd.store.gojson import go_string

KEY_NOT_FOUND = 100
TEST_FAILED = 101
NOT_FILE = 102
NO_MORE_PEER = 103
NOT_DIR = 104
NODE_EXIST = 105
KEY_IS_PRESERVED = 106
ROOT_READ_ONLY = 107
DIR_NOT_EMPTY = 108
EXISTING_PEER_ADDR = 109
UNAUTHORIZED = 110

VALUE_REQUIRED = 200
PREV_VALUE_REQUIRED = 201
TTL_NAN = 202
INDEX_NAN = 203
VALUE_OR_TTL_REQUIRED = 204
TIMEOUT_NAN = 205
NAME_REQUIRED = 206
INDEX_OR_VALUE_REQUIRED = 207
INDEX_VALUE_MUTEX = 208
INVALID_FIELD = 209
INVALID_FORM = 210
REFRESH_VALUE = 211
REFRESH_TTL_REQUIRED = 212

RAFT_INTERNAL = 300
LEADER_ELECT = 301

WATCHER_CLEARED = 400
EVENT_INDEX_CLEARED = 401

# The texts are etcd 3.4's, byte for byte: clients and scripts match on them.
MESSAGES: dict[int, str] = {
    KEY_NOT_FOUND: "Key not found",
    TEST_FAILED: "Compare failed",
    NOT_FILE: "Not a file",
    NO_MORE_PEER: "Reached the max number of peers in the cluster",
    NOT_DIR: "Not a directory",
    NODE_EXIST: "Key already exists",
    KEY_IS_PRESERVED: "The prefix of given key is a keyword in etcd",
    ROOT_READ_ONLY: "Root is read only",
    DIR_NOT_EMPTY: "Directory not empty",
    EXISTING_PEER_ADDR: "Peer address has existed",
    UNAUTHORIZED: "The request requires user authentication",
    VALUE_REQUIRED: "Value is Required in POST form",
    PREV_VALUE_REQUIRED: "PrevValue is Required in POST form",
    TTL_NAN: "The given TTL in POST form is not a number",
    INDEX_NAN: "The given index in POST form is not a number",
    VALUE_OR_TTL_REQUIRED: "Value or TTL is required in POST form",
    TIMEOUT_NAN: "The given timeout in POST form is not a number",
    NAME_REQUIRED: "Name is required in POST form",
    INDEX_OR_VALUE_REQUIRED: "Index or value is required",
    INDEX_VALUE_MUTEX: "Index and value cannot both be specified",
    INVALID_FIELD: "Invalid field",
    INVALID_FORM: "Invalid POST form",
    REFRESH_VALUE: "Value provided on refresh",
    REFRESH_TTL_REQUIRED: "A TTL must be provided on refresh",
    RAFT_INTERNAL: "Raft Internal Error",
    LEADER_ELECT: "During Leader Election",
    WATCHER_CLEARED: "watcher is cleared due to etcd recovery",
    EVENT_INDEX_CLEARED: "The event in requested index is outdated and cleared",
}

# Codes not listed answer 400 Bad Request, as in etcd.
STATUSES: dict[int, int] = {
    KEY_NOT_FOUND: 404,
    TEST_FAILED: 412,
    NOT_FILE: 403,
    NODE_EXIST: 412,
    DIR_NOT_EMPTY: 403,
    UNAUTHORIZED: 401,
    RAFT_INTERNAL: 500,
    LEADER_ELECT: 500,
}


class EtcdError(Exception):
    """One etcd v2 error: ``code`` (errorCode), ``cause`` and the store ``index`` at the time."""

    __slots__ = ("code", "cause", "index")

    def __init__(self, code: int, cause: str = "", index: int = 0) -> None:
        super().__init__(code, cause, index)
        self.code = code
        self.cause = cause
        self.index = index

    @property
    def message(self) -> str:
        """etcd's fixed text for the code."""
        return MESSAGES.get(self.code, "")

    @property
    def status(self) -> int:
        """The HTTP status etcd answers with."""
        return STATUSES.get(self.code, 400)

    def to_json(self) -> bytes:
        """The response body, newline included, as etcd writes it."""
        cause = f',"cause":{go_string(self.cause)}' if self.cause else ""
        return (
            f'{{"errorCode":{self.code},"message":{go_string(self.message)}'
            f'{cause},"index":{self.index}}}\n'
        ).encode()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EtcdError):
            return NotImplemented
        return (self.code, self.cause, self.index) == (other.code, other.cause, other.index)

    def __hash__(self) -> int:
        return hash((self.code, self.cause, self.index))

    def __str__(self) -> str:
        return f"{self.message} ({self.cause}) [errorCode {self.code}, index {self.index}]"

    def __repr__(self) -> str:
        return f"EtcdError(code={self.code}, cause={self.cause!r}, index={self.index})"
