"""peftkit compare: forgetting measures, one variant in a subprocess, and a whole comparison on a tiny model."""
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification

from cli_assets import save_tiny_model, write_data
from peftkit import compare
from peftkit.cli import main

TRAIN = ["--max-steps", "1", "--epochs", "1", "--batch-size", "8"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads cost more than they save


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {"root": root, "model": save_tiny_model(str(root / "model")), "data": write_data(str(root / "data"))}


def test_general_text_paragraphs():
    paragraphs = compare.general_paragraphs()
    with open(compare.GENERAL_TEXT, encoding="utf-8") as fh:
        blocks = [b for b in fh.read().split("\n\n") if b.strip()]
    assert len(paragraphs) == len(blocks) >= 5 and all(p and "\n\n" not in p for p in paragraphs)


def test_forgetting_measures():
    assert compare.forgetting({"loss": 2.0}, {"loss": 2.5}) == pytest.approx(0.5)
    same = torch.randn(4, 8)
    assert compare.forgetting({"embeddings": same}, {"embeddings": same}) == pytest.approx(0.0, abs=1e-6)
    assert compare.forgetting({"embeddings": same}, {"embeddings": -same}) == pytest.approx(2.0)


def test_representation_drift_of_an_encoder(assets):
    # an encoder classifier has no LM head: drift of its mean-pooled last hidden states
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    paragraphs = compare.general_paragraphs()[:3]
    before = compare.general_probe(model, tokenizer, "seq-cls", paragraphs)
    assert before["embeddings"].shape == (3, 16)
    assert compare.forgetting(before, compare.general_probe(model, tokenizer, "seq-cls", paragraphs)) == pytest.approx(
        0.0, abs=1e-6)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(torch.randn(16, 32))
    drift = compare.forgetting(before, compare.general_probe(model, tokenizer, "seq-cls", paragraphs))
    assert 0.0 < drift < 2.0


def _lm_loss(model_dir: str, paragraphs: list) -> float:
    # an independent token-weighted mean NLL over the paragraphs
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    total = count = 0
    with torch.no_grad():
        for text in paragraphs:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_compare_full_and_two_methods_with_low_data(assets, capsys):
    out = assets["root"] / "cmp"
    code = main(["compare", "--model", assets["model"], "--dataset", assets["data"], "--methods", "full,lora,ia3",
                 "--low-data", "8", "--output-dir", str(out), "--in-process", "--method-lr", "ia3=0.02", *TRAIN])
    assert code == 0, capsys.readouterr().err
    assert "Writing model shards" not in (out / "full.log").read_text()  # transformers' bar, noise in a --quiet run
    result = json.loads((out / "compare.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["method_lr"] == {"ia3": 0.02} and "ia3 lr 0.02" in (out / "compare.md").read_text()
    for variant in ("ia3", "ia3-n8"):  # each IA3 run trained at its own rate, the others at the shared one
        assert json.loads((out / variant / "job.json").read_text())["train"]["lr"] == 0.02
    assert json.loads((out / "lora" / "job.json").read_text())["train"]["lr"] != 0.02
    assert list(rows) == ["full", "lora", "ia3", "full-n8", "lora-n8", "ia3-n8"]
    assert result["forgetting_kind"] == "lm_loss_delta"
    full, lora, ia3 = rows["full"], rows["lora"], rows["ia3"]
    assert full["trainable_params"] == full["total_params"] == lora["total_params"] - lora["trainable_params"]
    assert 0 < ia3["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    assert full["checkpoint_bytes"] > lora["checkpoint_bytes"] > ia3["checkpoint_bytes"] > 0
    assert rows["lora-n8"]["n_train"] == 8 and full["n_train"] == 24
    for row in rows.values():
        assert row["test_metric"] == "accuracy" and 0.0 <= row["test_value"] <= 1.0
        assert row["wall_time_s"] > 0 and row["peak_rss_bytes"] > 0 and math.isfinite(row["forgetting"])
    paragraphs = compare.general_paragraphs()
    expected = _lm_loss(str(out / "full" / "model"), paragraphs) - _lm_loss(assets["model"], paragraphs)
    assert full["forgetting"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    text = (out / "compare.md").read_text()
    for aspect in ("objective", "data", "time", "resources", "parameters changed", "outcome"):
        assert f"| {aspect} |" in text
    assert "with 8 examples" in text and (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["compare", "--model", assets["model"], "--dataset", assets["data"], "--output-dir", str(out)])
    assert code == 2 and "already holds a comparison" in capsys.readouterr().err


def test_one_variant_in_a_subprocess_reports_its_own_peak_memory(assets):
    job = {"model": assets["model"], "method": "lora", "peft": {"r": 2},
           "data": {"dataset": assets["data"]}, "train": {"max_steps": 1, "epochs": 1, "batch_size": 8}}
    directory = str(assets["root"] / "sub" / "lora")
    os.makedirs(os.path.dirname(directory))
    ballast = bytearray(1536 * 2**20)  # this process holds 1.5 GiB when it starts the child
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touched: resident
    measured = compare.run_variant(job, directory, directory + ".log")
    del ballast
    assert measured["returncode"] == 0, open(directory + ".log").read()
    # a python with torch loaded: the child's own RSS, not the 1.5 GiB it was forked from (ru_maxrss counts those)
    assert 50 * 2**20 < measured["peak_rss_bytes"] < 1280 * 2**20
    assert json.loads(open(os.path.join(directory, "summary.json")).read())["job"]["peft"] == {"r": 2}


def test_compare_refuses_bad_methods(capsys):
    assert main(["compare", "--methods", "full,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "full,lora", "--r", "0"], "variant 'lora': LoRA rank must be a positive integer: r=0"),
    (["--methods", "lora,LoRA"], "--methods names ['lora'] more than once"),
    (["--methods", "lora", "--max-train-samples", "8", "--low-data", "16"], "--low-data 16 is not below --max-train-samples 8"),
    (["--methods", "lora,prefix_tuning", "--gradient-checkpointing"], "variant 'prefix_tuning': prefix tuning feeds"),
])
def test_every_variant_is_checked_before_the_first_trains(assets, tmp_path, capsys, argv, needle):
    """These were found when their variant's turn came (after others had trained), or not at all."""
    out = tmp_path / "cmp"
    code = main(["compare", "--model", assets["model"], "--dataset", assets["data"], "--max-steps", "1", "--epochs", "1",
                 "--in-process", "--output-dir", str(out), *argv])
    assert code == 2 and needle in capsys.readouterr().err and not out.exists()


def test_method_flags_go_to_the_methods_that_have_them(capsys):
    assert compare.peft_for("lora", {"r": 4, "target_modules": ["q"], "feedforward_modules": ["f"]}) == {
        "r": 4, "target_modules": ["q"]}
    assert compare.peft_for("ia3", {"r": 4, "target_modules": ["q"], "feedforward_modules": ["f"]}) == {
        "target_modules": ["q"], "feedforward_modules": ["f"]}
    assert compare.peft_for("full", {"r": 4}) == {}
    assert main(["compare", "--methods", "full,ia3", "--r", "4"]) == 2
    assert "['r'] belong to none of the compared methods" in capsys.readouterr().err


def test_variant_job_sets_method_size_and_learning_rate():
    job = {"model": "m", "method": "lora", "peft": {"r": 4, "feedforward_modules": ["f"]},
           "data": {"max_train_samples": 500}, "train": {"lr": 1e-3}}
    lrs = {"full": 1e-5, "ia3": 1e-2}
    lora = compare.variant_job(job, "lora", None, lrs)
    assert lora["peft"] == {"r": 4} and lora["train"]["lr"] == 1e-3 and lora["data"]["max_train_samples"] == 500
    full = compare.variant_job(job, "full", 8, lrs)
    assert full["peft"] == {} and full["train"]["lr"] == 1e-5 and full["data"]["max_train_samples"] == 8
    assert compare.variant_job(job, "ia3", None, lrs)["train"]["lr"] == 1e-2
    assert job["train"]["lr"] == 1e-3  # the shared job is left alone


@pytest.mark.parametrize("given, message", [
    (["ia3"], "write METHOD=LR with a positive learning rate"),
    (["ia3=fast"], "write METHOD=LR with a positive learning rate"),
    (["ia3=-1e-3"], "write METHOD=LR with a positive learning rate"),
    (["prompt=1e-2"], "'prompt' is not among the compared methods"),
    (["ia3=1e-2", "IA3=2e-2"], "a learning rate twice"),
    (["full=1e-4"], "a learning rate twice"),  # with --full-lr as well
])
def test_method_lr_is_checked_before_any_training(given, message, capsys):
    argv = ["compare", "--methods", "full,lora,ia3", "--full-lr", "1e-5", "--method-lr", *given]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_method_lrs_merge_full_lr_and_per_method_values():
    import argparse
    args = argparse.Namespace(full_lr=5e-5, method_lr=["IA3=1e-2", "lora=2e-3"])
    assert compare.method_lrs(args, ["full", "ia3", "lora"]) == {"full": 5e-5, "ia3": 1e-2, "lora": 2e-3}


def test_compare_refuses_to_replace_runs_it_did_not_finish_without_overwrite(assets, tmp_path, capsys):
    """Each variant trains with --overwrite, and the only guard was compare.json: a run of the user's own in
    <output-dir>/lora (or one left by a stopped comparison) was replaced silently."""
    out = tmp_path / "cmp"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "job.json").write_text('{"kept": true}')
    argv = ["compare", "--model", assets["model"], "--dataset", assets["data"], "--max-steps", "1", "--epochs", "1",
            "--in-process", "--methods", "lora", "--output-dir", str(out)]
    assert main(argv) == 2
    assert "already holds runs in ['lora']" in capsys.readouterr().err
    assert (out / "lora" / "job.json").read_text() == '{"kept": true}'
