"""The collector policy of a long-running member."""

from __future__ import annotations

import gc

from grozd import gcpolicy


def test_install_freezes_what_lives_and_refreezes_after_full_collections() -> None:
    threshold = gc.get_threshold()
    try:
        gcpolicy.install()
        gcpolicy.install()  # idempotent
        assert gc.callbacks.count(gcpolicy._after_collection) == 1
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        keep = [[] for _ in range(1000)]  # tracked objects that live on
        gc.collect()  # a full collection: survivors join the permanent generation
        assert gc.get_freeze_count() >= frozen + len(keep)
    finally:
        gc.callbacks.remove(gcpolicy._after_collection)
        gc.unfreeze()
        gc.set_threshold(*threshold)
