"""The mmap'd checkpoint reader: the index, each shard checked before any tensor is read, one
block's tensors by prefix, under transformers' canonical names whatever the file type
(sources.files) and whatever name variant the checkpoint was published with."""

from __future__ import annotations

import hashlib
from pathlib import Path
from collections.abc import Iterable, Mapping

import torch

from .errors import InputError
from .sources.base import FLOAT_DTYPES, TensorInfo
from .sources.fp8 import BlockScaled
from .sources.files import find, no_weights_message, read_index

EQUAL_ROWS_BYTES = 64 << 20  # rows compared at a time when checking that a tied copy repeats its tensor


class ShardReader:
    """Tensor name -> shard file, opened lazily (memory maps): reading one tensor touches only
    that tensor's pages.

    `renames` are the family's (as published, canonical) name prefixes, e.g. OPT's
    ("decoder.", "model.decoder."); `tied` maps a canonical name to the tensor it repeats when the
    config ties them (lm_head.weight -> the embedding): a stored copy is dropped where it is the
    same storage or holds the same values, as transformers ties it then, so the engine and the
    output see the names save_pretrained writes."""

    def __init__(self, model_dir: str | Path, renames: Iterable[tuple[str, str]] = (),
                 tied: Mapping[str, str] | None = None, encoding: BlockScaled | None = None):
        self.model_dir = Path(model_dir)
        kind = find(self.model_dir)
        if kind is None:
            names = [p.name for p in self.model_dir.iterdir()] if self.model_dir.is_dir() else []
            where = str(self.model_dir) if self.model_dir.is_dir() else f"{self.model_dir} (no such directory)"
            raise InputError(no_weights_message(where, names))
        self.kind = kind
        index = self.model_dir / kind.index_name
        if index.is_file():
            stored = {name: self.model_dir / f for name, f in read_index(index).items()}
        else:
            single = self.model_dir / kind.single_name
            stored = {name: single for name in kind.tensors(single)}
        self.infos: dict[Path, dict[str, TensorInfo]] = {}
        for shard in sorted(set(stored.values())):
            if not shard.is_file():
                raise InputError(f"shard {shard.name} named in {index.name} is missing from {self.model_dir}")
            self.infos[shard] = kind.tensors(shard)
        for name, shard in stored.items():
            if name not in self.infos[shard]:
                raise InputError(f"tensor {name} is missing from shard {shard.name}")
        self._stored: dict[str, str] = {}  # canonical name -> the name in its file
        self.files: dict[str, Path] = {}  # canonical name -> its file
        for name, shard in stored.items():
            canonical = canonical_name(name, renames)
            if canonical in self.files:
                raise InputError(f"{self.model_dir} holds both {self._stored[canonical]} and {name}, one tensor "
                                 "under two names")
            self._stored[canonical], self.files[canonical] = name, shard
        # weights stored encoded (FP8 with a scale per block): canonical name -> its scales' name,
        # which no caller sees; get() hands out the weight they encode
        self.encoding = encoding
        self._scales: dict[str, tuple[Path, str]] = {}  # encoded weight -> its scales' file and stored name
        if encoding is not None:
            for name in list(self.files):
                scales = encoding.scale_name(name)
                if scales in self.files:
                    self._scales[name] = (self.files[scales], self._stored[scales])
            for name in self._scales:
                del self.files[encoding.scale_name(name)], self._stored[encoding.scale_name(name)]
        for name in self.files:
            if self.info(name).dtype == "F8_E4M3" and name not in self._scales:
                raise InputError(f"{self.model_dir}: tensor {name} is float8 without a scale beside it; streamq reads "
                                 "FP8 weights with weight_scale_inv blocks, named by quantization_config "
                                 "(quant_method fp8, weight_block_size)")
        # what an encoded weight is rounded to: the dtype of the checkpoint's other tensors
        self._decoded_dtype = (self.float_dtype() or torch.float32) if self._scales else None
        self._handles: dict[Path, object] = {}
        self._identity = {shard: self._identify(shard) for shard in self.infos}
        for alias, target in (tied or {}).items():
            if alias in self.files and target in self.files and self._repeats(alias, target):
                del self.files[alias], self._stored[alias]
        self.release()

    def _identify(self, path: Path) -> tuple[int, str]:
        return path.stat().st_size, hashlib.sha256(self.kind.fingerprint(path)).hexdigest()

    def _open(self, path: Path):
        """The file opened anew, its size and header checked against what they were when the
        reader was made (a file replaced or cut short while a run is going is refused, not read)."""
        try:
            same = self._identify(path) == self._identity[path]
        except (OSError, InputError):
            same = False
        if not same:
            raise InputError(f"{path} changed while it was being read (its size or header differ from when the "
                             "run started); put the original back")
        return self.kind.open(path)

    def _handle(self, path: Path):
        """An open file, kept open until release()."""
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def release(self) -> None:
        """Unmap every shard: pages read so far stop counting toward this process's RSS."""
        self._handles.clear()

    def info(self, name: str) -> TensorInfo:
        return self.infos[self.files[name]][self._stored[name]]

    def _repeats(self, alias: str, target: str) -> bool:
        """Whether `alias` holds exactly `target`: the same storage (a pickle's tie), else the
        same values, compared a few rows at a time."""
        a, b = self.info(alias), self.info(target)
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return False
        if a.storage is not None and self.files[alias] == self.files[target] and a.storage == b.storage:
            return True
        if len(a.shape) == 0:
            return torch.equal(self.get(alias), self.get(target))
        rows = max(1, EQUAL_ROWS_BYTES * a.shape[0] // max(1, a.nbytes))
        ha, hb = self._handle(self.files[alias]), self._handle(self.files[target])
        for start in range(0, a.shape[0], rows):
            if not torch.equal(ha.rows(self._stored[alias], start, start + rows),
                               hb.rows(self._stored[target], start, start + rows)):
                return False
        return True

    def names(self) -> list[str]:
        return sorted(self.files)

    def dtype(self, name: str) -> torch.dtype | None:
        """A tensor's dtype from its file's header (None for a non-float one); nothing read."""
        return FLOAT_DTYPES.get(self.info(name).dtype)

    def shards(self) -> list[Path]:
        return sorted(self.infos)

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, self._handle)

    def load(self, name: str, device: torch.device) -> torch.Tensor:
        """One tensor on `device`, read through handles opened for this read alone, so its pages
        are not left mapped in this process (a parked expert is read once per use, never held);
        an encoded weight goes to the device encoded and is decoded there (the same float32
        products, rounded alike, on any device)."""
        return self._read(name, self._open, device)

    def _read(self, name: str, open_file, device: torch.device | None = None) -> torch.Tensor:
        """`name` through `open_file` (the kept handle, or one opened for this read), on `device`
        (None: where the file hands it out); an encoded weight decoded in float32 there and rounded
        once to the model's dtype."""
        if name not in self.files:
            raise InputError(f"tensor {name} is missing from {self.model_dir}")
        stored = open_file(self.files[name]).get(self._stored[name])
        stored = stored if device is None else stored.to(device)
        if name not in self._scales:
            return stored
        path, scales = self._scales[name]
        scales = open_file(path).get(scales)
        return self.encoding.decode(stored, scales if device is None else scales.to(device)).to(self._decoded_dtype)

    def with_prefix(self, prefix: str) -> "BlockTensors":
        """Tensors whose names start with prefix, keyed by the rest of the name, each read when
        it is looked up."""
        return BlockTensors(self, prefix)

    def stored_dtypes(self) -> set[str]:
        """The dtypes the read tensors are stored in (safetensors' names: F16, BF16, ...)."""
        return {self.info(name).dtype for name in self.files}

    def float_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding most of the checkpoint's bytes (from the headers,
        nothing read): what the weights were trained and published in."""
        sizes: dict[str, int] = {}
        for name in self.files:
            info = self.info(name)
            if info.dtype in FLOAT_DTYPES:
                sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
        return FLOAT_DTYPES[max(sizes, key=sizes.get)] if sizes else None

    def fingerprint(self) -> str:
        """sha256 over config.json and each shard's name, size and what identifies its tensors
        (a safetensors header, a pickle's zip directory with each record's CRC-32): changes when
        the weights' layout or any file size changes, computed without reading the weights."""
        h = hashlib.sha256()
        config = self.model_dir / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for shard in self.shards():
            h.update(shard.name.encode())
            h.update(str(shard.stat().st_size).encode())
            h.update(self.kind.fingerprint(shard))
        return h.hexdigest()


def canonical_name(name: str, renames: Iterable[tuple[str, str]]) -> str:
    """A checkpoint's tensor name under transformers' names: the first matching published
    prefix replaced by its canonical one."""
    for published, canonical in renames:
        if name.startswith(published):
            return canonical + name[len(published):]
    return name


class BlockTensors(Mapping):
    """One block's tensors under names relative to its prefix, read from the reader when looked
    up (`load`: straight to a device, not kept mapped), so a block built from it reads only what
    it holds (a parked expert's weights are read at each use, not at the block's building)."""

    def __init__(self, reader: ShardReader, prefix: str):
        self.reader, self.prefix = reader, prefix
        self._names = [n[len(prefix):] for n in reader.names() if n.startswith(prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._names:
            raise KeyError(key)
        return self.reader.get(self.prefix + key)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def load(self, key: str, device: torch.device) -> torch.Tensor:
        return self.reader.load(self.prefix + key, device)
