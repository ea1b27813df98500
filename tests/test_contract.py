"""The contract every registered method keeps, checked on a tiny Llama."""
import dataclasses
import json

import pytest
import torch

from peftkit import (AdapterConfig, IA3Config, LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig,
                     PromptEncoderConfig, PromptTuningConfig, SelectiveConfig, get_peft_model, registered_types)
from peftkit.config import lookup
from conftest import randomize_adapters, tiny_llama

# Every registered method needs examples here; a method added without them fails test_every_method_has_examples.
EXAMPLES = {
    "LORA": {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "lora-all-linear-dropout": LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1),
        "dora": LoraConfig(r=4, target_modules="all-linear", use_dora=True),
        "rslora-patterns": LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=r".*\.(q|k|v|o)_proj",
                                      rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}),
        "embedding-bias": LoraConfig(r=4, target_modules=["embed_tokens", "down_proj"], bias="lora_only"),
        "layers": LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"),
    },
    "IA3": {
        "ia3-llama-defaults": IA3Config(),  # k_proj, v_proj scaled at the output; down_proj at the input
        "ia3-regex-layers": IA3Config(target_modules=r".*\.(q_proj|up_proj|down_proj)", feedforward_modules=r".*up_proj",
                                      layers_to_transform=[0], layers_pattern="layers"),
        "ia3-all-linear-two-ff": IA3Config(target_modules="all-linear", feedforward_modules=["o_proj", "down_proj"]),
    },
    "BOTTLENECK": {
        "houlsby": AdapterConfig(adapter_type="houlsby", bottleneck_size=4),  # after self_attn and mlp
        "pfeiffer": AdapterConfig(adapter_type="pfeiffer", reduction_factor=8, non_linearity="gelu"),
        "parallel": AdapterConfig(adapter_type="parallel", bottleneck_size=4, scaling=2.0, non_linearity="silu"),
        "parallel-attn-layers": AdapterConfig(adapter_type="parallel", attn_modules=["self_attn"], bottleneck_size=3,
                                              non_linearity="tanh", layers_to_transform=[1], layers_pattern="layers"),
    },
    "PROMPT_TUNING": {
        "prompt-random": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prompt-sample-vocab": PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
    },
    "P_TUNING": {
        "ptuning-mlp": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        "ptuning-lstm": PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM",
                                            encoder_hidden_size=8, encoder_num_layers=1),
    },
    "PREFIX_TUNING": {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix-projection": PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8),
    },
    "SELECTIVE": {  # magnitude needs no calibration data (test_selective.py covers the data criteria)
        "selective-element": SelectiveConfig(criterion="magnitude", budget=0.05),
        "selective-row-per-module": SelectiveConfig(criterion="magnitude", budget=0.1, granularity="row",
                                                    ranking="per_module", target_modules=["q_proj", "down_proj"]),
        "selective-module": SelectiveConfig(criterion="magnitude", budget=0.2, granularity="module"),
    },
}
CASES = [(t, k) for t in EXAMPLES for k in EXAMPLES[t]]


def test_every_method_has_examples():
    assert sorted(EXAMPLES) == registered_types()


def _make(case):
    peft_type, key = case
    return get_peft_model(tiny_llama(), EXAMPLES[peft_type][key])


def _adapter_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(params=CASES, ids=[f"{t}-{k}" for t, k in CASES])
def case(request):
    return request.param


def _acts_on_inputs(case):
    # prompt methods add virtual tokens: the output cannot be unchanged at init, and their logits are longer
    return lookup(case[0])[1].acts_on_inputs


def test_output_unchanged_at_init(case, ids):
    base_out = tiny_llama()(ids).logits
    model = _make(case)
    if _acts_on_inputs(case):  # instead: training leaves every base weight exactly as it was
        before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
        test_one_step_changes_only_adapter(case, ids, model)
        assert all(torch.equal(p, before[n]) for n, p in model.base_model.named_parameters())
        return
    torch.testing.assert_close(model(ids).logits, base_out, atol=1e-6, rtol=0)


def test_only_adapter_parameters_trainable(case):
    model = _make(case)
    trainable = _adapter_names(model)
    assert trainable, "nothing is trainable"
    config = model.peft_config["default"]
    for name in trainable:
        adapter_named = "lora_" in name or "ia3_l" in name or ".adapter_" in name  # .adapter_down / .adapter_up
        adapter_named = adapter_named or name.startswith("prompt_modules.")  # virtual tokens, P-tuning encoder
        adapter_named = adapter_named or ".selective_values." in name
        assert adapter_named or (config.bias != "none" and name.endswith("bias")), name
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_one_step_changes_only_adapter(case, ids, model=None):
    model = (model or _make(case)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= _adapter_names(model)


def test_save_load_reproduces_outputs(case, ids, tmp_path):
    model = _make(case)
    randomize_adapters(model)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference load must be frozen"
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    # a P-tuning / prefix checkpoint holds the encoder's output, so a loaded one trains its embeddings directly
    encoders = ("_head.", ".transform.")  # P-tuning's mlp_head / lstm_head, prefix tuning's transform
    assert _adapter_names(trainable) == {n for n in _adapter_names(model) if not any(e in n for e in encoders)}


def _mergeable(case):
    # a method object says mergeable = False when no weight update equals it (a nonlinear bottleneck adapter)
    return lookup(case[0])[1].mergeable


def _assert_merge_refused(model, ids, expected):
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)  # nothing was half-merged
    plain = model.unload()  # removing without merging still works
    torch.testing.assert_close(plain(ids).logits, tiny_llama()(ids).logits, atol=1e-6, rtol=0)


def test_merged_equals_unmerged(case, ids):
    model = _make(case)
    randomize_adapters(model)
    expected = model(ids).logits
    if not _mergeable(case):
        return _assert_merge_refused(model, ids, expected)
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload()
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_disabled_equals_base(case, ids):
    base_out = tiny_llama()(ids).logits
    model = _make(case)
    randomize_adapters(model)
    assert not torch.allclose(model(ids).logits[:, -ids.shape[1]:], base_out, atol=1e-4)  # past any virtual tokens
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_out, atol=1e-6, rtol=0)
        with model.disable_adapter():  # nested (a library's reference pass inside the user's block)
            pass
        torch.testing.assert_close(model(ids).logits, base_out, atol=1e-6, rtol=0)  # the outer block still holds
    assert not torch.allclose(model(ids).logits[:, -ids.shape[1]:], base_out, atol=1e-4)
    if not _mergeable(case):
        return  # test_merged_equals_unmerged checks that merging refuses
    model.merge_adapter()
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        torch.testing.assert_close(model(ids).logits, base_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(ids).logits, base_out, atol=1e-4), "merge must come back after the block"


def test_config_json_round_trip(case, tmp_path):
    model = _make(case)
    config = model.peft_config["default"]
    again = PeftConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert type(again) is type(config) and dataclasses.asdict(again) == dataclasses.asdict(config)
    config.save_pretrained(str(tmp_path))
    assert PeftConfig.from_pretrained(tmp_path) == config
