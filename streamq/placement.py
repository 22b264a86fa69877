"""Where calibration activations live between uses: on the compute device, or in pinned host
memory that streams to it chunk by chunk; the copies between the two."""

from __future__ import annotations

import torch


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def to_store(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    """`t` where the plan keeps activations. A device tensor goes to the host in one copy,
    straight into pinned memory (no pageable copy first), so that streaming it back is a fast
    asynchronous copy; the copy blocks, as the host may read it next (journal, token sampling)."""
    if t.device == store:
        return t
    if store.type == "cpu" and t.device.type == "cuda":
        return host_buffer(tuple(t.shape), t.dtype, pinned=True).copy_(t)
    return t.to(store)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on the compute device; from pinned host memory the copy is asynchronous (ordered
    before the kernels that read it on the same stream)."""
    return t.to(device, non_blocking=True)


class Assembler:
    """One chunk [b, ...] on `store`, filled from consecutive micro-batches as they come off
    the device. A chunk computed whole is adopted as it is (no copy); otherwise one buffer of
    the chunk's size is allocated on the store (pinned when it is the host) and each part is
    copied into its rows, so no device ever holds the parts and their concatenation at once."""

    def __init__(self, store: torch.device, samples: int):
        self.store, self.samples = store, samples
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def add(self, part: torch.Tensor) -> None:
        if self.buffer is None and part.shape[0] == self.samples:
            self.buffer, self.filled = to_store(part, self.store), self.samples
            return
        if self.buffer is None:
            shape = (self.samples, *part.shape[1:])
            if self.store.type == "cpu":
                self.buffer = host_buffer(shape, part.dtype, pinned=part.device.type == "cuda")
            else:
                self.buffer = torch.empty(shape, dtype=part.dtype, device=self.store)
        self.buffer[self.filled: self.filled + part.shape[0]].copy_(part)
        self.filled += part.shape[0]

    def result(self) -> torch.Tensor:
        if self.buffer is None or self.filled != self.samples:
            raise RuntimeError(f"chunk assembled from {self.filled} of {self.samples} samples")
        return self.buffer


class TokenCollector:
    """The inputs of a linear that sees only some tokens (an expert: those routed to it), as
    they come off the device: one tensor [1, n, C] per calibration sample that routed any token
    here (samples routing none are left out), in sample order and token order, kept on `store`.
    Everything downstream reduces sample by sample in order (act_scale, the Hessian, the search's
    per-sample errors), so one "sample" per calibration sample keeps every result independent
    of how the samples were chunked."""

    def __init__(self, store: torch.device):
        self.store = store
        self.samples: list[torch.Tensor] = []

    def add(self, part: torch.Tensor, tokens: torch.Tensor, seqlen: int) -> None:
        """part [n, C]: the inputs of the tokens at flat positions `tokens` (ascending) of a
        micro-batch of samples of `seqlen` tokens."""
        sample = torch.div(tokens, seqlen, rounding_mode="floor")
        counts = torch.bincount(sample).tolist()
        start = 0
        for n in counts:
            if n:
                self.samples.append(to_store(part[start:start + n][None], self.store))
            start += n

    def result(self) -> list[torch.Tensor]:
        out, self.samples = self.samples, []
        return out
