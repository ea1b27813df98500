"""Data for training: read local files (or a `datasets` name), split, check, tokenise and collate per task.

Rows are plain dicts (one per example) until a batch is collated into padded tensors.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import string
from dataclasses import dataclass
from typing import Optional

import torch

from ..fieldtypes import check_types

TASKS = ("causal-label", "sft", "seq2seq", "seq-cls", "token-cls")
LABEL_TASKS = ("causal-label", "seq-cls")  # tasks whose label column holds one class per row
FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
# The prompt a task uses when DataConfig.prompt_template is None. {text} is the text column.
DEFAULT_TEMPLATES = {
    # short on purpose: every prompt token costs training time; a longer instruction listing the labels measured
    # no better zero-shot on the complaints data (52% vs 48% validation accuracy, SmolLM2-135M-Instruct)
    "causal-label": "Message: {text}\nLabel:",
    "sft": "### Instruction:\n{text}\n\n### Response:\n",
    "seq2seq": "{text}",
}


@dataclass
class DataConfig:
    """Where the data is, which task it is for, and how it becomes model inputs."""

    # "complaints" (the bundled set), a directory with train/validation/test files, one file, or a `datasets` name
    dataset: str = "complaints"
    train_file: Optional[str] = None  # explicit split files (csv/tsv/json/jsonl/parquet); override `dataset`
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    task: str = "causal-label"  # causal-label | sft | seq2seq | seq-cls | token-cls
    text_column: str = "text"  # the input text (sft: the instruction; token-cls: words, a list or a string)
    label_column: str = "text_label"  # the label (sft: the response; token-cls: one tag per word)
    validation_ratio: float = 0.1  # share of train held out when there is no validation split
    test_ratio: float = 0.1  # share of train held out when there is no test split
    max_length: int = 128  # tokens per example; longer inputs are truncated (the prompt's start is cut)
    prompt_template: Optional[str] = None  # causal-label / sft / seq2seq; {text} marks the text; None: task default
    scoring: str = "constrained"  # causal-label: "constrained" (best label by summed log-prob) or "exact" (greedy)
    max_train_samples: Optional[int] = None  # use only this many training rows (low-data runs)
    seed: int = 0  # seeds the split of missing splits and the max_train_samples draw

    def __post_init__(self) -> None:
        check_types(self)
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.scoring not in ("constrained", "exact"):
            raise ValueError(f"scoring {self.scoring!r} must be 'constrained' or 'exact'")
        for name in ("validation_ratio", "test_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.validation_ratio + self.test_ratio >= 1.0:
            raise ValueError("validation_ratio + test_ratio must leave rows for training (sum < 1)")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too small; use at least 8 tokens")
        if self.max_train_samples is not None and self.max_train_samples < 2:
            raise ValueError("max_train_samples must be at least 2 (or None for all rows)")
        if self.prompt_template is not None:
            _check_template(self.prompt_template)

    def template(self) -> str:
        """The prompt template in use."""
        return self.prompt_template if self.prompt_template is not None else DEFAULT_TEMPLATES.get(self.task, "{text}")

    def to_dict(self) -> dict:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        """Build from a dict; unknown keys are refused."""
        return cls(**known_fields(cls, data))


def known_fields(cls: type, data: dict) -> dict:
    """``data`` if every key is a field of dataclass ``cls``; else a ValueError listing the valid fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return dict(data)


# --- reading --------------------------------------------------------------------------------------
def read_file(path: str) -> list[dict]:
    """Rows of one csv / tsv / json / jsonl / parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    kind = FORMATS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"cannot read {path!r}: use one of the extensions {sorted(FORMATS)}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:  # utf-8-sig: a byte-order mark, as spreadsheet programs write, is not part of the first column's name
        with open(path, newline="" if kind in ("csv", "tsv") else None, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        line = _text_line(path, err.start)
        raise ValueError(f"{path} is not UTF-8 text (line {line}, byte {err.start}: {err.reason}); "
                         "save it as UTF-8") from None
    if kind in ("csv", "tsv"):
        return _csv_rows(path, text, "," if kind == "csv" else "\t")
    if kind == "json" and text.lstrip()[:1] in ("[", "{") and not _is_jsonl(text):
        return _json_rows(path, json.loads(text))
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON Lines ends lines at \n only (not U+2028, ...)
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            _check_row(path, rows[-1], f"line {number}")
    return rows


def _text_line(path: str, offset: int) -> int:
    """The 1-based line of byte ``offset`` in the file at ``path``."""
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1


def _csv_rows(path: str, text: str, delimiter: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)  # csv's own line breaks only
    rows = []
    try:
        for row in reader:
            if None in row:  # more fields than the header: DictReader files the rest under None
                raise ValueError(f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields "
                                 f"under a header of {len(reader.fieldnames)}; a text holding the delimiter "
                                 f"({delimiter!r}) must be quoted")
            rows.append(dict(row))
    except csv.Error as err:  # e.g. a field over csv's size limit
        raise ValueError(f"{path}, line {reader.line_num}: {err} (an unclosed quote makes the rest of the file one "
                         "field)") from None
    return rows


def _json_rows(path: str, data) -> list[dict]:
    """The rows of a .json file: a list of row objects, or one object mapping each column to its list of values."""
    if isinstance(data, dict):  # {"column": [values...]}
        lengths = {k: len(v) if isinstance(v, list) else None for k, v in data.items()}
        if None in lengths.values() or len(set(lengths.values())) > 1:
            raise ValueError(f"{path}: a JSON object must map each column to a list of its values, all of one length "
                             f"(got {lengths}); for one row, put the object in a list: [{{...}}]")
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    for index, row in enumerate(data):
        _check_row(path, row, f"row {index + 1}")
    return list(data)


def _check_row(path: str, row, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{path}, {where}: a row must be an object of column values, not a JSON {type(row).__name__} "
                         f"({str(row)[:40]})")


def _is_jsonl(text: str) -> bool:
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError:
        return True


def bundled_dir(name: str) -> str:
    """Directory of a dataset shipped inside peftkit."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", name)


def _split_files(directory: str) -> dict[str, str]:
    files = {}
    for entry in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(entry)
        for split, names in SPLIT_NAMES.items():
            if ext.lower() in FORMATS and stem.lower() in names and split not in files:
                files[split] = os.path.join(directory, entry)
    if "train" not in files:
        raise FileNotFoundError(f"{directory!r} has no train file; name it train.csv / .tsv / .json / .jsonl / "
                                f".parquet (found: {sorted(os.listdir(directory))})")
    return files


def _read_sources(data: DataConfig) -> dict[str, list[dict]]:
    if data.train_file is not None:
        files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
        return {k: read_file(v) for k, v in files.items() if v is not None}
    if data.dataset == "complaints" and not os.path.exists(data.dataset):
        directory = bundled_dir("complaints")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"the bundled complaints data is missing ({directory}); reinstall peftkit")
        return {k: read_file(v) for k, v in _split_files(directory).items()}
    if os.path.isdir(data.dataset):
        return {k: read_file(v) for k, v in _split_files(data.dataset).items()}
    if os.path.isfile(data.dataset):
        return {"train": read_file(data.dataset)}
    return _read_hub(data.dataset)


def _read_hub(name: str) -> dict[str, list[dict]]:
    if os.sep in name and (name.startswith((".", "~", os.sep)) or os.path.splitext(name)[1] in FORMATS):
        raise FileNotFoundError(f"dataset path {name!r} does not exist")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} is not a local file or directory, and the `datasets` package is not "
                         "installed to fetch it from the Hugging Face Hub; pass local files or `pip install datasets`"
                         ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # offline, unknown name, ...: one clear line instead of a traceback
        raise ValueError(f"could not load dataset {name!r} with `datasets` ({type(err).__name__}: {err}); "
                         "it must be a local file/directory, or a Hub dataset with the machine online") from None
    out = {}
    for split, names in SPLIT_NAMES.items():
        for found in loaded:
            if found in names and split not in out:
                out[split] = [dict(row) for row in loaded[found]]
    if "train" not in out:
        raise ValueError(f"dataset {name!r} has no train split (it has {list(loaded)})")
    return out


# --- splitting and checking -----------------------------------------------------------------------
def load_splits(data: DataConfig) -> dict[str, list[dict]]:
    """train / validation / test rows; missing splits are carved from train by the configured ratios."""
    splits = _read_sources(data)
    if not splits.get("train"):
        raise ValueError("the training data is empty; check the file (or the dataset name)")
    for name, rows in splits.items():  # as read, before any carving: rows counted as in the source
        check_columns(rows, data, name)
    train = list(splits["train"])
    rng = random.Random(data.seed)
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        rng.shuffle(train)
        for split in missing:
            ratio = data.validation_ratio if split == "validation" else data.test_ratio
            if ratio == 0:  # a run evaluates on both splits: none to carve is an error, not one silent row
                raise ValueError(f"{split}_ratio is 0 and the data has no {split} split; pass a {split} file or a "
                                 f"{split}_ratio above 0 to hold out part of train")
            count = max(1, round(len(splits["train"]) * ratio))
            if count >= len(train):
                raise ValueError(f"only {len(splits['train'])} training rows: too few to hold out a {split} split; "
                                 f"pass a {split} file")
            splits[split], train = train[:count], train[count:]
    if data.max_train_samples is not None and data.max_train_samples < len(train):
        train = random.Random(data.seed + 1).sample(train, data.max_train_samples)
    splits["train"] = train
    splits = {k: [normalise_row(r, data) for r in splits[k]] for k in ("train", "validation", "test")}
    check_labels(splits, data)  # the columns were checked as read: carving and normalising leave none empty
    return splits


def check_columns(rows: list[dict], data: DataConfig, split: str) -> None:
    """Refuse a split that is empty, lacks the text / label column (listing the columns it has), or has a row
    whose value there is empty (null, or a blank label: an empty CSV cell would become a class of its own)."""
    if not rows:
        raise ValueError(f"the {split} split is empty; give it rows (or drop the file to carve it from train)")
    for column in (data.text_column, data.label_column):
        absent = [i for i, row in enumerate(rows) if column not in row]
        if absent:
            raise ValueError(f"column {column!r} is missing in the {split} split (row {absent[0] + 1}); "
                             f"the data has columns {sorted(rows[absent[0]])}. "
                             "Pick the right ones with --text-column / --label-column")
        blank_ok = column == data.text_column or data.task not in LABEL_TASKS
        empty = [i for i, row in enumerate(rows) if row[column] is None or row[column] != row[column]  # NaN
                 or (not blank_ok and isinstance(row[column], str) and not row[column].strip())]
        if empty:
            raise ValueError(f"row {empty[0] + 1} of the {split} split has no value in {column!r} (empty or null; "
                             f"{len(empty)} such rows in all); fill them in or drop those rows")
        nested = nested_rows(rows, column, data.task)
        if nested:  # str() of it became the text or a class of its own, "['complaint']"
            raise ValueError(f"row {nested[0] + 1} of the {split} split holds a {type(rows[nested[0]][column]).__name__} "
                             f"in {column!r} ({rows[nested[0]][column]!r:.60}); this task takes one text / label per "
                             "row (lists of words and tags are for --task token-cls)")


def check_labels(splits: dict[str, list[dict]], data: DataConfig) -> None:
    """Label tasks: at least two classes in train, and no evaluation label unseen in train."""
    if data.task not in LABEL_TASKS and data.task != "token-cls":
        return
    seen = set(label_set(splits["train"], data))
    if data.task in LABEL_TASKS and len(seen) < 2:
        raise ValueError(f"the training data has a single class {sorted(seen)} in {data.label_column!r}; "
                         "a classifier needs at least two")
    for split in ("validation", "test"):
        unseen = sorted(set(label_set(splits[split], data)) - seen)
        if unseen:
            raise ValueError(f"the {split} split has labels never seen in training: {unseen[:10]}; "
                             f"training has {sorted(seen)[:20]}")


def _check_template(template: str) -> None:
    """A prompt template is filled with str.format(text=...) per row: it must name the field text (a format spec such
    as {text:.200} is fine) and no other. '{{text}}' is a literal "{text}": every row rendered the same."""
    try:
        parsed = [(field, spec) for _, field, spec, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(f"prompt_template {template!r} cannot be filled in ({err}): {{text}} is its only field; "
                         "write a literal brace as {{ or }}") from None
    odd = [f if f != "text" else f"{f}:{spec}" for f, spec in parsed
           if f != "text" or "{" in (spec or "")]  # {text.upper}, {text[0]}, {text:{text}}
    if odd:
        raise ValueError(f"prompt_template {template!r} has the field {{{odd[0]}}}: {{text}} (with a format spec such "
                         "as {text:.200}) is its only field; write a literal brace as {{ or }}")
    fields = [f for f, _ in parsed]
    if "text" not in fields:
        raise ValueError(f"prompt_template {template!r} has no {{text}} placeholder (a doubled {{{{text}}}} is a literal "
                         "brace pair); add one")


def nested_rows(rows: list[dict], column: str, task: str) -> list[int]:
    """Indices of rows holding a list or dict in ``column``, where ``task`` takes one text / label per row."""
    if task == "token-cls":
        return []
    return [i for i, row in enumerate(rows) if isinstance(row.get(column), (list, dict, tuple))]


def normalise_row(row: dict, data: DataConfig) -> dict:
    """Labels as strings (token-cls: words and tags as lists of strings)."""
    row = dict(row)
    text, label = row.get(data.text_column), row.get(data.label_column)
    if data.task == "token-cls":
        if text is not None:
            row[data.text_column] = _as_list(text)
        if label is not None:
            row[data.label_column] = [str(t) for t in _as_list(label)]
            if text is not None and len(row[data.label_column]) != len(row[data.text_column]):
                raise ValueError(f"token-cls row has {len(row[data.text_column])} words but "
                                 f"{len(row[data.label_column])} tags: {row}")
    else:
        if isinstance(label, float) and label.is_integer():  # 1.0 as a table column with gaps writes 1
            label = int(label)
        if label is not None:
            row[data.label_column] = str(label).strip() if data.task in LABEL_TASKS else str(label)
        if text is not None:
            row[data.text_column] = str(text)
    return row


def _as_list(value) -> list:
    if isinstance(value, str):
        return json.loads(value) if value.lstrip().startswith("[") else value.split()
    return list(value)


def label_set(rows: list[dict], data: DataConfig) -> list[str]:
    """Sorted distinct labels (token-cls: tags) of ``rows``."""
    if data.task == "token-cls":
        return sorted({tag for row in rows for tag in row[data.label_column]})
    return sorted({row[data.label_column] for row in rows})


# --- tokenising -----------------------------------------------------------------------------------
def label_ids(tokenizer, label: str) -> list[int]:
    """Token ids the model generates for a label: ' label' then end-of-sequence."""
    return tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prompt_ids(tokenizer, text: str, data: DataConfig, room: int) -> list[int]:
    """Prompt token ids, left-truncated to ``room`` tokens so the cue at its end ("Label:") survives."""
    ids = tokenizer(data.template().format(text=text))["input_ids"]
    return ids[-room:] if len(ids) > room else ids


def encode(row: dict, tokenizer, data: DataConfig, label2id: Optional[dict] = None) -> dict:
    """One training example: input ids and labels (-100 where no loss is taken)."""
    text, label = row[data.text_column], row[data.label_column]
    if data.task in ("causal-label", "sft"):
        target = label_ids(tokenizer, label) if data.task == "causal-label" else (
            tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        target = target[: data.max_length // 2]
        prompt = prompt_ids(tokenizer, text, data, data.max_length - len(target))
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}
    if data.task == "seq2seq":
        source = tokenizer(data.template().format(text=text), truncation=True, max_length=data.max_length)
        target = tokenizer(text_target=label, truncation=True, max_length=data.max_length)
        return {"input_ids": source["input_ids"], "labels": target["input_ids"]}
    if data.task == "seq-cls":
        enc = tokenizer(text, truncation=True, max_length=data.max_length)
        return {"input_ids": enc["input_ids"], "labels": label2id[label]}
    return encode_words(text, label, tokenizer, data, label2id)


def encode_words(words: list[str], tags: list[str], tokenizer, data: DataConfig, label2id: dict) -> dict:
    """token-cls: each word's tag on its first sub-token, -100 on the rest and on special tokens."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data.max_length)
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(-100 if word is None or word == previous else label2id[tags[word]])
        previous = word
    return {"input_ids": enc["input_ids"], "labels": labels}


def collate(examples: list[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: left padding for decoder-only tasks (targets end every row)."""
    left = task in ("causal-label", "sft")
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask = [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        ids.append([pad_id] * pad + e["input_ids"] if left else e["input_ids"] + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(e["input_ids"]) if left else [1] * len(e["input_ids"]) + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if task == "seq-cls":
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    elif left:
        batch["labels"] = torch.tensor([[-100] * (width - len(e["labels"])) + e["labels"] for e in examples])
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    else:  # seq2seq labels have their own length; token-cls labels follow input_ids
        label_width = max(len(e["labels"]) for e in examples)
        batch["labels"] = torch.tensor([e["labels"] + [-100] * (label_width - len(e["labels"])) for e in examples])
    return batch
