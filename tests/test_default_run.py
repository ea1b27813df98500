"""The real default run (SmolLM2-135M GGUF, LoRA, bundled complaints data) end to end on a cut-down budget."""
import json
import os

from safetensors.torch import load_file

from peftkit.train import JobConfig, run_job
from peftkit.train.data import bundled_dir, read_file

import train_tiny


def test_default_run_end_to_end_on_a_small_budget(tmp_path):
    data = str(tmp_path / "data")  # the bundled data with 16 validation / test rows, so evaluation is quick
    source = bundled_dir("complaints")
    train_tiny.write_jsonl(os.path.join(data, "train.jsonl"), read_file(os.path.join(source, "train.jsonl")))
    for split in ("validation", "test"):
        train_tiny.write_jsonl(os.path.join(data, f"{split}.jsonl"), read_file(os.path.join(source, f"{split}.jsonl"))[:16])
    job = JobConfig()
    job.data.dataset = data
    job.train.max_steps = 3
    out = str(tmp_path / "run")
    lines = []
    summary = run_job(job, out, progress=False, log=lines.append)

    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "summary.json",
                 "curves.png", "report.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert summary == json.load(open(os.path.join(out, "summary.json")))
    assert summary["data_sizes"] == {"train": 480, "validation": 16, "test": 16}
    assert summary["steps"] == 3 and summary["labels"] == ["complaint", "no complaint"]
    assert 0.0 <= summary["zero_shot"]["accuracy"] <= 1.0 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    # LoRA r=8 on q_proj / v_proj of 30 layers: 30 * 8 * ((576 + 576) + (576 + 192))
    assert summary["trainable_params"] == 30 * 8 * (576 + 576 + 576 + 192)
    assert 130e6 < summary["total_params"] < 140e6
    tensors = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert len(tensors) == 30 * 2 * 2 and summary["checkpoint_bytes"] > 4 * summary["trainable_params"]
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["event"] == "train"] == [3]
    assert all(r["loss"] > 0 for r in rows if r["event"] == "train")
    report = open(os.path.join(out, "report.md")).read()
    assert "smollm2-135m" in report and "curves.png" in report
    assert any("zero-shot" in line for line in lines)
