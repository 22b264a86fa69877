"""Where a model comes from: what the user typed (a local directory, a Hub id, a short name)
resolved once to a local folder, before anything is read from it. The weight file types read
from that folder are sources.files; the Hub's cache and downloads are sources.hub."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError

# The names the AWQ paper, the seeds and the design card use, mapped to their Hub ids.
SHORT_NAMES = {
    **{f"opt-{size}": f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    "llama-7b": "huggyllama/llama-7b", "llama-13b": "huggyllama/llama-13b", "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",  # LLaMA-1 as the paper ran it (community uploads of Meta's weights)
    "llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B", "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1", "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B", "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "gemma-2-9b": "google/gemma-2-9b", "gemma-3-270m": "google/gemma-3-270m",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# org/name as the Hub spells repository ids
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass(frozen=True)
class Source:
    """What was asked for and the local folder it resolved to (with the repository and the
    commit of a Hub snapshot)."""

    asked: str
    path: Path
    repo: str | None = None
    revision: str | None = None  # as asked (a branch, tag or commit), for a Hub id
    sha: str | None = None  # the commit the snapshot holds

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def resolve(model: str | Path, revision: str | None = None, weights: bool = True) -> Source:
    """A local directory as it is; a short name or a Hub id `org/name` from the Hub's cache, or
    downloaded (only what a run reads) where the cache lacks it and the Hub is allowed. Without
    `weights` (streamq plan), a Hub id not in the cache brings only its config."""
    asked = str(model)
    path = Path(asked).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InputError(f"--revision applies to Hub ids; {asked} is a local directory")
        return Source(asked, path.resolve())
    if path.exists():
        raise InputError(f"--model {asked} is a file; give the checkpoint's directory")
    repo = SHORT_NAMES.get(asked.lower())
    if repo is None and REPO_ID.fullmatch(asked) and ".." not in asked:
        repo = asked
    if repo is None:
        if "/" in asked or asked.startswith((".", "~")):
            raise InputError(f"--model {asked}: no such directory")
        raise InputError(f"--model {asked} is neither a directory nor a known short name "
                         f"({', '.join(SHORT_NAMES)}); a Hub id is org/name")
    from .hub import snapshot

    return snapshot(asked, repo, revision, weights)
