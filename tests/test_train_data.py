"""Data loading, splitting, bad-input errors, tokenisation / collation and metrics of peftkit.train."""
import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from peftkit.train import DataConfig, load_splits
from peftkit.train.data import collate, encode, label_ids, read_file
from peftkit.train.metrics import accuracy, macro_f1

from train_tiny import label_dir, label_rows, tokenizer, write_jsonl

ROWS = label_rows(10)  # 20 rows, two classes


def _write(path: str, rows: list[dict]) -> str:
    kind = os.path.splitext(path)[1]
    if kind in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="," if kind == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == ".json":
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh)
    elif kind == ".jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_each_format_reads_the_same_rows(tmp_path, ext):
    path = _write(str(tmp_path / f"data{ext}"), ROWS)
    assert read_file(path) == ROWS


def test_json_lines_in_a_json_file_and_column_dict(tmp_path):
    path = write_jsonl(str(tmp_path / "lines.json"), ROWS)
    assert read_file(path) == ROWS
    columns = tmp_path / "cols.json"
    columns.write_text(json.dumps({"text": [r["text"] for r in ROWS], "text_label": [r["text_label"] for r in ROWS]}))
    assert read_file(str(columns)) == ROWS


def test_single_file_is_split_by_ratios(tmp_path):
    path = _write(str(tmp_path / "all.csv"), ROWS)
    splits = load_splits(DataConfig(dataset=path, validation_ratio=0.2, test_ratio=0.1, seed=3))
    assert {k: len(v) for k, v in splits.items()} == {"train": 14, "validation": 4, "test": 2}
    texts = [r["text"] + r["text_label"] for s in splits.values() for r in s]
    assert sorted(texts) == sorted(r["text"] + r["text_label"] for r in ROWS)  # a partition: nothing lost or doubled
    again = load_splits(DataConfig(dataset=path, validation_ratio=0.2, test_ratio=0.1, seed=3))
    assert again == splits


def test_directory_with_named_splits_and_missing_test(tmp_path):
    _write(str(tmp_path / "train.parquet"), ROWS)
    _write(str(tmp_path / "dev.tsv"), ROWS[:4])
    splits = load_splits(DataConfig(dataset=str(tmp_path), test_ratio=0.25))
    assert len(splits["validation"]) == 4 and len(splits["test"]) == 5 and len(splits["train"]) == 15


def test_explicit_files_and_max_train_samples(tmp_path):
    root = label_dir(str(tmp_path))
    data = DataConfig(train_file=os.path.join(root, "train.jsonl"), validation_file=os.path.join(root, "test.jsonl"),
                      test_file=os.path.join(root, "test.jsonl"), max_train_samples=5)
    splits = load_splits(data)
    assert len(splits["train"]) == 5 and len(splits["validation"]) == 6


def test_bundled_complaints_loads():
    splits = load_splits(DataConfig())
    assert all(len(v) > 50 for v in splits.values())
    assert {r["text_label"] for r in splits["train"]} == {"complaint", "no complaint"}


def test_missing_column_lists_the_existing_ones(tmp_path):
    path = _write(str(tmp_path / "a.csv"), [{"sentence": "x", "label": "1"}, {"sentence": "y", "label": "0"}] * 5)
    with pytest.raises(ValueError, match=r"column 'text' is missing.*\['label', 'sentence'\]"):
        load_splits(DataConfig(dataset=path))


def test_empty_and_single_class_and_unseen_labels(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="training data is empty"):
        load_splits(DataConfig(dataset=str(empty)))
    one = _write(str(tmp_path / "one.csv"), [{"text": "a", "text_label": "complaint"}] * 10)
    with pytest.raises(ValueError, match=r"single class \['complaint'\]"):
        load_splits(DataConfig(dataset=one))
    root = label_dir(str(tmp_path / "d"))
    write_jsonl(os.path.join(root, "test.jsonl"), [{"text": "x", "text_label": "praise"}])
    with pytest.raises(ValueError, match=r"test split has labels never seen in training: \['praise'\]"):
        load_splits(DataConfig(dataset=root))


def test_bad_paths_and_config_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(DataConfig(dataset="./nope/data.csv"))
    with pytest.raises(ValueError, match="use one of the extensions"):
        read_file(str(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("a") else "")
    with pytest.raises(ValueError, match="task 'clf' is not one of"):
        DataConfig(task="clf")
    with pytest.raises(ValueError, match="no {text} placeholder"):
        DataConfig(prompt_template="Label:")
    with pytest.raises(ValueError, match="unknown DataConfig field"):
        DataConfig.from_dict({"datset": "x"})


def test_hub_name_without_datasets_or_network_is_a_clear_error():
    with pytest.raises(ValueError, match="local file|online"):
        load_splits(DataConfig(dataset="some-org-xyz/not-a-dataset-peftkit"))


def test_hub_dataset_splits_are_mapped_by_name(monkeypatch):
    """A `datasets` name (no hub here: a stand-in module with load_dataset) gives train / validation / test, the
    'dev' split taken as validation, each row a plain dict."""
    import sys
    import types

    rows = {"train": [{"text": f"t{i}", "text_label": ["a", "b"][i % 2]} for i in range(12)],
            "dev": [{"text": "d", "text_label": "a"}], "test": [{"text": "x", "text_label": "b"}]}
    calls = []

    def load_dataset(name):
        calls.append(name)
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    splits = load_splits(DataConfig(dataset="some-org/some-set"))
    assert calls == ["some-org/some-set"]
    assert splits["train"] == rows["train"] and splits["validation"] == rows["dev"] and splits["test"] == rows["test"]
    rows.pop("train")
    with pytest.raises(ValueError, match="has no train split"):
        load_splits(DataConfig(dataset="some-org/some-set"))


def test_causal_label_encoding_masks_all_but_label_tokens():
    tok = tokenizer()
    data = DataConfig(prompt_template="message : {text} label :")
    ex = encode({"text": "my order was late", "text_label": "no complaint"}, tok, data)
    target = label_ids(tok, "no complaint")
    assert target == tok(" no complaint", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"][-3:] == target and ex["labels"][-3:] == target
    assert set(ex["labels"][:-3]) == {-100} and len(ex["labels"]) == len(ex["input_ids"])


def test_collate_left_pads_causal_and_positions_start_at_zero():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0, "sft")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    right = collate([{"input_ids": [5, 6], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}], 0, "seq2seq")
    assert right["input_ids"].tolist() == [[5, 6], [8, 0]] and right["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_truncation_keeps_the_prompt_end_and_the_label():
    tok = tokenizer()
    data = DataConfig(prompt_template="message : {text} label :", max_length=10)
    ex = encode({"text": "my order was late " * 5, "text_label": "complaint"}, tok, data)
    assert len(ex["input_ids"]) == 10
    assert tok.decode(ex["input_ids"][-4:-2]) == "label :"


def test_token_cls_tags_first_subtoken_only():
    tok = tokenizer()
    data = DataConfig(task="token-cls", label_column="tags")
    row = {"text": ["my", "order", "late"], "tags": ["O", "B", "O"]}
    ex = encode(row, tok, data, {"O": 0, "B": 1})
    assert ex["labels"] == [0, 1, 0]


def test_accuracy_and_macro_f1_by_hand():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(preds, golds) == pytest.approx(4 / 6)
    # a: tp2 fp0 fn1 -> 4/5; b: tp1 fp1 fn1 -> 2/4; c: tp1 fp1 fn0 -> 2/3
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert torch.isclose(torch.tensor(macro_f1(["x"], ["y"])), torch.tensor(0.0))


def test_blank_or_null_labels_name_their_row_and_split_as_read(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[6]["text_label"] = ""  # an empty CSV cell: not a class of its own
    path = _write(str(tmp_path / "blank.csv"), rows)
    with pytest.raises(ValueError, match=r"row 7 of the train split has no value in 'text_label' \(empty or null; 1"):
        load_splits(DataConfig(dataset=path))
    rows[6]["text_label"] = None
    path = _write(str(tmp_path / "null.jsonl"), rows)  # one file: carved later, but the row is the file's own
    with pytest.raises(ValueError, match=r"row 7 of the train split has no value in 'text_label'"):
        load_splits(DataConfig(dataset=path))


def test_nested_values_and_unfillable_templates_are_refused_before_the_load(tmp_path):
    """A list label became the class "['complaint']" and a list text its Python repr; a template with another
    brace failed per row with "missing key", after the model had loaded."""
    for column, value in (("text_label", ["complaint"]), ("text", {"a": 1})):
        rows = [dict(r) for r in ROWS]
        rows[3][column] = value
        with pytest.raises(ValueError, match=f"row 4 of the train split holds a {type(value).__name__} in '{column}'"):
            load_splits(DataConfig(dataset=_write(str(tmp_path / f"{column}.jsonl"), rows)))
    for template in ("say {text} {oops}", "say {text} {", "say {text} {0}", "{text.upper}", "{text[0]}",
                     "{text:{text}}"):  # ({text.upper} put "<built-in method upper ...>" into every prompt)
        with pytest.raises(ValueError, match="(cannot be filled in|has the field {.+}).*write a literal brace as"):
            DataConfig(prompt_template=template)
    assert DataConfig(prompt_template="say {text} {{as is}}").template().format(text="x") == "say x {as is}"
    # '{{text}}' is the literal "{text}" (every row rendered the same); a format spec is a placeholder all the same
    with pytest.raises(ValueError, match="has no {text} placeholder"):
        DataConfig(prompt_template="say {{text}}")
    assert DataConfig(prompt_template="say {text:.3}!").template().format(text="abcdef") == "say abc!"


def test_a_given_but_empty_evaluation_file_is_an_error_not_replaced(tmp_path):
    root = label_dir(str(tmp_path))
    open(os.path.join(root, "validation.jsonl"), "w").close()
    data = DataConfig(train_file=os.path.join(root, "train.jsonl"), validation_file=os.path.join(root, "validation.jsonl"),
                      test_file=os.path.join(root, "test.jsonl"))
    with pytest.raises(ValueError, match="the validation split is empty"):
        load_splits(data)


def test_whole_number_float_labels_match_integer_labels(tmp_path):
    # a label column with gaps becomes float in pandas / parquet: 1.0 is the class 1
    train = [{"text": r["text"], "label": i % 2} for i, r in enumerate(ROWS)]
    test = [{"text": r["text"], "label": float(i % 2)} for i, r in enumerate(ROWS[:6])]
    _write(str(tmp_path / "train.jsonl"), train)
    _write(str(tmp_path / "test.parquet"), test)
    splits = load_splits(DataConfig(dataset=str(tmp_path), label_column="label"))
    assert {r["label"] for r in splits["test"]} == {"0", "1"} == {r["label"] for r in splits["train"]}


def test_a_zero_ratio_with_no_such_split_is_an_error(tmp_path):
    path = _write(str(tmp_path / "all.jsonl"), ROWS)
    with pytest.raises(ValueError, match="test_ratio is 0 and the data has no test split"):
        load_splits(DataConfig(dataset=path, test_ratio=0.0))
    root = label_dir(str(tmp_path / "d"))  # train + test files: validation_ratio still carves validation
    assert len(load_splits(DataConfig(dataset=root, test_ratio=0.0))["test"]) > 0


def test_malformed_files_name_the_file_and_line(tmp_path):
    """Each malformed file is refused naming where it goes wrong; none is read into wrong rows."""
    cases = {
        # an unquoted comma: the text's tail became the label (a class of its own)
        "extra.csv": ("text,label\ngood food,pos\nrude, slow driver,neg\n", r"extra.csv, line 3: 3 fields under a header of 2"),
        "latin1.csv": (b"text,label\ncaf\xe9 ok,pos\n", r"latin1.csv is not UTF-8 text \(line 2"),
        "bad.jsonl": ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r"bad.jsonl, line 2: not valid JSON"),
        "ints.json": ("[1, 2, 3]", r"ints.json, row 1: a row must be an object of column values, not a JSON int"),
        # columns of unequal length were cut to the shortest; one row object was zipped character by character
        "uneven.json": (json.dumps({"text": ["a", "b", "c"], "label": ["x", "y"]}), r"uneven.json: a JSON object must map "
                        r"each column to a list of its values, all of one length \(got \{'text': 3, 'label': 2\}\)"),
        "one.json": (json.dumps({"text": "a", "label": "x"}), r"for one row, put the object in a list"),
        "unclosed.csv": ('text,label\n"never closed,pos\n' + "x" * 140000 + "\n", r"unclosed.csv, line \d+: field larger"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=needle):
            read_file(str(path))


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,pos\n".encode("utf-8"))
    assert read_file(str(path)) == [{"text": "hello", "label": "pos"}]


def test_a_nan_label_is_no_value_not_a_class(tmp_path):
    path = str(tmp_path / "train.parquet")
    rows = label_rows(4)
    labels = [1.0, 0.0] * 4
    labels[3] = float("nan")
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "label": labels}), path)
    with pytest.raises(ValueError, match=r"row 4 of the train split has no value in 'label'"):
        load_splits(DataConfig(dataset=path, task="seq-cls", label_column="label"))


def test_only_real_line_breaks_end_rows(tmp_path):
    """csv and JSON Lines end lines at \\n (or \\r\\n); a form feed or U+2028 inside a text is part of it."""
    text = "first\u2028second \x0c third"
    (tmp_path / "t.csv").write_text(f"text,label\n{text},pos\nplain,neg\n", encoding="utf-8")
    assert read_file(str(tmp_path / "t.csv")) == [{"text": text, "label": "pos"}, {"text": "plain", "label": "neg"}]
    line = json.dumps({"text": text, "label": "pos"}, ensure_ascii=False)
    (tmp_path / "t.jsonl").write_text(line + "\r\n" + line + "\n", encoding="utf-8")
    assert read_file(str(tmp_path / "t.jsonl")) == [{"text": text, "label": "pos"}] * 2
