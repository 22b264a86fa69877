"""Where calibration activations live between uses: on the compute device, or in pinned host
memory that streams to it chunk by chunk; the copies between the two. And parked modules: a
mixture's experts, read from the shards (or held in host memory), on the device only while they
compute."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


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


# Parked modules: a block's routed experts, when the plan finds that the whole block does not fit
# the device budget, hold no storage (their `sources` read them from the shards) and come to the
# device one at a time, for as long as they compute (`loaded`). A parked linear's weight is the original
# and never changes; while a scale search tries a candidate s, the linear's `candidate` turns the
# uploaded original into the weights the candidate computes with, on the device, the same
# function of the same bytes as for a linear that stays on the device.

def park(module: nn.Module, device: torch.device) -> None:
    """Mark `module` (its parameters storage-less with `sources`, or in host memory) as computing
    on `device`."""
    for m in module.modules():
        m.compute_device = device


def is_parked(module: nn.Module) -> bool:
    return getattr(module, "compute_device", None) is not None


def parked_root(block: nn.Module, name: str) -> nn.Module | None:
    """The outermost parked module holding `name` (or being it), if any."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        module = block.get_submodule(".".join(parts[:i]))
        if is_parked(module):
            return module
    return None


def compute_device(module: nn.Module) -> torch.device:
    """Where `module` computes: a parked module's device, else that of its first parameter that
    is not parked."""
    if is_parked(module):
        return module.compute_device
    for m in module.modules():
        if not is_parked(m):
            for p in m.parameters(recurse=False):
                return p.device
    raise ValueError(f"{type(module).__name__} has no parameter to tell its device")


def original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's original values on the device `module` computes on: a parked module's read
    from its source (or copied from host memory), else the parameter's own tensor."""
    t = getattr(module, name).data
    sources = module.__dict__.get("sources", {})
    if t.is_meta and name in sources:
        return sources[name](compute_device(module))
    return t.to(compute_device(module)) if is_parked(module) else t


@contextmanager
def loaded(module: nn.Module | None):
    """While inside: a parked module's parameters are copies on its compute device, read from
    their sources (or copied from host memory), a linear's weight through its `candidate` if
    one is set; afterwards the parameters are what they were (storage-less, or in host memory)
    and the copies are freed. A module that is not parked (or None) is left as it is."""
    if module is None or not is_parked(module):
        yield module
        return
    device = module.compute_device
    homes = []
    try:
        for m in module.modules():
            sources = m.__dict__.get("sources", {})
            for name, p in list(m.named_parameters(recurse=False)):
                homes.append((m, name, p, p.data))
                if name in sources:  # a storage-less parameter: a device one stands in for it
                    m._parameters[name] = nn.Parameter(sources[name](device), requires_grad=False)
                else:
                    p.data = p.data.to(device, non_blocking=True, copy=True)
            candidate = getattr(m, "candidate", None)
            if candidate is not None:
                m.weight.data = candidate(m.weight.data)
        yield module
    finally:
        for m, name, p, home in homes:
            m._parameters[name] = p
            p.data = home
