"""Parsing of keys requests and paths: the short ways for common requests give the same
answers as the full parse."""

from __future__ import annotations

import pytest

from grozd.api.forms import clean_url_path
from grozd.api.handlers import KeysRequest

FIELDS = ("method", "key", "value", "dir", "prev_value", "prev_index", "prev_exist", "wait",
          "wait_index", "recursive", "sorted", "quorum", "stream", "ttl", "refresh", "no_value")


def fields(request: KeysRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in FIELDS}


@pytest.mark.parametrize("form", [{}, {"value": ["v"]}, {"value": [""]}, {"value": ["a", "b"]}])
def test_a_request_with_nothing_but_a_value_parses_as_in_full(form) -> None:
    # An unknown parameter sends the same form through the full parse.
    full = KeysRequest("PUT", "/k", {**form, "unknown": ["x"]})
    assert fields(KeysRequest("PUT", "/k", form)) == fields(full)
    assert full.ttl is None and full.prev_exist is None and full.refresh is False


@pytest.mark.parametrize(("path", "cleaned"), [
    ("/v2/keys/a", "/v2/keys/a"),
    ("/v2/keys/", "/v2/keys/"),
    ("/", "/"),
    ("/v2/keys/.hidden", "/v2/keys/.hidden"),
    ("/v2//keys", "/v2/keys"),
    ("/v2/keys/./a", "/v2/keys/a"),
    ("/v2/keys/a/..", "/v2/keys"),
    ("/v2/keys/a/../", "/v2/keys/"),
    ("v2/keys", "/v2/keys"),
    ("", "/"),
])
def test_url_paths_are_cleaned_like_go_serve_mux(path: str, cleaned: str) -> None:
    assert clean_url_path(path) == cleaned
