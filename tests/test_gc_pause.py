"""gc_pause.paused: the cyclic collector off inside the block, as it was after it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from popproxy import gc_pause


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


def test_the_collector_is_off_inside_and_on_after(collector_on: None) -> None:
    with gc_pause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="inside"), gc_pause.paused():
        raise ValueError("inside")
    assert gc.isenabled()


def test_a_collector_already_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with gc_pause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()


def test_nothing_is_collected_inside_and_cycles_are_collected_after(collector_on: None) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    gc.collect()
    with gc_pause.paused():
        before = len(gc.get_objects(generation=0))
        for _ in range(5000):  # many times the allocations that start a collection
            Node()
        assert len(gc.get_objects(generation=0)) >= before + 5000  # none collected yet
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Node)]  # collected after
