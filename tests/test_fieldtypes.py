"""Config values are checked against the fields' types: a wrong type fails at once naming the field, and numbers
written as text (YAML 1.1 reads 1e-3 as a string) become numbers."""
import json
import math

import pytest

from peftkit import IA3Config, LoraConfig, PeftConfig
from peftkit.train import JobConfig, TrainConfig


@pytest.mark.parametrize("fields, needle", [
    ({"use_rslora": "false"}, "LoraConfig.use_rslora = 'false' (str) does not fit: it takes a bool; write false without quotes"),
    ({"use_dora": "no"}, "use_dora = 'no' (str)"),
    ({"lora_alpha": float("nan")}, "lora_alpha = nan (float) does not fit: it takes a finite number"),
    ({"lora_dropout": [0.1]}, "lora_dropout = [0.1] (list)"),
    ({"rank_pattern": []}, "rank_pattern = [] (list) does not fit: it takes a dict"),
    ({"layers_to_transform": "zero"}, "layers_to_transform = 'zero' (str)"),
    ({"target_modules": [1, 2]}, "target_modules = [1, 2] (list)"),
])
def test_a_wrong_type_names_the_field(fields, needle):
    with pytest.raises((TypeError, ValueError)) as err:
        LoraConfig(**fields)
    assert needle in str(err.value)


def test_a_saved_config_with_a_text_bool_is_refused_not_read_as_true(tmp_path):
    """"use_rslora": "false" in adapter_config.json was a truthy string: rsLoRA on, outputs silently wrong."""
    data = {**LoraConfig(target_modules=["q_proj"]).to_dict(), "use_rslora": "false"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="use_rslora = 'false'"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_numbers_written_as_text_become_numbers():
    config = LoraConfig(r="8", lora_alpha="1e1", lora_dropout="0.05")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 10.0, 0.05) and isinstance(config.r, int)
    with pytest.raises(ValueError, match=r"LoraConfig.r = '8.5' \(str\)"):
        LoraConfig(r="8.5")  # not a whole number: not an int
    with pytest.raises(ValueError, match="lora_alpha = 'inf'"):
        LoraConfig(lora_alpha="inf")
    assert IA3Config(feedforward_modules=("a", "b")).feedforward_modules is not None  # tuples stand for lists


def test_a_yaml_job_with_lr_1e_3_loads(tmp_path):
    """The README's job file writes lr: 1e-3, which YAML 1.1 reads as the text '1e-3'."""
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: '3'\ndata:\n  max_length: '64'\npeft:\n  r: 4\n")
    job = JobConfig.load(str(path))
    assert job.train.lr == 1e-3 and job.train.epochs == 3 and job.data.max_length == 64
    assert isinstance(job.train.lr, float) and isinstance(job.data.max_length, int)
    for text, needle in (("data:\n  max_train_samples: 10.5\n", "DataConfig.max_train_samples = 10.5 (float)"),
                         ("data: [1]\n", "JobConfig.data = [1] (list)"),
                         ("train:\n  gradient_checkpointing: 'yes'\n", "write true without quotes")):
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            JobConfig.load(str(path))
        assert needle in str(err.value)


def test_numpy_numbers_ranges_and_infinity_are_taken_as_plain_values():
    """Values that worked before the checks: numpy numbers (stored as Python's, so the config writes as JSON), a range,
    and an infinite max_grad_norm (measure the norm, do not clip)."""
    import numpy as np

    config = LoraConfig(r=np.int64(4), lora_alpha=np.float32(16), layers_to_transform=range(2),
                        target_modules=["q_proj"], rank_pattern={"q": np.int64(2)})
    assert (type(config.r), type(config.lora_alpha), config.layers_to_transform) == (int, float, [0, 1])
    assert type(config.rank_pattern["q"]) is int
    json.dumps(config.to_dict())  # numpy numbers would not serialise
    assert TrainConfig(epochs=np.int64(2), max_grad_norm=math.inf).max_grad_norm == math.inf
    assert TrainConfig(max_grad_norm="inf").max_grad_norm == math.inf  # as YAML 1.1 reads max_grad_norm: inf
    with pytest.raises(ValueError, match="max_grad_norm = nan"):
        TrainConfig(max_grad_norm=math.nan)
    for make, needle in ((lambda: LoraConfig(lora_alpha=math.inf), "lora_alpha = inf"),  # only max_grad_norm takes inf
                         (lambda: TrainConfig(lr=math.inf), "lr = inf"),
                         (lambda: LoraConfig(r="+-3"), r"LoraConfig.r = '\+-3' \(str\)")):
        with pytest.raises(ValueError, match=needle):
            make()
    with pytest.raises(ValueError, match=r"alpha_pattern values must be finite numbers, got \{'q': inf\}"):
        LoraConfig(alpha_pattern={"q": math.inf})
    with pytest.raises(ValueError, match="exclude_modules = "):  # a set of mixed types: the field's message
        LoraConfig(exclude_modules={"q_proj", None})
    config = LoraConfig(target_modules=frozenset({"v_proj", "q_proj"}), layers_to_transform=frozenset({1, 0}))
    assert (config.target_modules, config.layers_to_transform) == (["q_proj", "v_proj"], [0, 1])
    json.dumps(config.to_dict())


def test_text_for_an_int_or_float_field_keeps_a_whole_number_an_int():
    """auto_budget takes a fraction or a count: "1" is a count of one (as 1.0 it meant every module)."""
    assert LoraConfig(target_modules="auto", auto_budget="1").auto_budget == 1
    assert LoraConfig(target_modules="auto", auto_budget="0.5").auto_budget == 0.5
    assert TrainConfig(seed="12345678901234567891").seed == 12345678901234567891  # exactly, not through a float
