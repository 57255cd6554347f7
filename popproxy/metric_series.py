"""Hot-path metric series as plain numbers, exported through collectors at scrape time.

Why. prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a
``threading.Lock`` per call and check their state first; on the 2-vCPU test
machine that is 1.5-3.5 µs a call, and a POP3 session makes about 46 of them (a
relayed RETR about 6): 3-5% of popproxy's CPU (issue 15). Here a series is one
object holding plain numbers; counting is ``series.value += n`` (a histogram: one
``bisect`` and two adds), and a :class:`CounterFamily`, :class:`GaugeFamily` or
:class:`HistogramFamily` registered on the same ``CollectorRegistry`` turns the
numbers into a metric family when the registry is collected.

Why not accumulate per session and flush at its end: a scrape during a long session
(a large RETR, a client idling in TRANSACTION) would miss its bytes and commands
until it ended, so the values at scrape time would change, and the flush itself
would be one more step on every exit path. Plain numbers read at scrape time keep
every value exact and current.

What a scrape shows is what prometheus_client showed: the same names, help texts,
types and label names; series in the order they were created (the order their
``labels`` call first named them); counters as ``name_total``; histograms as
cumulative ``le`` buckets (the bound written as prometheus_client writes it, a
value counted in the first bucket whose bound is >= it, NaN in none), then
``_count`` (the ``+Inf`` bucket) and ``_sum`` (the observations added in order,
as floats). No ``_created`` series: popproxy turns them off for prometheus_client's
own metrics too (``Metrics.__init__``). Counts are Python ints, exact at any size;
the exposition writes them as floats, as prometheus_client does (the same numbers
below 2**53, where prometheus_client's float totals start to round).

Tables of series by Enum members (a command's verb and result, a session's end) are
keyed by the members' ``id``: hashing an Enum member runs Python code
(``Enum.__hash__``), as slow as the rest of the count, hashing an int does not. A
member lives as long as its Enum, so no other object has its id, and a lookup by the
id of anything else finds nothing (the caller then says what was wrong with it).

Threads. Every series here is written by one thread only: the trio thread. Its
writers are the session (``popproxy.session``), the upstream connection
(``popproxy.maildrop.connection``), the listeners (``popproxy.serve``) and the state
store's timing (``popproxy.state``, after its worker thread returned); none runs in
``trio.to_thread`` (a worker's ``x += 1`` could interleave with the trio thread's and
lose a count, so a metric counted from a worker must stay on prometheus_client's
locked series, in ``popproxy.metrics``). The exporter collects in the trio thread
too, between two steps of the event loop, so a scrape sees every series at one
instant. A collector called from another thread still sees consistent numbers: a
counter only grows, and a histogram's buckets are copied at once and its ``_count``
is their total, so its ``+Inf`` bucket and ``_count`` always agree (only ``_sum``
may lead them by an observation being made).
"""

from __future__ import annotations

import abc
import itertools
import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

_INF = math.inf


def refuse_negative(amount: int) -> None:
    """A counter never goes down: a ValueError, as from prometheus_client's ``Counter.inc``."""
    if amount < 0:
        raise ValueError(f"a counter cannot be incremented by a negative amount: {amount}")


class CounterSeries:
    """One counter series: add to ``value`` (never a negative amount), in the trio thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class GaugeSeries:
    """One gauge series: add to or subtract from ``value``, in the trio thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class HistogramSeries:
    """One histogram series: call :meth:`observe`, in the trio thread.

    ``bucket_counts[i]`` counts the observations that fell in bucket ``i`` alone (the
    last one is ``+Inf``); the exposition makes them cumulative.
    """

    __slots__ = ("_bounds", "bucket_counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.bucket_counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is >= it (NaN in none)."""
        self.sum += amount
        if amount <= _INF:  # False only for NaN, which no bound is >= of
            self.bucket_counts[bisect_left(self._bounds, amount)] += 1


_S = TypeVar("_S", CounterSeries, GaugeSeries, HistogramSeries)
_M = TypeVar("_M", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class _Family(abc.ABC, Generic[_S, _M]):
    """One metric family: its series by label values, created on first use."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label_names: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(label_names)
        self._series: dict[tuple[str, ...], _S] = {}
        registry.register(self)

    def labels(self, *label_values: str) -> _S:
        """The series of these label values (one per label name), created at 0 if new."""
        series = self._series.get(label_values)
        if series is None:
            if len(label_values) != len(self.label_names):
                raise ValueError(f"{self.name}: expected label values for {self.label_names}")
            for label_value in label_values:
                if not isinstance(label_value, str):
                    raise TypeError(f"{self.name}: a label value must be a str")
            series = self._series[label_values] = self._new_series()
        return series

    def describe(self) -> Iterator[Metric]:
        """The family without samples: the registry reserves its names with it."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """The family with every series' current values (called at each scrape)."""
        family = self._family()
        for label_values, series in list(self._series.items()):
            self._add(family, label_values, series)
        yield family

    @abc.abstractmethod
    def _new_series(self) -> _S:
        """A series at 0."""

    @abc.abstractmethod
    def _family(self) -> _M:
        """The metric family, without samples."""

    @abc.abstractmethod
    def _add(self, family: _M, label_values: tuple[str, ...], series: _S) -> None:
        """Add the samples of ``series`` to ``family``."""


class CounterFamily(_Family[CounterSeries, CounterMetricFamily]):
    """A counter family (``name`` ends in ``_total``) of :class:`CounterSeries`."""

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.label_names)

    def _add(
        self, family: CounterMetricFamily, label_values: tuple[str, ...], series: CounterSeries
    ) -> None:
        family.add_metric(label_values, series.value)


class GaugeFamily(_Family[GaugeSeries, GaugeMetricFamily]):
    """A gauge family of :class:`GaugeSeries`."""

    def _new_series(self) -> GaugeSeries:
        return GaugeSeries()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.label_names)

    def _add(
        self, family: GaugeMetricFamily, label_values: tuple[str, ...], series: GaugeSeries
    ) -> None:
        family.add_metric(label_values, series.value)


class HistogramFamily(_Family[HistogramSeries, HistogramMetricFamily]):
    """A histogram family of :class:`HistogramSeries` with the upper bounds ``buckets``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label_names: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        # prometheus_client leaves _count and _sum out of a family whose first bound is < 0.
        increasing = list(bounds) == sorted(set(bounds))
        if not bounds or not increasing or bounds[0] < 0 or not math.isfinite(bounds[-1]):
            raise ValueError(f"{name}: buckets must be finite, >= 0, distinct and increasing")
        self._bounds = bounds
        self._le = (*(floatToGoString(bound) for bound in bounds), "+Inf")
        super().__init__(name, documentation, label_names, registry=registry)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)

    def _add(
        self, family: HistogramMetricFamily, label_values: tuple[str, ...], series: HistogramSeries
    ) -> None:
        cumulative = itertools.accumulate(list(series.bucket_counts))
        family.add_metric(label_values, list(zip(self._le, cumulative, strict=True)), series.sum)
