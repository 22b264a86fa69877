"""Hub ids through huggingface_hub: a snapshot from the local cache first (HF_HUB_CACHE /
HF_HOME; nothing else is needed under HF_HUB_OFFLINE=1), otherwise downloaded with only the
files a run reads: one weight file type (safetensors where the repository has them), its index,
config, tokenizer, chat template, generation config, licence and model card. The user's token
is whatever huggingface_hub finds (HF_TOKEN, `hf auth login`); its progress bars show."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from ..errors import InputError
from . import Source
from .files import FILE_TYPES, WeightFiles, missing_files, no_weights_message, read_index

COMMIT = re.compile(r"[0-9a-f]{40}")
# small top-level files a quantized model carries on (tokenizers, templates, configs, licence)
EXTRA_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".md")
EXTRA_PREFIXES = ("LICENSE", "NOTICE", "USE_POLICY")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cached_snapshot(repo: str, revision: str, cache: Path) -> Path | None:
    """The cache's snapshot folder of repo at revision (a branch or tag through refs/, or a
    commit), or None where the cache has no such snapshot."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    sha = revision if COMMIT.fullmatch(revision) else None
    ref = storage / "refs" / revision
    if sha is None and ref.is_file():
        sha = ref.read_text().strip()
    folder = storage / "snapshots" / sha if sha else None
    return folder if folder is not None and folder.is_dir() else None


def complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and missing_files(folder) == []


def files_to_fetch(names: list[str], index_shards) -> list[str]:
    """What a run needs of a repository holding `names`: the first weight file type it has
    (its index and the shards the index lists, `index_shards(kind)`, or its single file) and the
    small top-level files beside it; never another type's weights, code or subfolders."""
    kind = next((k for k in FILE_TYPES if k.index_name in names or k.single_name in names), None)
    if kind is None:
        return []
    weights = [kind.index_name, *index_shards(kind)] if kind.index_name in names else [kind.single_name]
    others = {k.index_name for k in FILE_TYPES}
    extras = [n for n in names if "/" not in n and n not in others
              and (n.endswith(EXTRA_SUFFIXES) or n.upper().startswith(EXTRA_PREFIXES))]
    return sorted(set(weights + extras))


def _http_errors() -> tuple[type[BaseException], ...]:
    # the Hub's errors, and those of the HTTP library beneath it (its HTTPError is their base)
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, *HfHubHTTPError.__bases__, OSError)


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def snapshot(asked: str, repo: str, revision: str | None = None, weights: bool = True) -> Source:
    """The local folder of repo at revision: the cache's snapshot when it holds everything a
    run reads, else downloaded into the cache (a download that stops keeps what it got, and
    running again continues it). Without `weights`, the config is enough: a snapshot holding
    it is used as it is, else only config.json is downloaded."""
    revision = revision or "main"
    cache = cache_dir()
    folder = cached_snapshot(repo, revision, cache)
    if folder is not None and (complete(folder) or not weights and (folder / "config.json").is_file()):
        return Source(asked, folder, repo, revision, folder.name)
    if not weights and not offline():
        return _config_only(asked, repo, revision, cache)
    if offline():
        held = "" if folder is None else f" (it holds {folder.name[:12]} without {_lacking(folder)})"
        raise InputError(f"{repo} is no local directory, and at {revision} it is not in the Hub cache {cache}{held}; "
                         "HF_HUB_OFFLINE is set: run once online (streamq downloads only what it reads), or: "
                         f"hf download {repo}")
    folder = _download(repo, revision, cache)
    if not complete(folder):
        raise InputError(f"the download of {repo} left {folder} without {_lacking(folder)}; run the same command "
                         "again to continue it")
    return Source(asked, folder, repo, revision, folder.name)


def _lacking(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        return "config.json"
    missing = missing_files(folder)
    return "its weights" if missing is None else ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")


def _config_only(asked: str, repo: str, revision: str, cache: Path) -> Source:
    from huggingface_hub import HfApi

    try:
        path = Path(HfApi().hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache))
    except _http_errors() as exc:
        raise InputError(f"cannot read the config of {repo} from the Hub ({_reason(exc)})") from None
    return Source(asked, path.parent, repo, revision, path.parent.name)


def _download(repo: str, revision: str, cache: Path) -> Path:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()  # one endpoint (HF_ENDPOINT) and token for every call
    try:
        info = api.model_info(repo, revision=revision)
    except GatedRepoError:
        raise InputError(f"{repo} is gated: accept its terms on https://huggingface.co/{repo}, then log in "
                         "(hf auth login, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo} is neither a local directory nor a model on the Hub (or it is private: log in "
                         "with hf auth login, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo} has no revision {revision}") from None
    except _http_errors() as exc:
        raise InputError(f"cannot reach the Hub for {repo} ({_reason(exc)}), and the cache {cache} does not hold "
                         "it") from None
    names = [s.rfilename for s in info.siblings or []]

    def index_shards(kind: WeightFiles) -> list[str]:
        index = api.hf_hub_download(repo, kind.index_name, revision=info.sha, cache_dir=cache)
        return sorted(set(read_index(Path(index)).values()))

    try:
        wanted = files_to_fetch(names, index_shards)
        if not wanted:
            raise InputError(no_weights_message(f"{repo} on the Hub", names))
        return Path(api.snapshot_download(repo, revision=revision, allow_patterns=wanted, cache_dir=cache))
    except InputError:
        raise
    except _http_errors() as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise InputError(f"disk full while downloading {repo} into {cache}; free space and run the same "
                             "command again (what was downloaded stays cached)") from None
        raise InputError(f"the download of {repo} stopped ({_reason(exc)}); what was downloaded stays in {cache}: "
                         "run the same command again to continue it") from None
