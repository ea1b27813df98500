"""report.py: curves PNG, report.md from a run summary, and the compare outputs, from hand-made data."""
import json
import os
import sys

import pytest

from peftkit import report

SUMMARY = {  # the keys run_job writes
    "trainable_params": 896, "total_params": 20512, "trainable_pct": 4.3682, "data_sizes": {"train": 24,
    "validation": 6, "test": 6}, "model": "tiny", "method": "lora", "task": "causal-label",
    "zero_shot": {"accuracy": 0.5, "macro_f1": 0.3333, "n": 6}, "test": {"accuracy": 0.8333, "macro_f1": 0.8, "n": 6},
    "steps": 4, "wall_time_s": 20.57, "peak_memory_mb": 413.3, "peak_memory_bytes": 433377075,
    "checkpoint_bytes": 5120, "adapter_bytes": 5120, "job": {"model": "tiny", "method": "lora", "peft": {"r": 4}},
}
ROWS = ([{"event": "train", "step": s, "epoch": s / 10, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0}
         for s in range(1, 11)]
        + [{"event": "eval", "split": "validation", "step": s, "epoch": s / 10, "accuracy": a, "macro_f1": a, "n": 6}
           for s, a in ((5, 0.5), (10, 0.75))]
        + [{"event": "eval", "split": "test", "phase": "zero-shot", "step": 0, "accuracy": 0.5, "n": 6}])


def test_split_rows_keeps_training_losses_and_validation_evaluations():
    train, valid = report.split_rows(ROWS)
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["accuracy"] for r in valid] == [0.5, 0.75]  # the test rows are not curves


def test_curves_png_is_written_atomically(tmp_path):
    import matplotlib.image

    path = tmp_path / "curves.png"
    report.write_curves_png(ROWS, path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400  # two panels side by side
    assert os.listdir(tmp_path) == ["curves.png"]  # no temp file left behind
    report.write_curves_png([], tmp_path / "empty.png")  # nothing logged yet: still a valid (empty) figure
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'peftkit\[demo\]'"):
        report.write_curves_png(ROWS, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_report_md_has_every_section(tmp_path):
    path = tmp_path / "report.md"
    report.write_report_md(SUMMARY, path)
    text = path.read_text()
    assert "| trainable parameters | 896 of 20,512 (4.368 %) |" in text
    assert "| data sizes | train 24, validation 6, test 6 |" in text
    assert "| accuracy | 0.5 | 0.8333 |" in text and "| n |" not in text  # zero-shot next to fine-tuned
    assert "| wall time | 20.57 s |" in text and "| adapter size | 5.00 KiB |" in text
    assert "| peak memory | 413.30 MiB |" in text
    assert "![loss and validation metrics](curves.png)" in text and "r: 4" in text


def test_report_md_says_which_steps_weights_were_saved():
    """"steps 100" read as the adapter after 100 steps, where keep_best saved step 50's."""
    best = {**SUMMARY, "steps": 100, "best_step": 50}
    assert "| steps | 100 (the saved weights are step 50's, the best validation) |" in report.report_markdown(best)
    last = {**best, "job": {**SUMMARY["job"], "train": {"keep_best": False}}}
    assert "| steps | 100 |" in report.report_markdown(last)
    assert "| steps | 4 |" in report.report_markdown({**SUMMARY, "best_step": 4})


def test_report_md_tolerates_missing_keys(tmp_path):
    report.write_report_md({"zero_shot": None}, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| model | n/a |" in text and "| wall time | n/a |" in text and "No test metrics recorded." in text


def test_formatting():
    assert report.fmt_bytes(1536) == "1.50 KiB" and report.fmt_bytes(3 * 2**20) == "3.00 MiB"
    assert report.fmt_bytes(None) == "n/a" and report.fmt(12345) == "12,345" and report.fmt(0.123456) == "0.1235"


def _result():
    rows = [{"variant": "full", "method": "full", "max_train_samples": None, "n_train": 100, "wall_time_s": 10.0,
             "peak_rss_bytes": 4 * 2**30, "checkpoint_bytes": 2**30, "trainable_params": 1000, "total_params": 1000,
             "test_metric": "accuracy", "test_value": 0.9, "forgetting": 0.2},
            {"variant": "lora", "method": "lora", "max_train_samples": None, "n_train": 100, "wall_time_s": 5.0,
             "peak_rss_bytes": 2 * 2**30, "checkpoint_bytes": 2**20, "trainable_params": 10, "total_params": 1010,
             "test_metric": "accuracy", "test_value": 0.85, "forgetting": 0.01},
            {"variant": "lora-n8", "method": "lora", "max_train_samples": 8, "low_data": True, "n_train": 8, "wall_time_s": 1.0,
             "peak_rss_bytes": 2 * 2**30, "checkpoint_bytes": 2**20, "trainable_params": 10, "total_params": 1010,
             "test_metric": "accuracy", "test_value": 0.6, "forgetting": 0.0},
            {"variant": "ia3", "method": "ia3", "max_train_samples": None, "error": "training failed (exit 1)"}]
    return {"model": "tiny", "task": "seq-cls", "dataset": "sst2", "forgetting_kind": "representation_drift",
            "rows": rows, "full_lr": 1e-5, "job": {"train": {"epochs": 1, "lr": 1e-3, "batch_size": 16}}}


def test_compare_tables_fill_the_classic_rows_from_measurements():
    text = report.compare_markdown(_result())
    classic = text[text.index("## PEFT vs conventional"):]
    assert "| aspect | conventional fine-tuning (full) | PEFT: lora |" in classic  # failed ia3 is left out
    assert "| time | 10 s | 5 s (0.50x full) |" in classic
    assert "| parameters changed | 1,000 (100 %) | 10 (0.9901 %) |" in classic
    assert "test accuracy 0.85 (-0.050 vs full); forgetting 0.01" in classic
    assert "100 training examples -> test 0.85; with 8 examples: 0.6" in classic
    assert "checkpoint 1.00 MiB (1/1,024 of full)" in classic and "peak memory 2.00 GiB (0.50x full)" in classic
    assert "forgetting (representation drift" in text and "training failed (exit 1)" in text
    assert "epochs 1, batch_size 16, lr 0.001, full fine-tuning lr 1e-05" in text


def test_write_compare_writes_json_md_png(tmp_path):
    report.write_compare(_result(), str(tmp_path))
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][1]["variant"] == "lora"
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "compare.md").read_text().startswith("# PEFT vs full fine-tuning: tiny on sst2")


def test_write_compare_without_matplotlib_keeps_the_tables_and_warns(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report.write_compare(_result(), str(tmp_path))
    assert (tmp_path / "compare.json").is_file() and (tmp_path / "compare.md").is_file()
    assert not (tmp_path / "compare.png").exists()
    assert "pip install" in capsys.readouterr().err
