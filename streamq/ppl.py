"""Streamed perplexity, the AWQ paper's evaluation: the text tokenised once, cut into
non-overlapping segments of `seqlen` tokens, pushed through one decoder block at a time.

Block weights come from the mmap'd shards (an AWQ GEMM checkpoint is dequantized on the device,
as a kernel would), hidden states wait on the host between blocks, or in a file on disk when
they exceed the host budget; the final norm, lm_head and token NLL run in chunks. Memory scales
with one block plus the hidden states of the evaluation text, never with the model."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .block import check_finite
from .budget import format_bytes
from .calib import read_ids, read_text
from .errors import CalibrationError, SettingsError
from .families import Family, build_block
from .families.base import meta_block
from .kernels import TORCH, Ops
from .kernels import select as select_kernels
from .memory import peak_device, peak_rss, reset_peaks
from .models import check_seqlen, compute_dtype, dtype_name, load_tokenizer, open_checkpoint, resolve_device
from .formats import Format, dense_state, reading
from .search import run_module
from .shards import ShardReader
from .sources import resolve
from .sources.datasets import SPEC_HELP, evaluation_text, named

OnBlock = Callable[[int, int], None]
MAX_CHUNK_SEGMENTS = 16  # beyond this, larger chunks buy no speed and only cost memory
HEAD_ROWS = 512  # tokens per lm_head product: bounds the float32 logits, [rows, vocab]


@dataclass(frozen=True)
class PplResult:
    ppl: float
    mean_nll: float  # natural log, per predicted token
    tokens: int  # predicted tokens: segments x (seqlen - 1)
    segments: int
    seqlen: int
    dropped_tokens: int  # the remainder after the last whole segment
    model_dir: str
    data: str
    data_tokens: int
    weights: str  # "fp16", "bf16", ... or "awq-int4", "compressed-tensors-int3", ... (dequantized on the device)
    device: str
    compute_dtype: str
    chunk_segments: int
    hidden_storage: str  # "host" or "disk"
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    kernels: str = "torch"  # what dequantized the packed weights: torch or cuda
    source: dict | None = None  # what --model asked for and what it resolved to (streamq.sources)

    def to_json(self) -> dict:
        return asdict(self)


def eval_tokens(data: str | Path, tokenizer: Any | None) -> torch.Tensor:
    """The evaluation stream as token ids. Text (JSONL documents, or a data set's rows, joined by
    blank lines, as the paper joins wikitext-2's lines with "\\n\\n") is tokenised once with the
    tokenizer's own special tokens, as llm-awq's evaluation does; .pt/.npy files hold ids already."""
    path = Path(data)
    dataset = named(str(data)) if not path.is_file() else None
    if dataset is None and not path.is_file():
        raise CalibrationError(f"evaluation data {data} does not exist (nor is it a data set: {SPEC_HELP})")
    if dataset is None and path.suffix in (".pt", ".npy"):
        return read_ids(path)
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer files; pass token ids with --data FILE.pt or FILE.npy")
    text = evaluation_text(dataset) if dataset is not None else read_text(path)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def cut_segments(ids: torch.Tensor, seqlen: int, max_segments: int | None = None) -> torch.Tensor:
    """[n, seqlen] consecutive segments from the start of the stream; the remainder is dropped."""
    n = ids.numel() // seqlen
    if max_segments is not None:
        n = min(n, max_segments)
    if n == 0:
        raise CalibrationError(f"evaluation data has {ids.numel()} tokens, fewer than one segment of "
                               f"--seqlen {seqlen}; give more text or a shorter --seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)


class HiddenStore:
    """Hidden states of every segment, [n, seqlen, hidden], in RAM up to `host_bytes`, else in
    a file mapped into memory (pages go to disk, not to swap or the OOM killer)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, host_bytes: int, workdir: Path | None):
        numel = math.prod(shape)
        nbytes = numel * (torch.finfo(dtype).bits // 8)
        self.tmpdir: Path | None = None
        if nbytes <= host_bytes:
            self.data = torch.empty(shape, dtype=dtype)
            return
        self.tmpdir = Path(tempfile.mkdtemp(prefix="streamq-ppl-", dir=workdir))
        path = self.tmpdir / "hidden.bin"
        with open(path, "wb") as f:
            f.truncate(nbytes)
        self.data = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    @property
    def on_disk(self) -> bool:
        return self.tmpdir is not None

    def close(self) -> None:
        del self.data
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def block_state(reader: ShardReader, prefix: str, device: torch.device,
                packed: tuple[Format, int] | None = None, ops: Ops = TORCH) -> dict[str, torch.Tensor]:
    """One block's tensors by name relative to the block; the packed linears of a quantized
    checkpoint (`packed`: its format and bits) become `weight`s, dequantized on `device` as a
    loader computes them (by the format's kernel where the run has one)."""
    raw = reader.with_prefix(prefix)
    return dense_state(packed[0], raw, packed[1], device, ops) if packed else dict(raw)


def plan_chunk(block: nn.Module, hf_config: Any, n_segments: int, seqlen: int, elem: int,
               budget: int | None, default: int = 4) -> int:
    """Segments per forward pass that fit `budget` on the device. Fixed: one block's weights
    (and a dequantization's int32 temporaries), or at the end lm_head's weight and the float32
    logits of HEAD_ROWS tokens, whichever is larger. Per segment: its input and output, the
    widest intermediates and (without flash attention) the heads x seqlen x seqlen scores."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    hidden = hf_config.hidden_size
    widest = max(max(m.out_features for m in linears), 3 * hidden)
    block_fixed = sum(p.numel() for p in block.parameters()) * elem + 3 * 4 * max(m.weight.numel() for m in linears)
    head_fixed = hf_config.vocab_size * (hidden * elem + 3 * 4 * HEAD_ROWS)
    fixed = max(block_fixed, head_fixed)
    per_segment = seqlen * elem * (6 * hidden + 4 * widest) + hf_config.num_attention_heads * seqlen ** 2 * elem
    cap = min(n_segments, MAX_CHUNK_SEGMENTS if budget is not None else default)
    if budget is None:
        return cap
    if fixed + per_segment > budget:
        raise SettingsError(f"--max-gpu-mem {format_bytes(budget)} is too small to evaluate: it needs at least "
                            f"{format_bytes(fixed + per_segment)} (one block's weights, or lm_head and its logits, "
                            f"plus one segment of {seqlen} tokens)")
    return max(c for c in range(1, cap + 1) if fixed + c * per_segment <= budget)


def _lm_head_weight(reader: ShardReader, family: Family) -> torch.Tensor:
    names = set(reader.names())
    return reader.get("lm_head.weight" if "lm_head.weight" in names else family.embed_weight)


@torch.no_grad()
def perplexity(
    model: str | Path,
    data: str | Path,
    seqlen: int = 2048,
    max_segments: int | None = None,
    device: str = "auto",
    max_gpu_mem: int | None = None,
    host_mem: int | None = None,
    workdir: str | Path | None = None,
    on_block: OnBlock | None = None,
    kernels: str = "auto",
    compute: str = "auto",
    revision: str | None = None,
) -> PplResult:
    """Perplexity of `model` (a checkpoint directory, a Hub id at `revision` or a short name;
    plain, or one of streamq's formats) on the text in `data`."""
    start = time.time()
    if seqlen < 2:
        raise SettingsError(f"--seqlen must be at least 2, got {seqlen}")
    source = resolve(model, revision)
    model_dir = source.path
    reader, hf_config, family = open_checkpoint(model_dir)
    found = reading(hf_config)
    packed = (found[0], found[1]["w_bit"]) if found else None
    dev = resolve_device(device)
    # as a run: float32 on CPU, the checkpoint's half precision on GPU (an AWQ checkpoint's is fp16)
    dtype = compute_dtype(dev, compute, reader.float_dtype())
    check_seqlen(hf_config, seqlen)
    ids = eval_tokens(data, load_tokenizer(model_dir))
    if ids.numel() and int(ids.max()) >= hf_config.vocab_size:
        raise CalibrationError(f"token id {int(ids.max())} is outside the model's vocabulary ({hf_config.vocab_size})")
    segments = cut_segments(ids, seqlen, max_segments)
    n = segments.shape[0]
    elem = torch.finfo(dtype).bits // 8
    if max_gpu_mem is None and dev.type == "cuda":
        max_gpu_mem = torch.cuda.mem_get_info(dev)[0]
    chunk = min(plan_chunk(meta_block(hf_config, i), hf_config, n, seqlen, elem, max_gpu_mem)
                for i in family.kinds(hf_config))  # each kind of block (dense, sparse) must fit
    if host_mem is None:
        import psutil

        host_mem = psutil.virtual_memory().available // 2
    # kernels matter only for a quantized checkpoint: dequantization is their one use here
    ops = select_kernels(kernels, dev, dtype)[0] if packed else TORCH
    reset_peaks(dev)
    store = HiddenStore((n, seqlen, hf_config.hidden_size), dtype, host_mem, Path(workdir) if workdir else None)
    try:
        for lo in range(0, n, chunk):
            store.data[lo: lo + chunk] = family.embed(reader.get, hf_config, segments[lo: lo + chunk], dev, dtype).cpu()
        reader.release()
        n_layers = family.n_layers(hf_config)
        if on_block:
            on_block(0, n_layers)
        for i in range(n_layers):
            block = build_block(hf_config, i, block_state(reader, family.block_prefix(i), dev, packed, ops),
                                dev, dtype)
            reader.release()
            check_finite(block, family.block_prefix(i))  # a damaged block is named, not a NaN perplexity
            kwargs = family.block_kwargs(hf_config, seqlen, dev, dtype, i)
            for lo in range(0, n, chunk):
                x = store.data[lo: lo + chunk].to(dev)
                store.data[lo: lo + chunk] = run_module(block, x, kwargs).cpu()
            del block
            if on_block:
                on_block(i + 1, n_layers)
        nll = _token_nll(reader, family, hf_config, store.data, segments, chunk, dev, dtype)
        on_disk = store.on_disk
    finally:
        store.close()
        reader.release()
    tokens = n * (seqlen - 1)
    return PplResult(
        ppl=math.exp(nll / tokens), mean_nll=nll / tokens, tokens=tokens, segments=n, seqlen=seqlen,
        dropped_tokens=ids.numel() - n * seqlen, model_dir=str(model_dir), data=str(data),
        data_tokens=ids.numel(), weights=f"{packed[0].name}-int{packed[1]}" if packed else _stored_dtype(reader),
        device=str(dev), compute_dtype=dtype_name(dtype), chunk_segments=chunk,
        hidden_storage="disk" if on_disk else "host", seconds=time.time() - start,
        peak_rss_bytes=peak_rss(), peak_gpu_bytes=peak_device(dev), kernels=ops.name,
        source=source.to_json(),
    )


def _token_nll(reader: ShardReader, family: Family, hf_config: Any, hidden: torch.Tensor, segments: torch.Tensor,
               chunk: int, dev: torch.device, dtype: torch.dtype) -> float:
    """Sum over segments of the NLL of tokens 1..seqlen-1 given their prefixes (float64).
    Logits are computed in the compute dtype and upcast to float32 for log-softmax, as
    transformers does, HEAD_ROWS tokens at a time."""
    final = family.final(lambda name: reader.get(name) if name in reader.files else None, hf_config, dev, dtype)
    lm_head = _lm_head_weight(reader, family).to(dev, dtype)
    reader.release()
    total = torch.zeros((), dtype=torch.float64)
    cap = family.logit_softcap(hf_config)
    for lo in range(0, segments.shape[0], chunk):
        h = final(hidden[lo: lo + chunk, :-1].to(dev)).reshape(-1, lm_head.shape[1])
        target = segments[lo: lo + chunk, 1:].reshape(-1).to(dev)
        for r in range(0, h.shape[0], HEAD_ROWS):
            logits = F.linear(h[r: r + HEAD_ROWS], lm_head)
            if cap is not None:  # Gemma 2's final soft-capping, in the compute dtype as transformers does
                logits = torch.tanh(logits / cap) * cap
            logits = logits.float()
            total += F.cross_entropy(logits, target[r: r + HEAD_ROWS], reduction="sum").double().cpu()
    return float(total)


_DTYPE_NAMES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}


def _stored_dtype(reader: ShardReader) -> str:
    """The floating-point storage of a plain checkpoint, e.g. "fp16" (or "bf16/fp32" if mixed)."""
    return "/".join(sorted(_DTYPE_NAMES[d] for d in reader.stored_dtypes() if d in _DTYPE_NAMES))
