"""Prometheus metrics (one registry per broker), served on BROKER_METRICS_LISTEN.

Labels are bounded: method, status code, outcome, connection status, background loop, and (with
several STS regions) a configured region and its breaker's state. Never a tenant, a run, an ARN
or a key: those belong in logs and audit events.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue


class CacheCounts(Protocol):
    """What a scrape reads of the credential cache (cache.CacheStats)."""

    hits: int
    misses: int
    stale_served: int
    evictions: int
    background_renewals: int
    background_failures: int


class CacheView(Sized, Protocol):
    """What a scrape reads of the credential cache (cache.CredentialCache): its entries, and
    its counts. A protocol, so this module imports neither the cache nor the streams: they
    (through aws) import it."""

    @property
    def stats(self) -> CacheCounts: ...


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The background loops that log a failure, count it (`background_error`) and carry on.
Loop = Literal["listener", "change", "recheck", "reverify"]
BACKGROUND_LOOPS: dict[Loop, str] = {
    "listener": "the store's change-notification connection lost or not made",
    "change": "a re-check after a notification or a gap in them",
    "recheck": "the periodic re-check",
    "reverify": "the periodic re-verification of roles",
}


# Every value a labelled counter's label takes, with what it counts; the HELP text names them
# all (tests/test_observability.py checks a scrape against it) and each shows from the start.
STS_OUTCOMES = {
    "ok": "credentials issued",
    "denied": "the customer's role refused, as VerifyRole's two probes expect",
    "transient": "throttled, 5xx, unreachable, or the broker's own identity refused",
    "abandoned": "every caller gave up, by deadline or cancel, before STS answered",
}
RENEWAL_OUTCOMES = {
    "ok": "new credentials pushed, STS's transient failures retried first and counted in "
    "broker_sts_calls",
}
# An STS region's circuit breaker (aws.Region), with two or more BROKER_STS_REGIONS.
BREAKER_STATES = {
    "closed": "in use",
    "open": "failed transiently: tried last until BROKER_STS_REGION_COOLDOWN has passed",
    "half_open": "cooled down: the next call tries it, and an answer closes it",
}


def by_label(label: str, values: Iterable[tuple[str, str]]) -> str:
    """`by LABEL: value (what); …`, the form of every HELP text naming a label's values."""
    return f"by {label}: " + "; ".join(f"{value} ({what})" for value, what in values)


class Metrics:
    """What the broker counts. Components record through the attributes; the cache, the
    streams and the connection counts are read at scrape time (`watch`)."""

    def __init__(self) -> None:
        # No `*_created` series (one more per counter and histogram child): nothing here reads
        # them, and rate() and increase() see a restart's reset without them. Process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "broker_rpcs",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "broker_rpc_duration_seconds",
            "Time to answer a unary RPC (streams: to end).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sts_calls = Counter(
            "broker_sts_calls",
            f"sts:AssumeRole calls, {by_label('outcome', STS_OUTCOMES.items())}.",
            ["outcome"],
            registry=self.registry,
        )
        self.sts_seconds = Histogram(
            "broker_sts_duration_seconds",
            "Time sts:AssumeRole took, retries included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Per STS region: shown only with two regions or more (`sts_regions`), where they say
        # more than broker_sts_calls. The region label takes the configured regions alone.
        self.sts_region_calls = Counter(
            "broker_sts_region_calls",
            "sts:AssumeRole tries, one for each region a call went to (region: one of "
            "BROKER_STS_REGIONS; botocore's retries within a region make one try), "
            f"{by_label('outcome', STS_OUTCOMES.items())}.",
            ["region", "outcome"],
            registry=None,
        )
        self.sts_failovers = Counter(
            "broker_sts_failovers",
            "sts:AssumeRole calls that failed transiently in a region and moved on to the next "
            "(region: the one left).",
            ["region"],
            registry=None,
        )
        self.renewals = Counter(
            "broker_stream_renewals",
            "Renewals sent on WatchCredentials streams, "
            f"{by_label('outcome', RENEWAL_OUTCOMES.items())}.",
            ["outcome"],
            registry=self.registry,
        )
        self.background_errors = Counter(
            "broker_background_errors",
            "Failures the background loops logged and carried on from, "
            f"{by_label('loop', BACKGROUND_LOOPS.items())}.",
            ["loop"],
            registry=self.registry,
        )
        for loop in BACKGROUND_LOOPS:  # every loop shows, at 0 until it fails
            self.background_errors.labels(loop)
        for outcome in STS_OUTCOMES:
            self.sts_calls.labels(outcome)
        for outcome in RENEWAL_OUTCOMES:
            self.renewals.labels(outcome)

        # How each (method, code) is counted, made once (`labels` is not free): `_tally`.
        self._rpc_children: dict[tuple[str, str], Callable[[float], None]] = {}

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        """Count one RPC and its latency."""
        tally = self._rpc_children.get((method, code))
        if tally is None:
            tally = _tally(self.rpcs.labels(method, code), self.rpc_seconds.labels(method))
            self._rpc_children[(method, code)] = tally
        tally(seconds)

    def sts_regions(self, regions: Sequence[str], states: Callable[[], Mapping[str, str]]) -> None:
        """Show the per-region STS counters for `regions` (fixed at start-up: a bounded label),
        each value at 0 from the start, and each region's breaker, read from `states` (region
        → one of BREAKER_STATES) at every scrape."""
        self.registry.register(self.sts_region_calls)
        self.registry.register(self.sts_failovers)
        for region in regions:
            self.sts_failovers.labels(region)
            for outcome in STS_OUTCOMES:
                self.sts_region_calls.labels(region, outcome)
        self.registry.register(_Breakers(states))

    def background_error(self, loop: Loop) -> None:
        """Count one failure of a background loop (one of BACKGROUND_LOOPS)."""
        self.background_errors.labels(loop).inc()

    def watch(
        self,
        cache: CacheView,
        hub: Sized,
        max_entries: int,
        count_connections: Callable[[], dict[str, int]],
    ) -> None:
        """Read the cache, the streams (their number) and the store's counts at every
        scrape."""
        self.registry.register(_Live(cache, hub, max_entries, count_connections))


def _tally(count: Any, latency: Any) -> Callable[[float], None]:
    """What counts one RPC in `count` (a Counter's child) and `latency` (a Histogram's): on
    every call, so it adds to their values as `inc` and `observe` would (the bucket found by
    bisection) without their three locks and checks, which took a sixth of what a cached
    IssueCredentials spends above a bare handler (docs/benchmarks.md). Only the event loop
    counts RPCs; a scrape still reads under the locks. Where the values are not
    prometheus_client's in-process ones (its multiprocess mode), through `inc` and `observe`."""
    calls, total = count._value, latency._sum
    buckets, bounds = latency._buckets, latency._upper_bounds
    if not all(type(value) is MutexValue for value in (calls, total, *buckets)):

        def observe(seconds: float) -> None:
            count.inc()
            latency.observe(seconds)

        return observe

    def add(seconds: float) -> None:
        calls._value += 1
        total._value += seconds
        buckets[bisect_left(bounds, seconds)]._value += 1

    return add


class _Breakers(Collector):
    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "broker_sts_region_breaker",
            "Each STS region's circuit breaker: 1 for the state it is in, 0 for the others, "
            f"{by_label('state', BREAKER_STATES.items())}.",
            labels=["region", "state"],
        )
        for region, now in self._states().items():
            for state in BREAKER_STATES:
                family.add_metric([region, state], 1 if state == now else 0)
        yield family


class _Live(Collector):
    def __init__(
        self,
        cache: CacheView,
        hub: Sized,
        max_entries: int,
        connections: Callable[[], dict[str, int]],
    ) -> None:
        self._cache, self._hub, self._max = cache, hub, max_entries
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        stats = self._cache.stats
        for name, value, text in (
            ("broker_cache_hits", stats.hits, "IssueCredentials/Watch answers from the cache."),
            ("broker_cache_misses", stats.misses, "Cache lookups that went to STS."),
            ("broker_cache_evictions", stats.evictions, "Entries evicted by the size bound."),
            (
                "broker_cache_stale_served",
                stats.stale_served,
                "Still-valid credentials served because renewal failed transiently.",
            ),
            (
                "broker_cache_background_renewals",
                stats.background_renewals,
                "Renewals started in the background, for a call inside the advisory window "
                "(BROKER_REFRESH_MARGIN) answered from the cache.",
            ),
            (
                "broker_cache_background_failures",
                stats.background_failures,
                "Background renewals that failed (transient: retried after a pause while the "
                "cache serves; refused: the tenant is evicted).",
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "broker_cache_entries", "Runs in the cache.", value=len(self._cache)
        )
        yield GaugeMetricFamily("broker_cache_max_entries", "The cache's bound.", value=self._max)
        yield GaugeMetricFamily(
            "broker_streams_active", "Open WatchCredentials streams.", value=len(self._hub)
        )
        by_status = GaugeMetricFamily(
            "broker_connections",
            "Connections in the store, by status.",
            labels=["status"],
        )
        for status, count in sorted(self._connections().items()):
            by_status.add_metric([status], count)
        yield by_status
