"""Tests for fedsb.data loaders: real packaged datasets, the file loader and the split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedsb.data import DATASETS, DatasetSplit, TextDataset, load_dataset
from fedsb.data import loaders as loaders_module
from fedsb.errors import DataError

TOPICS = [
    "ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip",
    "greetings", "health", "history", "humor", "literature", "money", "movies", "politics",
    "psychology", "science", "sports", "tech_support", "trivia",
]  # fmt: skip


def _counts(split: DatasetSplit) -> Counter[str]:
    """Examples per label name over train and test together."""
    names = split.train.label_names
    return Counter(names[y] for y in split.train.labels + split.test.labels)


def _expected_test(n: int) -> int:
    """The per-class test count the split promises for test_fraction=0.2."""
    return 0 if n < 2 else max(1, min(n - 1, int(n * 0.2 + 0.5)))


# ---------------------------------------------------------------- real datasets


def test_datasets_lists_known_names() -> None:
    assert DATASETS == ("chatterbot-topics", "chatterbot-language", "drugreview", "file")


def test_chatterbot_topics_sizes_and_classes() -> None:
    split = load_dataset("chatterbot-topics")
    assert (len(split.train), len(split.test)) == (1498, 377)
    assert split.train.label_names == TOPICS
    assert split.test.label_names == TOPICS
    counts = _counts(split)
    assert sum(counts.values()) == 1875
    assert len(counts) == 21
    assert counts.most_common(1) == [("trivia", 510)]
    assert counts["health"] == 8 and min(counts.values()) == 8
    assert split.train.groups is None and split.train.name == "chatterbot-topics"


def test_chatterbot_topics_dedup_keeps_first_topic_file() -> None:
    split = load_dataset("chatterbot-topics")
    texts = split.train.texts + split.test.texts
    assert len(set(texts)) == len(texts) == 1875
    assert all(t == t.strip() and t for t in texts)
    labels = split.train.labels + split.test.labels
    by_text = dict(zip(texts, labels, strict=True))
    # "Hello" is in conversations.yml and greetings.yml: the first file name wins.
    assert TOPICS[by_text["Hello"]] == "conversations"
    assert TOPICS[by_text["Yes."]] == "ai"


def test_chatterbot_language_sizes_and_groups() -> None:
    split = load_dataset("chatterbot-language")
    assert (len(split.train), len(split.test)) == (11140, 2788)
    counts = _counts(split)
    assert len(split.train.label_names) == 28 and len(counts) == 28
    assert counts.most_common(1) == [("english", 1875)]
    assert counts["telugu"] == 11 and min(counts.values()) == 11
    for part in (split.train, split.test):
        assert part.groups == [part.label_names[y] for y in part.labels]
    # deduplicated within each language
    pairs = list(
        zip(
            split.train.texts + split.test.texts,
            split.train.groups + split.test.groups,
            strict=True,
        )
    )
    assert len(set(pairs)) == len(pairs)


def test_drugreview_sizes_labels_and_conditions() -> None:
    split = load_dataset("drugreview")
    assert (len(split.train), len(split.test)) == (783, 195)
    assert split.train.label_names == ["negative", "neutral", "positive"]
    assert _counts(split) == Counter({"positive": 632, "negative": 256, "neutral": 90})
    groups = split.train.groups + split.test.groups
    assert len(set(groups)) == 182
    assert Counter(groups).most_common(1) == [("Birth Control", 192)]
    assert "unknown" in groups and not any("</span>" in g for g in groups)
    texts = split.train.texts + split.test.texts
    assert len(set(texts)) == 978
    assert not any("&#039;" in t or t.startswith('"') for t in texts)


# ---------------------------------------------------------------- split behaviour


def test_split_is_stratified_per_class() -> None:
    split = load_dataset("chatterbot-language", test_fraction=0.2)
    train = Counter(split.train.labels)
    test = Counter(split.test.labels)
    for label in range(28):
        total = train[label] + test[label]
        assert test[label] == _expected_test(total) >= 1


def test_split_is_deterministic_per_seed() -> None:
    a = load_dataset("drugreview", seed=3)
    b = load_dataset("drugreview", seed=3)
    c = load_dataset("drugreview", seed=4)
    assert a == b
    assert a.test.texts != c.test.texts
    assert len(a.test) == len(c.test) == 195


def test_split_keeps_a_singleton_class_in_train(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "big"} for i in range(9)] + [{"text": "x", "label": "one"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    split = load_dataset("file", path=str(path), test_fraction=0.5)
    assert Counter(split.train.labels) == Counter({0: 4, 1: 1})
    assert Counter(split.test.labels) == Counter({0: 5})  # 9 * 0.5 rounds half up


def test_max_examples_subsamples_train_only() -> None:
    full = load_dataset("chatterbot-topics", seed=1)
    small = load_dataset("chatterbot-topics", seed=1, max_examples=100)
    assert len(small.train) == 100
    assert len(set(small.train.labels)) == 21
    assert small.test == full.test
    assert set(small.train.texts) <= set(full.train.texts)
    assert small == load_dataset("chatterbot-topics", seed=1, max_examples=100)
    assert len(load_dataset("drugreview", max_examples=10_000).train) == 783


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("drugreview", test_fraction=fraction)


def test_bad_max_examples() -> None:
    with pytest.raises(DataError, match="max_examples must be a positive integer or None; got 0"):
        load_dataset("drugreview", max_examples=0)


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'imdb'.*chatterbot-topics, .*file"):
        load_dataset("imdb")


def test_path_with_builtin_dataset_is_rejected() -> None:
    with pytest.raises(DataError, match="only name='file' reads a path"):
        load_dataset("drugreview", path="x.csv")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = ("fedsb_no_such_module_xyz", "chatterbot-corpus==1.3.3")
    monkeypatch.setitem(loaders_module._PACKAGES, "chatterbot", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
        load_dataset("chatterbot-topics")


# ---------------------------------------------------------------- file loader


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_with_string_labels_and_groups(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    lines = ["body,sentiment,site"]
    lines += [f'"great, item {i}",pos,a' for i in range(6)]
    lines += [f"bad item {i},neg,b" for i in range(4)]
    lines += ["   ,neg,b"]  # blank text is dropped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    split = load_dataset(
        "file", path=str(path), text_column="body", label_column="sentiment", group_column="site"
    )
    assert split.train.label_names == ["neg", "pos"]
    assert (len(split.train), len(split.test)) == (8, 2)
    assert Counter(split.test.labels) == Counter({0: 1, 1: 1})
    texts = split.train.texts + split.test.texts
    assert sorted(texts)[-1] == "great, item 5"
    every = zip(
        split.train.labels + split.test.labels, split.train.groups + split.test.groups, strict=True
    )
    assert {(y, g) for y, g in every} == {(1, "a"), (0, "b")}
    assert split.train.name == "file:reviews.csv"


def test_jsonl_with_string_labels(tmp_path: Path) -> None:
    rows = [{"text": f"hi {i}", "label": ["x", "y", "z"][i % 3]} for i in range(15)]
    path = _write_jsonl(tmp_path / "d.json-lines", rows)
    split = load_dataset("file", path=str(path), seed=5)
    assert split.train.label_names == ["x", "y", "z"]
    assert Counter(split.test.labels) == Counter({0: 1, 1: 1, 2: 1})
    assert len(split.train) == 12 and split.train.groups is None


def test_integer_labels_keep_their_order(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [10, 2, 7][i % 3]} for i in range(9)]
    split = load_dataset("file", path=str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    assert split.train.label_names == ["2", "7", "10"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(6)))
    assert load_dataset("file", path=str(csv_path)).train.label_names == ["0", "1"]


def test_file_without_path() -> None:
    with pytest.raises(DataError, match="needs path=...; got path=None"):
        load_dataset("file")


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        load_dataset("file", path=str(tmp_path / "nope.csv"))


def test_file_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unknown extension '\.parquet'; expected one of \.csv"):
        load_dataset("file", path=str(path))


def test_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="the file is empty"):
        load_dataset("file", path=str(path))


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="the file has no records"):
        load_dataset("file", path=str(path))


def test_csv_missing_column_lists_present_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("review,label\nok,a\n")
    with pytest.raises(
        DataError, match="missing column 'text' on line 2; columns present: 'review', 'label'"
    ):
        load_dataset("file", path=str(path))


def test_jsonl_missing_group_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(
        DataError, match="missing column 'site' on line 1; columns present: 'text', 'label'"
    ):
        load_dataset("file", path=str(path), group_column="site")


def test_jsonl_bad_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match="bad JSON on line 3"):
        load_dataset("file", path=str(path))


def test_jsonl_line_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "x"]\n')
    with pytest.raises(DataError, match="line 1 holds a JSON list; expected a JSON object"):
        load_dataset("file", path=str(path))


def test_mixed_and_bad_labels(tmp_path: Path) -> None:
    mixed = _write_jsonl(
        tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    )
    with pytest.raises(DataError, match="mixes integer and string labels"):
        load_dataset("file", path=str(mixed))
    floats = _write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 0.5}])
    with pytest.raises(DataError, match="label 0.5 in column 'label' on line 1 is not usable"):
        load_dataset("file", path=str(floats))


def test_all_blank_texts(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "b.jsonl", [{"text": " ", "label": "x"}])
    with pytest.raises(DataError, match="every value of column 'text' is blank"):
        load_dataset("file", path=str(path))


# ---------------------------------------------------------------- TextDataset


def test_text_dataset_subset_and_validation() -> None:
    ds = TextDataset(["a", "b", "c"], [0, 1, 0], ["x", "y"], groups=["g", "h", "g"], name="t")
    sub = ds.subset([2, 1])
    assert sub == TextDataset(["c", "b"], [0, 1], ["x", "y"], groups=["g", "h"], name="t")
    assert len(sub) == 2
    with pytest.raises(DataError, match="index 3 is out of range; expected 0..2"):
        ds.subset([3])
    with pytest.raises(DataError, match="got 2 texts but 1 labels"):
        TextDataset(["a", "b"], [0], ["x"])
    with pytest.raises(DataError, match="label 2 is out of range; expected integers in 0..1"):
        TextDataset(["a"], [2], ["x", "y"])
    with pytest.raises(DataError, match="got 1 texts but 2 groups"):
        TextDataset(["a"], [0], ["x"], groups=["g", "h"])
