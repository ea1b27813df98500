"""PEFT's API as its users write it: peft's config objects, its enums and state-dict functions, its attribute
names and keyword arguments. Each is taken with PEFT's meaning, or refused with a message that says what to do."""
from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch

import peftkit
from conftest import tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")


def test_a_peft_config_object_is_read_as_its_adapter_config():
    """Imports mixed (peft's LoraConfig given to peftkit): it raised AttributeError deep inside (or, for prefix
    tuning, trained and failed at save). It is read as its adapter_config.json would be."""
    theirs = get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    config = theirs.peft_config["default"]
    assert type(config) is LoraConfig and (config.r, config.lora_alpha) == (4, 8)
    assert theirs.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    for bad in ({"r": 4}, None):
        with pytest.raises(TypeError, match="must be a peftkit config such as peftkit.LoraConfig"):
            get_peft_model(tiny_llama(), bad)
    with pytest.raises(ValueError, match="lora_bias"):  # a field peftkit lacks, set: refused as from a file
        get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))


def test_state_dict_functions_match_peft(tmp_path, ids):
    """get_peft_model_state_dict gives peft's keys and values for the same adapter; set_peft_model_state_dict
    loads them into another model, which then gives the same logits; a full state dict can be the source."""
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    want = peft.get_peft_model_state_dict(theirs)
    got = peftkit.get_peft_model_state_dict(ours)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    from_full = peftkit.get_peft_model_state_dict(ours, state_dict=ours.state_dict())
    assert all(torch.equal(from_full[k], want[k]) for k in want)
    fresh = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    assert peftkit.set_peft_model_state_dict(fresh, got) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours(ids).logits)
    wrong = {k: v[:1] if "lora_A" in k else v for k, v in got.items()}
    with pytest.raises(ValueError, match="has shape"):
        peftkit.set_peft_model_state_dict(fresh, wrong)
    assert peftkit.TaskType.CAUSAL_LM == "CAUSAL_LM" and peftkit.PeftType.LORA == ours.peft_type == "LORA"


def test_peft_attribute_names(ids):
    """Names that fell through to the transformers model (AttributeError there): active_peft_config, peft_type,
    modules_to_save, and the disable_adapter_layers / enable_adapter_layers pair (merged adapters unmerged first)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                    modules_to_save=["lm_head"])).eval()
    assert model.active_peft_config is model.peft_config["default"] and model.modules_to_save == {"lm_head"}
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        model.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            model.disable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, base)
        model.enable_adapter_layers()
        torch.testing.assert_close(model(ids).logits, adapted)
    assert not any(layer.merged_adapters for _, layer in peftkit.inject.adapter_layers(model.base_model))


def test_peft_keyword_arguments(tmp_path):
    """PEFT's argument order and keywords: save_pretrained(dir, False) meant safe_serialization (a TypeError here),
    is_main_process=False writes nothing, merge_and_unload(True) is PEFT's progressbar; loading keywords that change
    nothing are taken, the others refused saying why."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "bin", False)
    assert os.path.isfile(tmp_path / "bin" / "adapter_model.bin")
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not os.path.exists(tmp_path / "rank1")
    with pytest.raises(ValueError, match="modules_to_save"):
        model.save_pretrained(tmp_path / "emb", save_embedding_layers=True)
    model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", low_cpu_mem_usage=True, torch_device="cpu",
                                       autocast_adapter_dtype=True)
    loaded.load_adapter(tmp_path / "a", "b", low_cpu_mem_usage=True, torch_device="cpu")
    for kwargs, needle in (({"autocast_adapter_dtype": False}, "float32 adapters"), ({"revision": "v2"}, "local"),
                           ({"ephemeral_gpu_offload": True}, "device_map"), ({"key_mapping": {"a": "b"}}, "key names")):
        with pytest.raises(ValueError, match=needle):
            PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="set_adapter"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), mixed=True)
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert type(model.merge_and_unload(True)).__name__ == "LlamaForCausalLM"


def test_targets_and_prompt_sizes_refused_with_a_way_out():
    """target_modules="q_proj" (a string: a full-name regex) hinted "did you mean 'q_proj'?"; prompt tuning with
    num_transformer_submodules=2 on a one-stack model trained rows it never used (PEFT prepends them all)."""
    with pytest.raises(ValueError, match=r"pass a list, target_modules=\['q_proj'\]"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="q_proj"))
    with pytest.raises(ValueError, match="num_transformer_submodules=2 is for encoder-decoder"):
        get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                num_transformer_submodules=2))


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_prompt_gradients_on_a_bf16_base_equal_peft(method, tmp_path):
    """The float32 virtual tokens were cast to a bf16 base's dtype before being expanded over the batch, so their
    gradient was summed over the batch in bf16 (~2e-3 off peft's float32 sum at a batch of 8)."""
    def base():
        return tiny_llama().to(torch.bfloat16)

    theirs = peft.get_peft_model(base(), getattr(peft, method)(task_type="CAUSAL_LM", num_virtual_tokens=5)).train()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(), tmp_path, is_trainable=True).train()
    ids = torch.randint(1, 64, (8, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (theirs, ours):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(next(p.grad for p in model.parameters() if p.requires_grad))
    assert grads[1].dtype == torch.float32 and not torch.equal(grads[1], grads[1].bfloat16().float())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_merging_while_disabled_is_refused_and_merge_and_unload_merges(ids):
    """disable_adapter_layers() then merge_adapter() ran base + delta while saying disabled (2e-2 off the base);
    now refused, naming the way out. merge_and_unload merges the active adapters whatever the switch, as PEFT."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted = model(ids).logits
        model.disable_adapter_layers()
        with pytest.raises(ValueError, match="enable_adapter_layers"):
            model.merge_adapter()
        with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
            model.merge_adapter()
        torch.testing.assert_close(model.merge_and_unload()(ids).logits, adapted)


@pytest.mark.parametrize("config", [peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                encoder_hidden_size=16),
                                    peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                               prefix_projection=True, encoder_hidden_size=16)],
                         ids=["p-tuning", "prefix-projection"])
def test_state_dict_functions_with_a_prompt_encoder(config, ids):
    """A prompt encoder's output has no key in model.state_dict(): get_peft_model_state_dict(state_dict=...) raised
    for it; set_peft_model_state_dict dropped the encoder before it refused a bad dict."""
    model = get_peft_model(tiny_llama(), config).train()
    got = peftkit.get_peft_model_state_dict(model, state_dict=model.state_dict())
    torch.testing.assert_close(got["prompt_embeddings"], peftkit.get_peft_model_state_dict(model)["prompt_embeddings"])
    before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="bogus"):
        peftkit.set_peft_model_state_dict(model, {**got, "bogus.weight": torch.zeros(1)})
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == before


def test_state_dict_holds_targeted_embeddings_as_save_pretrained_does(tmp_path):
    """With LoRA on embed_tokens, PEFT's get_peft_model_state_dict (and save_pretrained's file) holds the embedding's
    full weight; the function left it out (a resized vocabulary's new rows lost on the DeepSpeed / FSDP path)."""
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    got = peftkit.get_peft_model_state_dict(model)
    assert sorted(got) == sorted(saved) and any(k.endswith("embed_tokens.base_layer.weight") for k in got)
    assert not any("embed_tokens.base_layer" in k for k in peftkit.get_peft_model_state_dict(
        model, save_embedding_layers=False))


def test_peft_positional_arguments_get_a_clear_error(tmp_path):
    """PEFT's positional mixed / low_cpu_mem_usage (a bool where peftkit takes calibration_batches) and a bool or
    device where peftkit takes subfolder gave unrelated errors (no calibration method; TypeError in os.path.join)."""
    config = LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="by keyword"):
        get_peft_model(tiny_llama(), config, "default", False)
    model = get_peft_model(tiny_llama(), config)
    with pytest.raises(TypeError, match="by keyword"):
        model.add_adapter("b", config, True)
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="subfolder must be a folder name"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, "default", False, None, True)
    with pytest.raises(FileNotFoundError, match="looks like a device: PEFT's torch_device goes by keyword"):
        model.load_adapter(tmp_path, "c", False, "cpu")  # PEFT's positional torch_device


def test_a_refused_merge_and_unload_leaves_adapters_off_and_unloading_in_a_block_keeps_the_result(ids):
    """merge_and_unload turned disabled adapters on before its checks, so a refused call (an unknown name here)
    left them running; and leaving a disable_adapter() block re-merged the recorded adapters into the weights of
    the model merge_and_unload had already returned (base + a became base + a + b)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(ids).logits
        only_a = model(ids).logits
        model.disable_adapter_layers()
        with pytest.raises(ValueError):
            model.merge_and_unload(adapter_names=["missing"])
        torch.testing.assert_close(model(ids).logits, base)
        model.enable_adapter_layers()
        model.merge_adapter(["a", "b"])
        with model.disable_adapter():
            merged = model.merge_and_unload(adapter_names=["a"])  # a, b merged before: unmerged in the block
            weight = merged.model.layers[0].self_attn.q_proj.weight.detach().clone()
        torch.testing.assert_close(merged(ids).logits, only_a)
        assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, weight)


def test_get_state_dict_takes_peft_positional_order():
    """PEFT's order is (model, state_dict, adapter_name, unwrap_compiled, save_embedding_layers): a fourth
    positional False meant save_embedding_layers and dropped the embedding weights."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens"]))
    keys = peftkit.get_peft_model_state_dict(model, None, "default", False)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys)
    compiled = torch.compile(model, backend="eager")
    assert sorted(peftkit.get_peft_model_state_dict(compiled, unwrap_compiled=True)) == sorted(keys)


@pytest.mark.parametrize("inside", ["set_adapter b", "delete and re-add a", "unmerge with a tied head"])
def test_leaving_a_disable_block_merges_back_only_what_still_applies(inside, ids):
    """The block's exit merged every recorded adapter back: after set_adapter("b") inside it a stayed merged under b
    (8e-3 off); a deleted and re-added (inactive) "a" was merged; and with a tied lm_head re-tied inside the block
    (unmerge_adapter) the head's delta went into the shared embedding (6.7 off). As outside a block, now."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    targets = ["q_proj", "lm_head"] if inside.endswith("tied head") else ["q_proj"]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    embedding = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        only_a = model(ids).logits
        model.set_adapter("b")
        only_b = model(ids).logits
        model.set_adapter(["a", "b"] if inside == "delete and re-add a" else "a")
        model.merge_adapter()
        with model.disable_adapter():
            if inside == "set_adapter b":
                model.set_adapter("b")
            elif inside == "delete and re-add a":
                model.delete_adapter("a")
                model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
            else:
                model.unmerge_adapter()
        want = only_a if inside.endswith("tied head") else only_b
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


@pytest.mark.parametrize("inside", ["unmerge_adapter", "set_adapter b"])
def test_a_merge_made_while_inactive_ends_in_a_block_as_outside_it(inside, ids):
    """An adapter merged while inactive ("r") was merged back on leaving the block even after the block's
    unmerge_adapter() or set_adapter("b"), which end it outside a block (3.6 and 1.4 off); the tied head stayed
    untied. Each sequence now ends as the same calls outside a block do."""
    def run(in_block: bool):
        model = get_peft_model(_tied_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
        model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        model.add_adapter("r", LoraConfig(r=4, target_modules=["v_proj", "lm_head"], init_lora_weights=False))
        model.eval()
        model.merge_adapter(["r"])
        call = model.unmerge_adapter if inside == "unmerge_adapter" else (lambda: model.set_adapter("b"))
        if in_block:
            with model.disable_adapter():
                call()
        else:
            with pytest.warns(UserWarning) if inside != "unmerge_adapter" else contextlib.nullcontext():
                call()
        head = model.base_model.lm_head
        with torch.no_grad():
            return model(ids).logits, head.base_layer.weight is model.get_input_embeddings().weight
    (inside_out, tied_in), (outside_out, tied_out) = run(True), run(False)
    torch.testing.assert_close(inside_out, outside_out)
    assert tied_in and tied_out



@pytest.mark.parametrize("config_cls", [peftkit.LoraConfig, peftkit.IA3Config, peftkit.PromptTuningConfig])
def test_peft_only_keyword_arguments_left_off_are_read_past(config_cls):
    # what PEFT scripts pass as they port: the features' off values, which PEFT's own adapter_config.json holds too
    off = {"revision": None, "peft_version": "0.21.2", "peft_type": config_cls.peft_type}
    if config_cls is peftkit.LoraConfig:
        off.update(lora_bias=False, use_qalora=False, target_parameters=None, layer_replication=None, loftq_config={},
                   eva_config=None, megatron_core="megatron.core", ensure_weight_tying=False)
    needed = {"num_virtual_tokens": 4} if config_cls is peftkit.PromptTuningConfig else {}
    assert config_cls(**off, **needed).to_dict() == config_cls(**needed).to_dict()
    assert peftkit.LoraConfig(peft_type=peftkit.PeftType.LORA, r=4).r == 4  # the enum, as PEFT's users pass it
    assert peftkit.LoraConfig(r=4, runtime_config=peft.tuners.lora.config.LoraRuntimeConfig()).r == 4  # PEFT's default
    assert peftkit.LoraConfig(r=4, runtime_config={"ephemeral_gpu_offload": False}).r == 4  # and its to_dict() form


def test_a_config_revision_is_said_to_be_unused(caplog):
    """PEFT loads the base at a config's revision; peftkit loads local bases. LoraConfig(**adapter_config.json) of
    an adapter that recorded one must still build (peft's own get_peft_config does that), so it is a warning."""
    with caplog.at_level("WARNING", logger="peftkit"):
        assert peftkit.LoraConfig(r=4, revision="v2").r == 4
        assert peftkit.PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "revision": "v3"}).r == 4
    assert sum("revision=" in r.message and "is not used" in r.message for r in caplog.records) == 2


@pytest.mark.parametrize("name, value", [("lora_bias", True), ("use_qalora", True), ("target_parameters", ["w"]),
                                         ("layer_replication", [[0, 2]]), ("loftq_config", {"loftq_bits": 4}),
                                         ("kasa_config", {}), ("ensure_weight_tying", True), ("peft_type", "IA3")])
def test_peft_only_keyword_arguments_switched_on_are_refused_naming_them(name, value):
    with pytest.raises(ValueError, match=f"LoraConfig\\({name}=") as err:
        peftkit.LoraConfig(r=4, **{name: value})
    assert "remove the argument" in str(err.value) or "drop the argument" in str(err.value)


def test_a_registered_config_subclass_without_its_own_init_is_guarded_by_its_parents():
    """register() read the class's own __init__ and raised KeyError for a subclass that inherits one."""
    import dataclasses

    from peftkit.config import lookup, register

    @dataclasses.dataclass(init=False)
    class Shorter(peftkit.LoraConfig):
        pass

    saved = lookup("LORA")
    try:
        register("LORA_SHORT", Shorter, saved[1])
        with pytest.raises(TypeError, match="Shorter has no field 'lora_alhpa'; did you mean 'lora_alpha'"):
            Shorter(lora_alhpa=2)
        assert Shorter(r=3, lora_bias=False).r == 3
    finally:
        peftkit.config._REGISTRY.pop("LORA_SHORT", None)


def test_a_misspelt_config_field_names_the_field_it_is_near():
    with pytest.raises(TypeError, match="LoraConfig has no field 'lora_alhpa'; did you mean 'lora_alpha'"):
        peftkit.LoraConfig(r=4, lora_alhpa=16)
    with pytest.raises(TypeError, match="IA3Config has no field 'zzz'; its fields are"):
        peftkit.IA3Config(zzz=1)
    import dataclasses  # the guard leaves the dataclass machinery as it was

    assert dataclasses.replace(peftkit.LoraConfig(r=4), lora_alpha=3).lora_alpha == 3


def _status_scenario(lib, steps: int):
    """The same adapters on one tiny Llama with ``lib`` (peft or peftkit), ``steps`` changes in."""
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                            modules_to_save=["lm_head"]))
    if steps >= 1:
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["v_proj"]))
    if steps >= 2:  # one tensor of the inactive adapter made trainable by hand: "irregular"
        model.get_base_model().model.layers[1].self_attn.v_proj.lora_A["b"].requires_grad_(True)
    if steps >= 3:
        model.merge_adapter()
    return model


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_layer_and_model_status_equal_peft(steps):
    ours, theirs = _status_scenario(peftkit, steps), _status_scenario(peft, steps)
    mine, peft_layers = ours.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in mine] == [s.name.removeprefix("model.") for s in peft_layers]  # base_model's paths
    for a, b in zip(mine, peft_layers):
        assert (a.module_type, a.enabled, a.merged_adapters, a.requires_grad, a.available_adapters, a.devices) == (
            b.module_type, b.enabled, b.merged_adapters, b.requires_grad, b.available_adapters, b.devices), a.name
        assert a.active_adapters == [n for n in b.active_adapters if n in b.available_adapters]  # the ones it holds
    fields = ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
              "num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
              "available_adapters", "devices", "quantization_backend")
    got, want = ours.get_model_status(), theirs.get_model_status()
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert peftkit.get_model_status(ours) == got  # the module-level function, as peft exports it


def test_status_flags_what_differs_between_layers_and_refuses_prompt_adapters():
    model = _status_scenario(peftkit, 1)
    model.set_adapter("b")
    status = model.get_model_status()
    assert (status.active_adapters, status.requires_grad, status.trainable_params) == (["b"], {"default": False, "b": True}, 192)
    model.get_base_model().model.layers[0].self_attn.v_proj.disabled = True  # one layer switched off by hand
    model.get_base_model().model.layers[0].self_attn.q_proj.merged_adapters.append("default")  # booked by hand
    status = model.get_model_status()
    assert (status.enabled, status.merged_adapters) == ("irregular", "irregular")
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
    prompt = get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="prompt tuning, P-tuning and prefix tuning wrap none"):
        prompt.get_layer_status()


def test_lora_layer_attributes_under_peft_names():
    """Scripts that walk PEFT's layers read r, get_base_layer(), merged and disable_adapters (they fell through
    to nn.Module's AttributeError)."""
    ours, theirs = _status_scenario(peftkit, 1), _status_scenario(peft, 1)
    for lib_model in (ours, theirs):
        lib_model.merge_adapter()
    ours_q = ours.get_base_model().model.layers[0].self_attn.v_proj
    theirs_q = theirs.get_base_model().model.layers[0].self_attn.v_proj
    assert ours_q.r == theirs_q.r == {"b": 2}
    ours_q.r["b"] = 5  # a copy (as PEFT's is a plain dict, json.dumps and deepcopy take it); the rank is A's shape
    assert ours_q.r == {"b": 2} and json.dumps(ours_q.r) == '{"b": 2}'
    ours_q = ours.get_base_model().model.layers[0].self_attn.q_proj
    theirs_q = theirs.get_base_model().model.layers[0].self_attn.q_proj
    assert (ours_q.r, ours_q.merged, ours_q.disable_adapters) == (theirs_q.r, theirs_q.merged, theirs_q.disable_adapters)
    assert ours_q.get_base_layer() is ours_q.base_layer and type(ours_q.get_base_layer()) is torch.nn.Linear
    ours.unmerge_adapter()
    with ours.disable_adapter():
        assert ours_q.disable_adapters and not ours_q.merged


def test_porting_helpers_equal_peft(tmp_path):
    """Names porting scripts import from peft (an import of each failed the whole script)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(str(tmp_path))
    ours, theirs = peftkit.load_peft_weights(str(tmp_path)), peft.load_peft_weights(str(tmp_path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(str(tmp_path))
    ours = peftkit.load_peft_weights(str(tmp_path), subfolder="other")
    assert ours.keys() == peft.load_peft_weights(str(tmp_path / "other")).keys() and len(ours) == 4
    data = model.peft_config["default"].to_dict()
    assert peftkit.get_peft_config(data) == model.peft_config["default"]
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), str(tmp_path)), peftkit.PeftModelForCausalLM)
    bf16_ours, bf16_theirs = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    peftkit.prepare_model_for_kbit_training(bf16_ours, auto_clear_cache=False)  # PEFT's keywords
    peft.prepare_model_for_kbit_training(bf16_theirs)
    assert [(n, p.dtype, p.requires_grad) for n, p in bf16_ours.named_parameters()] == [
        (n, p.dtype, p.requires_grad) for n, p in bf16_theirs.named_parameters()]
    assert {p.dtype for p in bf16_ours.parameters()} == {torch.float32}
    assert get_peft_model(bf16_ours, LoraConfig(r=4, target_modules=["q_proj"])).get_nb_trainable_parameters()[0] > 0


def _marked(**marks) -> torch.nn.Module:
    model = tiny_llama()
    for name, value in marks.items():
        setattr(model, name, value)
    return model


def test_adapter_names_the_layers_dicts_hold_as_attributes_are_refused():
    """An adapter named 'training' made model.train() / eval() raise TypeError from then on; 'keys' broke the dicts."""
    for name in ("training", "keys", "update"):
        with pytest.raises(ValueError, match=f"adapter name '{name}' is taken by torch's ModuleDict / ParameterDict"):
            get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), adapter_name=name)


def test_a_quantized_base_is_refused():
    """Its layers hold packed weights that peftkit's layers would read as plain ones."""
    packed = tiny_llama()  # a packed layer seen in the module itself (an inner model, a GGUF file kept packed)
    down = packed.model.layers[0].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.zeros(down.weight.shape, dtype=torch.uint8), requires_grad=False)
    for model in ([packed.model, packed]
                  + [_marked(**marks) for marks in ({"quantization_method": "bitsandbytes"},
                                                    {"quantization_method": "gptq"}, {"quantization_method": "awq"})]):
        with pytest.raises(ValueError, match="the base model is quantized .*unquantized bases only"):
            get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="the base model is quantized"):
            peftkit.prepare_model_for_kbit_training(model)
    dequantized = _marked(is_loaded_in_4bit=True)  # bitsandbytes' flag outlives model.dequantize(): plain weights
    assert get_peft_model(dequantized, LoraConfig(r=4, target_modules=["q_proj"])).get_nb_trainable_parameters()[0] > 0
    model = tiny_llama()  # a GGUF file is dequantized as transformers loads it: plain weights (the embedded SmolLM2)
    model.quantization_method, model.hf_quantizer = "gguf", object()
    assert get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).get_nb_trainable_parameters()[0] > 0
