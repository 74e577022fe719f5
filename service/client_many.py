"""Many images through one client with bounded concurrency: `detect_many` of the clients.

Each image ends as an `ImageResult` carrying its name and either the server's answer or that image's own
error; one image failing never stops the others. The work is scheduled in *groups* of images, one call per
group. Today each group is one image sent with `Detect`; when the server gains a batch call (`DetectBatch`,
several `image` parts), a client only has to give `run_many` a larger `group_size` and a `detect_group` that
makes that call.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from service.client_errors import DetectorError

T = TypeVar("T")


@dataclass
class ImageResult:
    """The outcome for one input image: `response` (the JSON of POST /detect) or `error`."""

    index: int  # position in the input
    name: str  # the path as given, the name of a (name, image) pair, or "#<index>"
    response: dict | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def detections(self) -> list[dict] | None:
        return self.response["detections"] if self.response is not None else None

    def to_json(self) -> dict:
        """The line `rtmdet client` writes: {"file", "detections"} or {"file", "error", "status"}."""
        if self.error is None:
            return {"file": self.name, "detections": self.detections}
        status = self.error.status if isinstance(self.error, DetectorError) else None
        return {"file": self.name, "error": str(self.error), "status": status}


def named(images: Iterable) -> Iterator[tuple[int, str, Any]]:
    """(index, name, image) for paths, bytes, arrays, or (name, image) pairs."""
    for i, item in enumerate(images):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, image = item
        else:
            image = item
            name = os.fspath(item) if isinstance(item, str | os.PathLike) else f"#{i}"
        yield i, name, image


# One call for a group of images: per image, the response dict or the exception that image failed with.
GroupCall = Callable[[list], Awaitable[list[dict | Exception]]]


async def single_image_group(detect: Callable[[Any], Awaitable[dict]], images: list) -> list[dict | Exception]:
    """A group of one image sent with the client's `detect` (what `detect_many` does until a batch call)."""
    out: list[dict | Exception] = []
    for image in images:
        try:
            out.append(await detect(image))
        except Exception as exc:  # this image's own failure (server error, unreadable file, ...)
            out.append(exc)
    return out


async def run_many(detect_group: GroupCall, images: Iterable, concurrency: int = 8, ordered: bool = True,
                   group_size: int = 1) -> AsyncIterator[ImageResult]:
    """Results for `images`, at most `concurrency` calls in flight. `ordered`: in input order (results that
    finish early wait, at most 4 x `concurrency` of them, for the ones before); else as they complete.
    `images` is consumed lazily, so it may be a long generator."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    inputs = named(images)
    window = 4 * concurrency * group_size if ordered else concurrency * group_size

    async def run(group: list[tuple[int, str, Any]]) -> list[ImageResult]:
        outcomes = await detect_group([image for _, _, image in group])
        return [ImageResult(i, name, error=o) if isinstance(o, Exception) else ImageResult(i, name, response=o)
                for (i, name, _), o in zip(group, outcomes, strict=True)]

    running: set[asyncio.Task] = set()
    waiting: dict[int, ImageResult] = {}  # finished, ordered mode, until the ones before them are out
    next_index, exhausted = 0, False
    try:
        while True:
            while not exhausted and len(running) < concurrency and \
                    (len(running) + 1) * group_size + len(waiting) <= window:
                group = list(itertools.islice(inputs, group_size))
                if not group:
                    exhausted = True
                    break
                running.add(asyncio.ensure_future(run(group)))
            if not running:
                return
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                for result in task.result():
                    if ordered:
                        waiting[result.index] = result
                    else:
                        yield result
            while next_index in waiting:
                yield waiting.pop(next_index)
                next_index += 1
    finally:  # the caller stopped early (or failed): stop the calls still running and wait for them to end
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def iterate_sync(make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Drive an async iterator from sync code, on a private event loop in the calling thread (so it cannot be
    used from inside a running event loop: use the async client there)."""
    loop = asyncio.new_event_loop()
    agen = make()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())  # any generator it left unclosed
        loop.close()
