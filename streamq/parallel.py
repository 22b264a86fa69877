"""Block-parallel runs under torchrun: each process (rank) owns a contiguous range of blocks.

AWQ calibrates block i+1 on the unquantized block i's output, so one forward pass fixes every
block's input and the searches are independent. Rank 0 starts from the embeddings; each rank runs
the forward pass through its blocks (one block on the device at a time), hands the last output
to the next rank, then quantizes its own blocks with the ordinary streamed loop while the later
ranks do the same. The transport is torch.distributed with the gloo backend, which moves host
tensors between processes on one machine or many and also lets two ranks share one GPU (NCCL
refuses that); the hand-off is one tensor of calibration activations per rank, so its speed
hardly matters. Nothing here decides a byte of the output: every rank computes exactly what one
process computes for its blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from .errors import SettingsError, StreamqError
from .journal import journal_dir, resume_command

# one forward pass of a block against its whole quantization (capture, scale and clip searches,
# packing): measured in tools/bench_parallel.py (docs/benchmarks.md); it only shapes the split
FORWARD_SHARE = 0.03
# the hand-off waits for the forward passes of every earlier rank and the final gather for the
# slowest rank's searches; a rank that dies closes its connections, so a failure is seen at once
TIMEOUT = timedelta(hours=48)


class RankFailed(StreamqError):
    """A rank stopped the run; `echo`: whether this process prints it (one line for the run)."""

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def from_env() -> World | None:
    """The rank and world size torchrun gives this process; None outside torchrun or for one
    process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size)


def split_blocks(n_layers: int, world: int, forward_share: float = FORWARD_SHARE) -> list[tuple[int, int]]:
    """Contiguous block ranges [a, b), one per rank, that finish together as nearly as whole
    blocks allow. Rank r receives its input after the forward passes of blocks [0, a), runs its
    own to hand on, then quantizes them: it finishes at about b * f + (b - a) * q, with f a
    forward pass and q a block's quantization (f = forward_share * q), so later ranks get fewer
    blocks. Every rank gets at least one."""
    if world > n_layers:
        raise SettingsError(f"{world} processes for {n_layers} blocks: each process needs at least one block; "
                            f"run with --nproc-per-node {n_layers} or fewer")
    f = forward_share

    def ranges(t: float) -> list[tuple[int, int]] | None:
        out, a = [], 0
        for r in range(world):
            left = world - r - 1  # blocks the later ranks need, one each
            n = int((t - a * f) / (f + 1.0) + 1e-9)
            n = max(1, min(n, n_layers - a - left))
            out.append((a, a + n))
            a += n
        return out if a == n_layers else None

    lo, hi = 0.0, n_layers * (1.0 + f) + 1.0  # hi: one rank could do everything by then
    for _ in range(100):
        mid = (lo + hi) / 2
        if ranges(mid) is None:
            lo = mid
        else:
            hi = mid
    return ranges(hi)


def start(device: torch.device) -> None:
    """Join torchrun's process group (gloo: host tensors, any number of ranks per device)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def ranks_per_device() -> int:
    """How many of this machine's processes share each GPU (several when there are more
    processes than GPUs): they share its free memory."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    devices = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return max(1, -(-local // devices))


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def failure_note(out_dir: Path) -> Path:
    return journal_dir(out_dir) / "failed"


def record_failure(out_dir: Path, world: World, message: str) -> None:
    """Leave this rank's error where the other ranks (which see only a closed connection) read it."""
    try:
        path = failure_note(out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"rank {world.rank}: {message}\n")
    except OSError:
        pass


def _peer_failed(out_dir: Path, world: World, exc: Exception) -> RankFailed:
    """A lost connection: the rank that failed has said why (its note); without a note (killed,
    out of memory) this rank says that a process left."""
    path = failure_note(out_dir)
    note = path.read_text().strip() if path.is_file() else ""
    if note:
        return RankFailed(f"stopped: {note.splitlines()[0]}", echo=False)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RankFailed(f"rank {world.rank} stopped: another process left the run ({detail}); the finished blocks are "
                      f"kept: continue with {resume_command(out_dir)}")


class Comm:
    """The few exchanges a block-parallel run makes, each turning a lost peer into RankFailed."""

    def __init__(self, world: World, out_dir: Path):
        self.world, self.out_dir = world, Path(out_dir)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as exc:  # gloo: a peer closed its connection or timed out
            raise _peer_failed(self.out_dir, self.world, exc) from None

    def send(self, x: torch.Tensor, to: int) -> None:
        import torch.distributed as dist

        x = x.contiguous().cpu()
        self._guard(dist.send, torch.tensor(list(x.shape), dtype=torch.int64), to)
        self._guard(dist.send, x, to)

    def recv(self, ndim: int, dtype: torch.dtype, source: int) -> torch.Tensor:
        import torch.distributed as dist

        shape = torch.empty(ndim, dtype=torch.int64)
        self._guard(dist.recv, shape, source)
        x = torch.empty(tuple(shape.tolist()), dtype=dtype)
        self._guard(dist.recv, x, source)
        return x

    def agree(self, fn):
        """fn() on every rank; if any raised a StreamqError, every rank raises the first one's,
        named by its rank and printed once (by rank 0)."""
        try:
            result, error = fn(), None
        except StreamqError as exc:
            result, error = None, str(exc)
        failed = [(r, e) for r, e in enumerate(self.all_gather(error)) if e is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank}: {message}", echo=self.world.first)
        return result

    def all_gather(self, obj):
        import torch.distributed as dist

        out = [None] * self.world.size
        self._guard(dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        self._guard(dist.barrier)
