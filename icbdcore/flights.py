"""Single-flight: one task per key does the work, however many callers ask.

A flight runs in a task of its owner's nursery, not in the task of the caller
that started it, so a caller that gives up (its own timeout, a cancelled
read) cancels neither the work nor the other callers waiting on it. A flight
is *answered* when its value (or its error) is known, and *finished* when its
task ends: work may go on after the answer (a block store keeps the block
after handing it to the readers), and the key stays taken until then, so
nobody starts the same work twice. When the task ends the key is free again,
so the next caller after a failure tries afresh. Several keys may share one
task (`start_group`): one request that brings several blocks.

Used by the cache's Fetcher (one upstream request per cold block) and by a
mount's memory cache and manifest loads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import trio

from .source import Unavailable

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Flight(Generic[T]):
    __slots__ = ("answered", "finished", "value", "error")

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.finished = trio.Event()
        self.value: T | None = None
        self.error: Unavailable | None = None

    def answer(self, value: T | None) -> None:
        """Hand `value` to the waiting callers; the work may go on."""
        if not self.answered.is_set():
            self.value = value
            self.answered.set()

    def fail(self, error: Unavailable) -> None:
        if not self.answered.is_set():
            self.error = error
            self.answered.set()

    def result(self) -> T:
        """The value; raises the flight's error, or Unavailable if it ended with none."""
        if self.error is not None:
            raise self.error
        if self.value is None:
            raise Unavailable("the fetch ended without an answer")
        return self.value


Work = Callable[[Flight[T]], Awaitable[None]]
GroupWork = Callable[[dict[K, Flight[T]]], Awaitable[None]]


class Flights(Generic[K, T]):
    """Flights by key, each a task of `nursery`, each bounded by `limit` seconds (None: unbounded)."""

    def __init__(self, nursery: trio.Nursery | None = None, limit: float | None = None):
        self._nursery = nursery
        self._limit = limit
        self._flights: dict[K, Flight[T]] = {}

    def attach(self, nursery: trio.Nursery) -> None:
        """Run flights in `nursery` (for owners whose nursery opens after they are built)."""
        self._nursery = nursery

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: K) -> Flight[T] | None:
        return self._flights.get(key)

    def start(self, key: K, work: Work[T]) -> tuple[Flight[T], bool]:
        """The flight for `key` (running `work(flight)` if there was none), and
        whether this call started it."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        if self._nursery is None:
            raise RuntimeError("flights started before their owner's nursery is open")
        flight = self._flights[key] = Flight()
        self._nursery.start_soon(self._run, key, flight, work)
        return flight, True

    def fetch(self, key: K, fetch: Callable[[], Awaitable[T]]) -> tuple[Flight[T], bool]:
        """start() for work that is one call whose result is the answer."""

        async def work(flight: Flight[T]) -> None:
            flight.answer(await fetch())

        return self.start(key, work)

    def start_group(self, keys: Iterable[K], work: GroupWork[K, T]) -> dict[K, Flight[T]]:
        """The flights for `keys`: those already in flight are joined; for
        the others, one task runs `work(flights)`, which answers each of them
        (one request for several blocks). A flight it leaves unanswered fails
        when it ends, as a single flight's does."""
        flights: dict[K, Flight[T]] = {}
        started: dict[K, Flight[T]] = {}
        for key in dict.fromkeys(keys):
            flight = self._flights.get(key)
            if flight is None:
                if self._nursery is None:
                    raise RuntimeError("flights started before their owner's nursery is open")
                flight = self._flights[key] = started[key] = Flight()
            flights[key] = flight
        if started:
            self._nursery.start_soon(self._run_group, started, work)
        return flights

    async def get_or_fetch(self, key: K, fetch: Callable[[], Awaitable[T]]) -> T:
        flight, _ = self.fetch(key, fetch)
        await flight.answered.wait()
        return flight.result()

    async def _run_group(self, flights: dict[K, Flight[T]], work: GroupWork[K, T]) -> None:
        try:
            if self._limit is None:
                await work(flights)
            else:
                with trio.fail_after(self._limit):
                    await work(flights)
        except trio.TooSlowError:
            self._fail_all(flights, Unavailable(f"no answer within {self._limit:g} s"))
        except Unavailable as error:
            self._fail_all(flights, error)
        except Exception as error:  # a bug must not strand the callers waiting on it
            log.exception("flights %s... failed", next(iter(flights)))
            self._fail_all(flights, Unavailable(f"{type(error).__name__}: {error}"))
        finally:
            self._fail_all(flights, Unavailable("the fetch ended without an answer"))
            for key, flight in flights.items():
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.finished.set()

    @staticmethod
    def _fail_all(flights: dict[K, Flight[T]], error: Unavailable) -> None:
        for flight in flights.values():
            flight.fail(error)

    async def _run(self, key: K, flight: Flight[T], work: Work[T]) -> None:
        try:
            if self._limit is None:
                await work(flight)
            else:
                with trio.fail_after(self._limit):
                    await work(flight)
        except trio.TooSlowError:
            flight.fail(Unavailable(f"no answer within {self._limit:g} s"))
        except Unavailable as error:
            flight.fail(error)
        except Exception as error:  # a bug must not strand the callers waiting on it
            log.exception("flight %s failed", key)
            flight.fail(Unavailable(f"{type(error).__name__}: {error}"))
        finally:
            # Cancelled: the owner is closing.
            flight.fail(Unavailable("the fetch was cancelled: shutting down"))
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.finished.set()
