"""Retries and deadlines of one client call, shared by the sync and async clients.

`CallBudget` holds the decisions (how long an attempt may take, whether and how long to wait before the
next); `call_with_retries` and `call_with_retries_async` are the two loops around it, one sleeping with
`time.sleep`, the other with `asyncio.sleep`.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.client_errors import DetectorError, deadline_error

T = TypeVar("T")


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen: attempt `attempt` failed with `error`; the next starts in `delay_s`."""

    attempt: int
    delay_s: float
    error: DetectorError


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed call again. Only `Unavailable` errors are retried (overload, not serving, no
    connection), at most `max_attempts` attempts in all, and never past the call's deadline.

    The wait: the server's `Retry-After` when it sent one (never less; up to 20 % more, so that clients
    turned away together do not all come back in the same instant), else exponential backoff from
    `backoff_s`, doubling up to `max_backoff_s`, with "equal jitter" (a uniform draw from the upper half).
    """

    max_attempts: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    on_retry: Callable[[RetryEvent], None] | None = None  # e.g. to log or count retries

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after * random.uniform(1.0, 1.2)
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


class CallBudget:
    """The attempts and the time left of one call."""

    def __init__(self, policy: RetryPolicy, timeout: float, protocol: str) -> None:
        if not timeout > 0:
            raise ValueError(f"the call's timeout must be positive, got {timeout}")
        self.policy, self.protocol = policy, protocol
        self.deadline = time.monotonic() + timeout
        self.attempts = 0

    def start_attempt(self) -> float:
        """Seconds the next attempt may take (what is left of the deadline)."""
        self.attempts += 1
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise deadline_error(self.protocol, self.attempts)
        return left

    def retry_delay(self, err: DetectorError) -> float | None:
        """Seconds to wait before trying again, or None to give up and raise `err`."""
        err.attempts = self.attempts
        if not err.retryable or self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.delay(self.attempts, err.retry_after)
        if time.monotonic() + delay >= self.deadline:  # the wait alone would use up the deadline
            return None
        if self.policy.on_retry is not None:
            self.policy.on_retry(RetryEvent(self.attempts, delay, err))
        return delay


def call_with_retries(policy: RetryPolicy, timeout: float, protocol: str, attempt: Callable[[float], T]) -> T:
    """`attempt(seconds_left)` until it returns, or raises a DetectorError not worth retrying."""
    budget = CallBudget(policy, timeout, protocol)
    while True:
        try:
            return attempt(budget.start_attempt())
        except DetectorError as err:
            delay = budget.retry_delay(err)
            if delay is None:
                raise
        time.sleep(delay)


async def call_with_retries_async(policy: RetryPolicy, timeout: float, protocol: str,
                                  attempt: Callable[[float], Awaitable[T]]) -> T:
    """The asyncio twin of `call_with_retries`."""
    budget = CallBudget(policy, timeout, protocol)
    while True:
        try:
            return await attempt(budget.start_attempt())
        except DetectorError as err:
            delay = budget.retry_delay(err)
            if delay is None:
                raise
        await asyncio.sleep(delay)
