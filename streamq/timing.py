"""Where a block's time goes: named phases timed with the device synchronised at both ends (a
GPU runs asynchronously, so an unsynchronised clock would charge one phase's kernels to the
next), summed per phase and recorded per block in streamq.json."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Iterator

import torch

_EXPERT = re.compile(r"\.\d+\.")  # experts.7.w3 -> experts.*.w3: a mixture's experts as one phase


class Phases:
    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            key = _EXPERT.sub(".*.", name)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def to_json(self) -> dict[str, float]:
        return {name: round(s, 4) for name, s in self.seconds.items()}


class _Untimed(Phases):
    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        yield


UNTIMED = _Untimed()  # for callers that do not ask (the unstreamed reference, tests)
