"""training/scenes._prefetch: the rendered streams' background producer keeps order, surfaces errors, stops."""
import threading
import time

import pytest


def _renderers():
    return [t for t in threading.enumerate() if t.name == "scene-stream"]


def test_prefetch_yields_in_order_and_stops_when_closed():
    from videocom_fast.training.scenes import _prefetch

    before = len(_renderers())
    count = iter(range(10**6))
    gen = _prefetch(lambda: next(count), depth=2)
    assert [next(gen) for _ in range(50)] == list(range(50))
    assert len(_renderers()) == before + 1
    gen.close()
    for _ in range(100):                       # the producer sees the stop flag after its current item
        if len(_renderers()) == before:
            break
        time.sleep(0.01)
    assert len(_renderers()) == before


def test_prefetch_raises_the_producers_error_in_the_consumer():
    from videocom_fast.training.scenes import _prefetch

    items = iter([1, 2])

    def make():
        try:
            return next(items)
        except StopIteration:
            raise ValueError("scene 3 is broken") from None

    gen = _prefetch(make)
    assert next(gen) == 1 and next(gen) == 2
    with pytest.raises(ValueError, match="scene 3 is broken"):
        next(gen)
