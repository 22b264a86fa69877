"""Data sets by name, as the paper and the seeds use them: wikitext-2's raw test split for
perplexity (its rows joined by blank lines, as llm-awq joins them) and pile-val for calibration,
or any Hub data set `ID[:CONFIG]@SPLIT[#FIELD]`, or a folder written by `save_to_disk`; read
through the `datasets` library (from its cache offline, downloaded online) when it is installed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import CalibrationError


@dataclass(frozen=True)
class DataSet:
    repo: str
    config: str | None
    split: str
    field: str = "text"

    def __str__(self) -> str:
        return f"{self.repo}{':' + self.config if self.config else ''}@{self.split}#{self.field}"


DATASETS = {
    "wikitext2": DataSet("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),  # the papers' perplexity text
    "wikitext2-train": DataSet("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "pileval": DataSet("mit-han-lab/pile-val-backup", None, "validation"),  # llm-awq's and AutoAWQ's calibration
}
SPEC = re.compile(r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?@(?P<split>[\w.-]+)(?:#(?P<field>\w+))?")
SHUFFLE_SEED = 42  # llm-awq draws pile-val documents in this shuffled order
SPEC_HELP = "wikitext2, wikitext2-train, pileval, a Hub data set ID[:CONFIG]@SPLIT[#FIELD] or a save_to_disk folder"


def named(source: str) -> DataSet | Path | None:
    """What `source` names: a known data set, a Hub data set spec, a save_to_disk folder, or
    None (it is then a file path)."""
    if source in DATASETS:
        return DATASETS[source]
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return path
    found = SPEC.fullmatch(source)
    if found and not path.exists():
        return DataSet(found["repo"], found["config"], found["split"], found["field"] or "text")
    return None


def _library() -> Any:
    try:
        import datasets
    except ImportError:
        raise CalibrationError("reading a data set by name needs the datasets library: pip install datasets "
                               "(or pass a text file)") from None
    return datasets


def _load(source: DataSet | Path) -> Any:
    datasets = _library()
    if isinstance(source, Path):
        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise CalibrationError(f"{source} holds the splits {', '.join(loaded)}; save the one to read alone")
            loaded = next(iter(loaded.values()))
        return loaded
    try:
        return datasets.load_dataset(source.repo, source.config, split=source.split)
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CalibrationError(f"cannot read data set {source} ({first}); offline, it must be in the datasets "
                               f"cache ({datasets.config.HF_DATASETS_CACHE}) from an earlier online run") from None


def documents(source: DataSet | Path, shuffle: bool = False) -> Iterator[str]:
    """The text field of each row, in order (or in llm-awq's seeded shuffle)."""
    table = _load(source)
    field = source.field if isinstance(source, DataSet) else "text"
    if field not in table.column_names:
        raise CalibrationError(f"data set {source} has no field {field!r} (it has {', '.join(table.column_names)})")
    if shuffle:
        table = table.shuffle(seed=SHUFFLE_SEED)
    for row in table:
        yield row[field] or ""


def evaluation_text(source: DataSet | Path) -> str:
    """Every row joined by blank lines, empty rows included: the paper's wikitext-2 test text."""
    return "\n\n".join(documents(source))


def calibration_text(source: DataSet | Path, tokenizer: Any, tokens: int) -> str:
    """Documents in llm-awq's shuffled order (stripped, empty ones dropped), joined by blank
    lines, until they hold `tokens` tokens: enough for the samples without reading a corpus of
    hundreds of megabytes whole."""
    picked: list[str] = []
    count = 0
    for doc in documents(source, shuffle=True):
        doc = doc.strip()
        if not doc:
            continue
        picked.append(doc)
        count += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
        if count >= tokens:
            break
    return "\n\n".join(picked)
