"""Checks on the data files shipped in peftkit/data (complaints splits, datasheet, general text)."""

import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(str(importlib.resources.files("peftkit").joinpath("data")))
SPLITS = ("train", "validation", "test")
LABELS = {"complaint", "no complaint"}


def read_split(name: str) -> list[dict]:
    """Parse one complaints split; every non-empty line must be a JSON object."""
    lines = (DATA / "complaints" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def datasheet_counts() -> dict[str, tuple[int, int, int]]:
    """Read the `| split | rows | complaint | no complaint |` table from the datasheet."""
    text = (DATA / "complaints" / "README.md").read_text(encoding="utf-8")
    pattern = r"^\|\s*(train|validation|test|total)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*$"
    return {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(pattern, text, flags=re.M)}


@pytest.mark.parametrize("name", SPLITS)
def test_split_rows_are_well_formed(name: str) -> None:
    rows = read_split(name)
    assert rows, f"{name} is empty"
    for row in rows:
        assert set(row) == {"text", "text_label"}
        assert row["text_label"] in LABELS
        assert isinstance(row["text"], str) and 0 < len(row["text"].strip()) < 400
        assert "\n" not in row["text"]
    labels = Counter(row["text_label"] for row in rows)
    assert set(labels) == LABELS, f"{name} lacks a label: {labels}"
    # Stratified split: each split's complaint share stays near the overall ~45%.
    assert 0.35 < labels["complaint"] / len(rows) < 0.55


def test_sizes_and_no_duplicates() -> None:
    texts = [row["text"].strip().lower() for name in SPLITS for row in read_split(name)]
    assert len(texts) >= 600
    dupes = [t for t, n in Counter(texts).items() if n > 1]
    assert not dupes, f"duplicate texts within or across splits: {dupes[:5]}"


def test_datasheet_counts_match_files() -> None:
    stated = datasheet_counts()
    assert set(stated) == {*SPLITS, "total"}, f"datasheet table rows found: {sorted(stated)}"
    total = Counter()
    for name in SPLITS:
        labels = Counter(row["text_label"] for row in read_split(name))
        actual = (sum(labels.values()), labels["complaint"], labels["no complaint"])
        assert stated[name] == actual, f"datasheet says {stated[name]} for {name}, files have {actual}"
        total.update(labels)
    assert stated["total"] == (sum(total.values()), total["complaint"], total["no complaint"])


def test_general_text_has_enough_paragraphs() -> None:
    text = (DATA / "general_text.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    assert len(paragraphs) >= 30
    assert all(len(p.split()) >= 40 for p in paragraphs)
    # Held-out text for forgetting must not leak the fine-tuning task.
    assert "complain" not in text.lower()
