"""How long a batch of n images takes on this machine, learned online (one per model version).

Each batch size seen keeps an exponentially weighted mean of its measured times, so the estimate follows a
change in speed (another job taking the cores, a throttled GPU) within a few batches. A size not yet seen
is predicted from a least-squares line `a + b*n` through the sizes that were (fixed cost per batch plus a
cost per image, the shape batched inference has); with one size seen, the time scales in proportion to n,
which over-estimates larger batches (the fixed cost counted again) and so errs on the side of refusing.

A size that stops running would keep its old time for ever, and a stale time that is too high is never
corrected (the batcher admits too few requests to form that batch again). So each sample also moves the
other sizes' means by a share of its ratio to its own size's mean (`spill`, the ratio clipped to [1/2, 2]
so one stall does not double every estimate): a machine that got 2x slower at batch 1 is assumed slower
at batch 8 as well, until a batch of 8 says otherwise.

The mean is what scheduling wants; a promise wants more. Each batch of a size already seen also updates an
exponentially weighted mean and variance of its log error, log(measured / predicted), across sizes (one
machine's noise: neighbours' jobs, a preempted thread). `margin()` is the factor that covers the one-sided
`DEFAULT_Z` quantile of that error (about 95 %), and `time_for(..., high=True)` scales by it: admission
promises on that, so a batch running longer than its mean does not make admitted requests late.
"""
from __future__ import annotations

import math
import threading

DEFAULT_ALPHA = 0.2  # weight of the newest sample: ~10 batches to follow a step change to within 10 %
DEFAULT_SPILL = 0.5  # the share of alpha by which a sample moves the other sizes
DEFAULT_ERROR_ALPHA = 0.05  # weight of the newest error: its spread is learned over ~40 batches
DEFAULT_Z = 1.645  # the margin covers this many standard deviations of the log error (one-sided 95 %)
MAX_MARGIN = 3.0  # a burst of stalls must not shut admission for ever: the error is learned again from there


class BatchTimeModel:
    """Seconds per batch by size: `observe` after a batch ran, `predict` before one runs. Thread-safe."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, spill: float = DEFAULT_SPILL) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be within (0, 1], got {alpha}")
        self.alpha, self.spill = alpha, spill
        self._mean: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._line: tuple[float, float] | None = None  # (a, b), refitted when a mean moves
        self._err_mean = 0.0  # EW mean of log(measured / predicted), sizes already seen
        self._err_var = 0.0  # EW variance of the same
        self._lock = threading.Lock()

    def observe(self, n: int, seconds: float) -> None:
        if n < 1 or seconds < 0:
            return
        with self._lock:
            old = self._mean.get(n)
            if old is not None and old > 0 and seconds > 0:
                self._learn_error(math.log(seconds / old))
            if old is not None and old > 0 and self.spill > 0:
                step = 1.0 + self.alpha * self.spill * (min(max(seconds / old, 0.5), 2.0) - 1.0)
                for k in self._mean:
                    if k != n:
                        self._mean[k] *= step
            self._mean[n] = seconds if old is None else old + self.alpha * (seconds - old)
            self._count[n] = self._count.get(n, 0) + 1
            self._line = None

    def _learn_error(self, err: float) -> None:
        a = DEFAULT_ERROR_ALPHA
        diff = err - self._err_mean
        self._err_mean += a * diff
        self._err_var = (1 - a) * (self._err_var + a * diff * diff)  # the EW variance (West's update)

    def margin(self) -> float:
        """The factor on a predicted time that covers the high quantile of the learned errors (>= 1)."""
        with self._lock:
            return min(max(math.exp(self._err_mean + DEFAULT_Z * math.sqrt(self._err_var)), 1.0), MAX_MARGIN)

    def known(self) -> bool:
        return bool(self._mean)

    def samples(self, n: int) -> int:
        return self._count.get(n, 0)

    def predict(self, n: int) -> float | None:
        """Expected seconds for a batch of `n`; None before any batch was measured."""
        if n < 1:
            return 0.0
        with self._lock:
            if n in self._mean:
                return self._mean[n]
            if not self._mean:
                return None
            if len(self._mean) == 1:
                (m, t), = self._mean.items()
                return t * n / m
            if self._line is None:
                self._line = self._fit()
            a, b = self._line
            return a + b * n

    def _fit(self) -> tuple[float, float]:
        ns, ts = list(self._mean), list(self._mean.values())
        k = len(ns)
        mean_n, mean_t = sum(ns) / k, sum(ts) / k
        var = sum((x - mean_n) ** 2 for x in ns)
        b = sum((x - mean_n) * (y - mean_t) for x, y in zip(ns, ts)) / var
        # Noise can tilt the line; time never falls with more images, nor goes below zero at n = 0.
        b = max(b, 0.0)
        a = max(mean_t - b * mean_n, 0.0)
        return a, b

    def time_for(self, count: int, max_batch: int, high: bool = False) -> float | None:
        """Predicted seconds to run `count` queued images in batches of up to `max_batch` (full ones first);
        `high`: the high quantile (times `margin()`) instead of the mean."""
        if count <= 0:
            return 0.0
        full, rest = divmod(count, max_batch)
        t_full = self.predict(max_batch) if full else 0.0
        t_rest = self.predict(rest) if rest else 0.0
        if t_full is None or t_rest is None:
            return None
        return (full * t_full + t_rest) * (self.margin() if high else 1.0)

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            return dict(self._mean)
