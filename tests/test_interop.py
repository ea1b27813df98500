"""Interop with Hugging Face PEFT: adapters move both ways with identical outputs and identical files.

PEFT is the oracle here (never imported by peftkit itself). Every model is a tiny random transformers
model built in-process; no downloads.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peftkit  # noqa: E402

ATOL = RTOL = 1e-5
VOCAB = 64


# --- tiny base models ----------------------------------------------------------------------------
def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _t5() -> torch.nn.Module:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def _roberta() -> torch.nn.Module:
    # its classification head holds a "dense" Linear, which LoRA targets must leave to the head trained in full
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=40, num_labels=3, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def _distilbert() -> torch.nn.Module:
    # its head is pre_classifier + classifier: PEFT's "classifier" (a plain name suffix) takes both
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                           max_position_embeddings=32, num_labels=3)
    return transformers.DistilBertForSequenceClassification(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


_BASES: dict[str, torch.nn.Module] = {}


def base_model(kind: str) -> torch.nn.Module:
    """A fresh copy of one fixed random base per kind (same state dict every call), in eval mode."""
    if kind not in _BASES:
        torch.manual_seed(0)
        _BASES[kind] = {"llama": _llama, "t5": _t5, "bert": _bert, "gpt2": _gpt2, "roberta": _roberta,
                         "distilbert": _distilbert}[kind]().eval()
    return copy.deepcopy(_BASES[kind])


def model_inputs(kind: str) -> dict[str, torch.Tensor]:
    """A fixed batch for ``kind``: (2, 7) token ids, a padded attention mask, decoder ids for T5."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=gen)
    return inputs


@torch.no_grad()
def logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    """The model's logits on the fixed batch, in eval mode."""
    model.eval()
    return model(**model_inputs(kind)).logits


# --- adapter parameters --------------------------------------------------------------------------
def _is_adapter_param(name: str, param: torch.Tensor) -> bool:
    # the same attribute names in both libraries: lora_A / lora_B / lora_embedding_* /
    # lora_magnitude_vector / modules_to_save; plus whatever else the config trains (biases)
    return param.requires_grad or "lora_" in name or ".modules_to_save." in name


def randomise(model: torch.nn.Module, seed: int = 0) -> int:
    """Give every adapter tensor random values (lora_B is zero at init); returns how many were set."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not _is_adapter_param(name, param):
                continue
            if "lora_magnitude_vector" in name or "ia3_l" in name:  # scales: positive, around 1
                values = torch.rand(param.shape, generator=gen) + 0.5
            else:
                values = torch.randn(param.shape, generator=gen) * 0.3
            param.copy_(values.to(param.dtype))
            count += 1
    assert count > 0, "no adapter parameters found to randomise"
    return count


def saved_keys(directory) -> set[str]:
    """The tensor names in ``directory/adapter_model.safetensors``."""
    return set(load_file(os.path.join(directory, "adapter_model.safetensors")))


# --- the cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str  # which base model
    lora: dict  # LoraConfig keyword arguments, the same for both libraries

    def peft_config(self):
        return peft.LoraConfig(**copy.deepcopy(self.lora))

    def kit_config(self):
        return peftkit.LoraConfig(**copy.deepcopy(self.lora))


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama-all-linear": Case("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama-list": Case("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                     task_type="CAUSAL_LM")),
    "llama-dora": Case("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                     task_type="CAUSAL_LM")),
    "llama-rslora-patterns": Case("llama", dict(
        r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, use_rslora=True, task_type="CAUSAL_LM",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"o_proj": 3, r"layers\.0\.self_attn\.v_proj": 20})),
    "llama-embed": Case("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                      task_type="CAUSAL_LM")),
    "t5-qv": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
    "bert-cls-lora-only": Case("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            task_type="SEQ_CLS", bias="lora_only")),
    "bert-cls-bias-all": Case("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                           task_type="SEQ_CLS", bias="all")),
    "gpt2-bias-all": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                       bias="all")),
    "gpt2": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")),
    # layer indices: T5's first numbered segment (block.1.layer.0 is block 1), with and without a pattern
    "t5-layers": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"], layers_to_transform=[1],
                                 task_type="SEQ_2_SEQ_LM")),
    "t5-layers-pattern": Case("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v"], layers_to_transform=[0],
                                         layers_pattern="block", task_type="SEQ_2_SEQ_LM")),
    # a full name in the list is taken as it is; layers_to_transform narrows only the suffix names
    "llama-full-name-and-layers": Case("llama", dict(
        r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1],
        task_type="CAUSAL_LM")),
    "llama-orthogonal-init": Case("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights="orthogonal", task_type="CAUSAL_LM")),
    "roberta-cls-dense": Case("roberta", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                              task_type="SEQ_CLS")),
    "gpt2-dora": Case("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True,
                                   task_type="CAUSAL_LM")),
}
case_ids = list(CASES)


def _assert_adapter_changes_output(out: torch.Tensor, kind: str) -> None:
    # guards against a vacuous comparison: the adapter must actually move the logits
    base = logits(base_model(kind), kind)
    assert (out - base).abs().max() > 1e-2, "the randomised adapter leaves the output unchanged"


# --- both directions: one library saves, the other loads ------------------------------------------
DIRECTIONS = {"peft-to-peftkit": (peft, peftkit), "peftkit-to-peft": (peftkit, peft)}


def _check_transfer(source, kind: str, target_lib, tmp_path):
    """Randomise ``source``, save it, load it with ``target_lib``: the logits must agree."""
    assert randomise(source) > 0
    expected = logits(source, kind)
    _assert_adapter_changes_output(expected, kind)
    source.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unexpected keyword arguments")  # no field PEFT lacks
        loaded = target_lib.PeftModel.from_pretrained(base_model(kind), tmp_path)
    torch.testing.assert_close(logits(loaded, kind), expected, atol=ATOL, rtol=RTOL)
    return loaded


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_id", case_ids)
def test_lora_moves_between_libraries(case_id, direction, tmp_path):
    source_lib, target_lib = DIRECTIONS[direction]
    case = CASES[case_id]
    config = case.peft_config() if source_lib is peft else case.kit_config()
    _check_transfer(source_lib.get_peft_model(base_model(case.kind), config), case.kind, target_lib, tmp_path)


# --- the files themselves ------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", case_ids)
def test_same_safetensors_layout(case_id, tmp_path):
    case = CASES[case_id]
    peft.get_peft_model(base_model(case.kind), case.peft_config()).save_pretrained(tmp_path / "peft")
    peftkit.get_peft_model(base_model(case.kind), case.kit_config()).save_pretrained(tmp_path / "kit")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    kit_file = load_file(tmp_path / "kit" / "adapter_model.safetensors")
    only_kit, only_peft = sorted(kit_file.keys() - peft_file.keys()), sorted(peft_file.keys() - kit_file.keys())
    assert not only_kit and not only_peft, f"only peftkit: {only_kit}; only peft: {only_peft}"
    for key, tensor in peft_file.items():
        assert (kit_file[key].shape, kit_file[key].dtype) == (tensor.shape, tensor.dtype), key


@pytest.mark.parametrize("case_id", case_ids)
def test_peftkit_config_reads_in_peft(case_id, tmp_path):
    case = CASES[case_id]
    kit = peftkit.get_peft_model(base_model(case.kind), case.kit_config())
    kit.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    read = peft.PeftConfig.from_pretrained(str(tmp_path))

    assert isinstance(read, peft.LoraConfig)
    assert read.peft_type == "LORA" == written["peft_type"]
    assert read.task_type == case.lora["task_type"]
    assert read.r == case.lora["r"] and read.lora_alpha == case.lora["lora_alpha"]
    assert set(read.target_modules) == set(written["target_modules"])
    if isinstance(case.lora["target_modules"], list):
        assert set(read.target_modules) == set(case.lora["target_modules"])
    for name in ("use_dora", "use_rslora", "bias", "rank_pattern", "alpha_pattern"):
        assert getattr(read, name) == case.lora.get(name, getattr(peftkit.LoraConfig(), name)), name
    assert read.inference_mode is True
    if case.lora["task_type"] == "SEQ_CLS":
        assert "classifier" in read.modules_to_save


def test_all_linear_resolves_to_the_same_modules(tmp_path):
    # PEFT writes full module names, peftkit leaf names; both must pick the same layers (not lm_head)
    case = CASES["llama-all-linear"]
    source = peft.get_peft_model(base_model("llama"), case.peft_config())
    kit = peftkit.get_peft_model(base_model("llama"), case.kit_config())
    wrapped = {n for n, m in kit.base_model.named_modules() if isinstance(m, peftkit.methods.lora.LoraLayer)}
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in source.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == peft_wrapped
    assert len(wrapped) == 2 * len(LLAMA_LINEARS)


def test_peft_config_loads_without_warnings(tmp_path, caplog):
    # PEFT writes every field it knows (megatron_core, qalora_group_size, ...): none is news to peftkit
    peft.get_peft_model(base_model("llama"), CASES["llama-dora"].peft_config()).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="peftkit"):
        config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name == "peftkit"] == []
    assert config.use_dora is True and config.r == 4


# --- targeted embeddings: PEFT saves their full base weight beside the adapter -------------------
def test_embedding_weights_saved_by_peft_are_loaded(tmp_path):
    # e.g. rows of new tokens trained before saving: PEFT restores them into the base on load, so must we
    case = CASES["llama-embed"]
    source = peft.get_peft_model(base_model("llama"), case.peft_config())
    randomise(source)
    before = logits(source, "llama")
    weight = source.get_input_embeddings().base_layer.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    expected = logits(source, "llama")
    assert (expected - before).abs().max() > 1e-2  # the saved embedding weight matters
    source.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved_keys(tmp_path)

    loaded = peftkit.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, "llama"), expected, atol=ATOL, rtol=RTOL)


def test_adapter_saved_without_embedding_weights_still_loads(tmp_path):
    case = CASES["llama-embed"]
    source = peft.get_peft_model(base_model("llama"), case.peft_config())
    randomise(source)
    expected = logits(source, "llama")
    source.save_pretrained(tmp_path, save_embedding_layers=False)
    assert not any(k.endswith("base_layer.weight") for k in saved_keys(tmp_path))

    loaded = peftkit.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, "llama"), expected, atol=ATOL, rtol=RTOL)


# --- several named adapters ----------------------------------------------------------------------
OTHER = dict(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"], task_type="CAUSAL_LM")


def _two_adapter_logits(source, kind: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    """Randomise both adapters of ``source``; (default's logits, other's logits), which must differ."""
    randomise(source)
    source.set_adapter("other")
    expected_other = logits(source, kind)
    source.set_adapter("default")
    expected_default = logits(source, kind)
    assert (expected_other - expected_default).abs().max() > 1e-2
    return expected_default, expected_other


def _check_both_load(target_lib, tmp_path, expected, kind: str = "llama") -> None:
    """Load the top-level adapter, then the one in the "other" subfolder; each reproduces its logits."""
    loaded = target_lib.PeftModel.from_pretrained(base_model(kind), tmp_path)
    loaded.load_adapter(str(tmp_path / "other"), "other")
    assert loaded.active_adapter == "default"
    torch.testing.assert_close(logits(loaded, kind), expected[0], atol=ATOL, rtol=RTOL)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, kind), expected[1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_second_adapter_in_a_subfolder(direction, tmp_path):
    source_lib, target_lib = DIRECTIONS[direction]
    source = source_lib.get_peft_model(base_model("llama"), source_lib.LoraConfig(**CASES["llama-list"].lora))
    source.add_adapter("other", source_lib.LoraConfig(**OTHER))
    expected = _two_adapter_logits(source)
    source.save_pretrained(tmp_path)
    assert saved_keys(tmp_path / "other") == {
        f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight"
        for i in range(2) for mod in ("self_attn.k_proj", "mlp.up_proj") for ab in "AB"}
    _check_both_load(target_lib, tmp_path, expected)


# --- merging agrees too --------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["llama-dora", "gpt2-dora", "bert-cls-lora-only"])
def test_merged_model_matches_peft(case_id, tmp_path):
    case = CASES[case_id]
    source = peft.get_peft_model(base_model(case.kind), case.peft_config())
    randomise(source)
    source.save_pretrained(tmp_path)
    expected = logits(source.merge_and_unload(), case.kind)

    merged = peftkit.PeftModel.from_pretrained(base_model(case.kind), tmp_path).merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.lora.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, case.kind), expected, atol=1e-4, rtol=1e-4)


# --- IA3: vectors (out, 1) / (1, in) under "<module>.ia3_l", no ".weight" -----------------------
IA3_CASES = {
    "llama-defaults": ("llama", dict(task_type="CAUSAL_LM")),  # k_proj, v_proj out; down_proj in
    "llama-list": ("llama", dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                                 feedforward_modules=["up_proj", "down_proj"], task_type="CAUSAL_LM")),
    "t5-defaults": ("t5", dict(task_type="SEQ_2_SEQ_LM")),  # k, v out; wo in
    "t5-regex": ("t5", dict(target_modules=r".*(SelfAttention|EncDecAttention)\.(k|v|o)",
                            feedforward_modules=r".*EncDecAttention\.o", task_type="SEQ_2_SEQ_LM")),
    "gpt2-defaults": ("gpt2", dict(task_type="CAUSAL_LM")),  # Conv1D: c_attn out (with bias), mlp.c_proj in
    "bert-cls-defaults": ("bert", dict(task_type="SEQ_CLS")),  # + the classifier head, trained in full
}
ia3_ids = list(IA3_CASES)


def _ia3(library, case_id):
    kind, kwargs = IA3_CASES[case_id]
    return library.get_peft_model(base_model(kind), library.IA3Config(**copy.deepcopy(kwargs))), kind


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_id", ia3_ids)
def test_ia3_moves_between_libraries(case_id, direction, tmp_path):
    source_lib, target_lib = DIRECTIONS[direction]
    source, kind = _ia3(source_lib, case_id)
    loaded = _check_transfer(source, kind, target_lib, tmp_path)
    assert isinstance(loaded.peft_config["default"], target_lib.IA3Config)


@pytest.mark.parametrize("case_id", ia3_ids)
def test_ia3_same_safetensors_layout_and_config(case_id, tmp_path):
    peft_model, _ = _ia3(peft, case_id)
    kit_model, _ = _ia3(peftkit, case_id)
    peft_model.save_pretrained(tmp_path / "peft")
    kit_model.save_pretrained(tmp_path / "kit")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    kit_file = load_file(tmp_path / "kit" / "adapter_model.safetensors")
    assert kit_file.keys() == peft_file.keys()
    assert any(k.endswith(".ia3_l") for k in kit_file) and not any("ia3_l.weight" in k for k in kit_file)
    for key, tensor in peft_file.items():
        assert (kit_file[key].shape, kit_file[key].dtype) == (tensor.shape, tensor.dtype), key
    peft_json, kit_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "kit"))
    for name in ("target_modules", "feedforward_modules"):
        resolved = peft_json[name]
        assert (set(kit_json[name]) if isinstance(resolved, list) else kit_json[name]) == \
               (set(resolved) if isinstance(resolved, list) else resolved), name


@pytest.mark.parametrize("case_id", ["gpt2-defaults", "bert-cls-defaults", "t5-regex"])
def test_ia3_merged_model_matches_peft(case_id, tmp_path):
    source, kind = _ia3(peft, case_id)
    randomise(source)
    source.save_pretrained(tmp_path)
    expected = logits(source.merge_and_unload(), kind)

    merged = peftkit.PeftModel.from_pretrained(base_model(kind), tmp_path).merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.ia3.IA3Layer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kind), expected, atol=1e-4, rtol=1e-4)


def test_ia3_second_adapter_from_peftkit_subfolder(tmp_path):
    source, _ = _ia3(peftkit, "llama-defaults")
    source.add_adapter("other", peftkit.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]))
    expected = _two_adapter_logits(source)
    source.save_pretrained(tmp_path)
    _check_both_load(peft, tmp_path, expected)


def test_ia3_default_feedforward_outside_targets(tmp_path):
    # targets set, feedforward left unset: PEFT records its default ['down_proj'] beside ['q_proj', 'v_proj'],
    # which fails IA3Config's own subset check on reload; peftkit records [] so the adapter loads in both
    kwargs = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(base_model("llama"), peft.IA3Config(**kwargs)).save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"):
        peftkit.PeftModel.from_pretrained(base_model("llama"), tmp_path / "peft")

    kit = peftkit.get_peft_model(base_model("llama"), peftkit.IA3Config(**kwargs))
    randomise(kit)
    kit.save_pretrained(tmp_path / "kit")
    loaded = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "kit")
    assert set(loaded.peft_config["default"].feedforward_modules) == set()
    torch.testing.assert_close(logits(loaded, "llama"), logits(kit, "llama"), atol=ATOL, rtol=RTOL)


# --- prompt tuning and P-tuning ------------------------------------------------------------------
PROMPT_CASES = {
    "llama-prompt-random": ("llama", "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "llama-prompt-vocab": ("llama", "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                prompt_tuning_init="SAMPLE_VOCAB")),
    "llama-ptuning-mlp": ("llama", "PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                encoder_hidden_size=16)),
    "llama-ptuning-lstm": ("llama", "PromptEncoderConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                 encoder_hidden_size=8,
                                                                 encoder_reparameterization_type="LSTM")),
    "t5-prompt": ("t5", "PromptTuningConfig", dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
}


@pytest.mark.parametrize("direction", ["peft_to_peftkit", "peftkit_to_peft"])
@pytest.mark.parametrize("case_id", sorted(PROMPT_CASES))
def test_prompt_moves_between_libraries(case_id, direction, tmp_path):
    kind, cls_name, kwargs = PROMPT_CASES[case_id]
    src_lib, dst_lib = (peft, peftkit) if direction == "peft_to_peftkit" else (peftkit, peft)
    torch.manual_seed(2)
    source = src_lib.get_peft_model(base_model(kind), getattr(src_lib, cls_name)(**kwargs)).eval()
    expected = logits(source, kind)
    source.save_pretrained(str(tmp_path))
    assert saved_keys(tmp_path) == {"prompt_embeddings"}
    loaded = dst_lib.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    torch.testing.assert_close(logits(loaded, kind), expected, atol=ATOL, rtol=RTOL)
    written = json.load(open(tmp_path / "adapter_config.json"))
    n = kwargs["num_virtual_tokens"] * written["num_transformer_submodules"]
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (n, 32)


def test_prompt_config_fields_match_peft(tmp_path):
    for case_id in ("llama-ptuning-mlp", "t5-prompt"):
        kind, cls_name, kwargs = PROMPT_CASES[case_id]
        peft.get_peft_model(base_model(kind), getattr(peft, cls_name)(**kwargs)).save_pretrained(str(tmp_path / "p"))
        peftkit.get_peft_model(base_model(kind), getattr(peftkit, cls_name)(**kwargs)).save_pretrained(
            str(tmp_path / "k"))
        theirs, ours = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("p", "k"))
        for key in ("peft_version", "auto_mapping", "revision"):
            theirs.pop(key, None)
        assert ours == theirs


@pytest.mark.parametrize("direction", ["peft_to_peftkit", "peftkit_to_peft"])
@pytest.mark.parametrize("kwargs", [dict(), dict(prefix_projection=True, encoder_hidden_size=16)],
                         ids=["plain", "projection"])
def test_prefix_moves_between_libraries(kwargs, direction, tmp_path):
    src_lib, dst_lib = (peft, peftkit) if direction == "peft_to_peftkit" else (peftkit, peft)
    torch.manual_seed(2)
    config = src_lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kwargs)
    source = src_lib.get_peft_model(base_model("llama"), config).eval()
    expected = logits(source, "llama")
    source.save_pretrained(str(tmp_path))
    # grouped-query attention: 2 kv heads of size 8 -> token_dim 16, 2 layers * (key, value) * 16 per virtual token
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (4, 64)
    loaded = dst_lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
    torch.testing.assert_close(logits(loaded, "llama"), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("direction", ["peft_to_peftkit", "peftkit_to_peft"])
@pytest.mark.parametrize("kwargs", [dict(num_virtual_tokens=3),
                                    dict(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=16)],
                         ids=["plain", "projection"])
def test_t5_prefix_moves_between_libraries(kwargs, direction, tmp_path):
    src_lib, dst_lib = (peft, peftkit) if direction == "peft_to_peftkit" else (peftkit, peft)
    torch.manual_seed(2)
    source = src_lib.get_peft_model(base_model("t5"), src_lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", **kwargs))
    expected = logits(source, "t5")  # with decoder_input_ids and a padded encoder mask
    assert not torch.allclose(expected, logits(base_model("t5"), "t5"))
    source.save_pretrained(str(tmp_path))
    # one block of rows for both submodules: 2 layers * (key, value) * 32 per virtual token, as PEFT writes it
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (kwargs["num_virtual_tokens"], 128)}
    loaded = dst_lib.PeftModel.from_pretrained(base_model("t5"), str(tmp_path))
    torch.testing.assert_close(logits(loaded, "t5"), expected, atol=ATOL, rtol=RTOL)


def test_t5_prefix_same_safetensors_layout_and_config(tmp_path):
    kwargs = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)
    peft.get_peft_model(base_model("t5"), peft.PrefixTuningConfig(**kwargs)).save_pretrained(str(tmp_path / "p"))
    peftkit.get_peft_model(base_model("t5"), peftkit.PrefixTuningConfig(**kwargs)).save_pretrained(str(tmp_path / "k"))
    theirs, ours = ({k: tuple(v.shape) for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()}
                    for d in ("p", "k"))
    assert ours == theirs
    theirs, ours = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("p", "k"))
    for key in ("peft_version", "auto_mapping", "revision"):
        theirs.pop(key, None)
    assert ours == theirs


_PROMPT_CLS = {"prompt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
               "p-tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=16))}
# (prefix tuning needs past_key_values, which transformers' BERT no longer takes; PEFT refuses it on Llama
# classifiers, so it has no classifier both libraries run)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("method", list(_PROMPT_CLS))
def test_prompt_methods_with_a_classification_head_move_between_libraries(method, direction, tmp_path):
    """A prompt method on a sequence classifier trains the new head too (modules_to_save). PEFT keeps prompt
    methods' base model directly under PeftModel.base_model, so the head is saved as base_model.classifier.*,
    not base_model.model.classifier.* as for LoRA: both libraries load each other's file, same logits."""
    source_lib, target_lib = DIRECTIONS[direction]
    name, kwargs = _PROMPT_CLS[method]
    source = source_lib.get_peft_model(base_model("bert"), getattr(source_lib, name)(task_type="SEQ_CLS", **kwargs))
    _check_transfer(source, "bert", target_lib, tmp_path)
    keys = saved_keys(tmp_path)
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= keys, sorted(keys)
    assert not any(k.startswith("base_model.model.") for k in keys)


def test_a_prompt_adapter_saved_with_the_old_head_keys_still_loads(tmp_path):
    """Adapters saved by peftkit before the head keys followed PEFT (base_model.model.classifier.*) still load."""
    from safetensors.torch import save_file

    source = peftkit.get_peft_model(base_model("bert"), peftkit.PromptTuningConfig(task_type="SEQ_CLS",
                                                                                   num_virtual_tokens=3))
    randomise(source)
    expected = logits(source, "bert")
    source.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    old = {("base_model.model." + k[len("base_model."):] if k.startswith("base_model.") else k): v
           for k, v in load_file(str(path)).items()}
    save_file(old, str(path))
    loaded = peftkit.PeftModel.from_pretrained(base_model("bert"), tmp_path)
    torch.testing.assert_close(logits(loaded, "bert"), expected, atol=ATOL, rtol=RTOL)


def test_adapter_without_task_type_loads_in_peft_auto_classes(tmp_path):
    """Without a task_type, PEFT's AutoPeftModel finds the base class in adapter_config.json's auto_mapping, which
    PEFT writes then; peftkit writes it too (and reads past it)."""
    from conftest import randomize_adapters, tiny_llama
    from peft import AutoPeftModel as PeftAuto, AutoPeftModelForCausalLM as PeftAutoCausal

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] is None
    assert saved["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                     "parent_library": "transformers.models.llama.modeling_llama"}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for auto in (PeftAuto, PeftAutoCausal):
            torch.testing.assert_close(auto.from_pretrained(str(tmp_path / "adapter"))(input_ids=ids).logits, expected)
        reloaded = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_bias_all_with_a_trained_head_keeps_the_original_head_frozen():
    """bias="all" saves the original head's bias beside the trained copy (as PEFT), but only the copy trains: the
    trainable set equals PEFT's."""
    def classifier():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32, num_labels=3))

    ours = peftkit.get_peft_model(classifier(), peftkit.LoraConfig(r=2, task_type="SEQ_CLS", bias="all",
                                                                   target_modules=["query", "value"]))
    theirs = peft.get_peft_model(classifier(), peft.LoraConfig(r=2, task_type="SEQ_CLS", bias="all",
                                                              target_modules=["query", "value"]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    head = ours.base_model.classifier
    assert not head.base_layer.bias.requires_grad and head.modules_to_save["default"].bias.requires_grad


def test_bias_all_trains_the_original_head_while_no_copy_of_it_is_active():
    """An adapter with bias="all" and no copy of the head: the original head runs, so its bias trains (also when
    another adapter holds a copy of that head); with the copy's adapter active it is frozen again."""
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, num_labels=2))
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, task_type="SEQ_CLS", bias="all",
                                                            target_modules=["query"]), adapter_name="a")
    model.add_adapter("b", peftkit.LoraConfig(r=2, bias="all", target_modules=["value"]))
    head = model.base_model.classifier
    assert not head.base_layer.bias.requires_grad  # "a" is active, with its copy of the head
    model.set_adapter("b")
    assert head.base_layer.bias.requires_grad and not head.modules_to_save["a"].bias.requires_grad
    model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([1])).loss.backward()
    assert head.base_layer.bias.grad is not None and head.base_layer.bias.grad.abs().sum() > 0
    model.set_adapter("a")
    assert not head.base_layer.bias.requires_grad and head.modules_to_save["a"].bias.requires_grad


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_distilbert_classifier_head_moves_between_libraries(direction, tmp_path):
    # PEFT wraps modules_to_save by a plain name suffix, so SEQ_CLS's "classifier" also takes "pre_classifier"; peftkit
    # took only "classifier", and adapters failed to load both ways (and pre_classifier stayed frozen here)
    source_lib, target_lib = DIRECTIONS[direction]
    config = source_lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin", "v_lin"])
    source = source_lib.get_peft_model(base_model("distilbert"), config)
    trainable = {n for n, p in source.named_parameters() if p.requires_grad}
    assert any("pre_classifier.modules_to_save" in n for n in trainable)
    _check_transfer(source, "distilbert", target_lib, tmp_path)
    ours = peftkit.get_peft_model(base_model("distilbert"), peftkit.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                              target_modules=["q_lin", "v_lin"]))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(base_model("distilbert"), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                          target_modules=["q_lin", "v_lin"]))
    theirs.save_pretrained(tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")


def test_all_linear_leaves_out_what_the_task_head_wraps():
    # all-linear named pre_classifier, which the SEQ_CLS head also wraps: "both an adapter target and in
    # modules_to_save" (PEFT fails here too)
    model = peftkit.get_peft_model(base_model("distilbert"), peftkit.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                                target_modules="all-linear"))
    assert sorted(model.peft_config["default"].target_modules) == ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"]
    assert {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n} == {
        f"base_model.{head}.modules_to_save.default.{p}" for head in ("pre_classifier", "classifier")
        for p in ("weight", "bias")}


def test_ia3_with_layers_to_transform_loads_in_peft_as_the_same_layers(tmp_path):
    # PEFT's IA3Config has no layers_to_transform: it adapted every layer and gave the ones not in the file its init
    # (random with init_ia3_weights=False). The saved config now names the chosen modules in full instead.
    config = peftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                               layers_to_transform=[1], init_ia3_weights=False)
    source = peftkit.get_peft_model(base_model("llama"), config)
    assert randomise(source) == 3
    expected = logits(source, "llama")
    source.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "layers_to_transform" not in saved and saved["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
    assert sorted(saved["target_modules"]) == [f"model.layers.1.{m}" for m in
                                               ("mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message) or "Unexpected" in str(w.message)]
    torch.testing.assert_close(logits(theirs, "llama"), expected, atol=ATOL, rtol=RTOL)
    ours = peftkit.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(ours, "llama"), expected, atol=ATOL, rtol=RTOL)


def test_peft_bias_all_with_a_non_leaf_head_copy_loads(tmp_path):
    # PEFT saves the head copy's bias of bias="all" + modules_to_save=["pooler"] as
    # '...pooler.modules_to_save.default.dense.bias' (the adapter's name left in): peftkit said it lacked the tensor
    kwargs = dict(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS", bias="all", modules_to_save=["pooler"])
    source = peft.get_peft_model(base_model("bert"), peft.LoraConfig(**kwargs))
    loaded = _check_transfer(source, "bert", peftkit, tmp_path)
    assert "base_model.model.bert.pooler.modules_to_save.default.dense.bias" in saved_keys(tmp_path)
    copy_bias = loaded.base_model.bert.pooler.modules_to_save["default"].dense.bias
    torch.testing.assert_close(copy_bias, source.base_model.model.bert.pooler.modules_to_save["default"].dense.bias)


def test_ensure_weight_tying_adapters_that_need_it_are_named_in_the_error(tmp_path):
    # PEFT ties the LoRA of a tied embedding and lm_head with it and saves them so; peftkit does not tie them and
    # failed with "saved for another model?" alone
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(config).state_dict()

    def tied():
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(state)
        return model.eval()

    source = peft.get_peft_model(tied(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                         ensure_weight_tying=True))
    source.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved with ensure_weight_tying=True .* load it with PEFT"):
        peftkit.PeftModel.from_pretrained(tied(), tmp_path)


def test_an_adapter_saved_before_the_suffix_rule_loads_with_a_warning(tmp_path):
    # peftkit used to wrap modules_to_save by dotted suffix only, so a DistilBERT classifier adapter saved then has no
    # copy of pre_classifier; it loads with that module at the base's values (as it ran), and a warning
    from safetensors.torch import save_file

    source = peftkit.get_peft_model(base_model("distilbert"), peftkit.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                                 target_modules=["q_lin"]))
    randomise(source)
    with torch.no_grad():  # as the old code ran: pre_classifier unwrapped, the base's own
        source.base_model.pre_classifier.modules_to_save["default"].load_state_dict(
            source.base_model.pre_classifier.base_layer.state_dict())
    expected = logits(source, "distilbert")
    source.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pre_classifier" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"no saved copy of \['pre_classifier'\].*keep the base model's values"):
        loaded = peftkit.PeftModel.from_pretrained(base_model("distilbert"), tmp_path)
    torch.testing.assert_close(logits(loaded, "distilbert"), expected, atol=ATOL, rtol=RTOL)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("base_model.model.classifier.")}
    save_file(tensors, tmp_path / "adapter_model.safetensors")  # the head a name matches exactly: still refused
    with pytest.raises(ValueError, match="lacks tensor 'base_model.model.classifier.weight'"):
        peftkit.PeftModel.from_pretrained(base_model("distilbert"), tmp_path)


@pytest.mark.parametrize("case", ["only-match", "partly-missing"])
def test_a_needed_copy_missing_from_the_file_is_still_refused(case, tmp_path):
    # only-match: "head" matches lm_head alone, so no earlier peftkit saved that adapter without it (it refused the
    # name); partly-missing: "norm" copies of one layer missing, the others saved: a damaged file, not an old one
    from safetensors.torch import save_file

    names = ["head"] if case == "only-match" else ["norm"]
    source = peftkit.get_peft_model(base_model("llama"), peftkit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                            modules_to_save=names))
    source.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    gone = "lm_head" if case == "only-match" else "layers.0.input_layernorm"
    save_file({k: v for k, v in tensors.items() if gone not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"lacks tensor '[^']*{gone}"):
        peftkit.PeftModel.from_pretrained(base_model("llama"), tmp_path)


def test_peft_bias_all_with_a_non_leaf_head_copy_hotswaps(tmp_path):
    # the same PEFT key (adapter name left in) as from_pretrained reads: hotswap refused it as "missing"
    kwargs = dict(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS", bias="all", modules_to_save=["pooler"])
    source = peft.get_peft_model(base_model("bert"), peft.LoraConfig(**kwargs))
    randomise(source)
    expected = logits(source, "bert")
    source.save_pretrained(tmp_path)
    ours = peftkit.get_peft_model(base_model("bert"), peftkit.LoraConfig(**kwargs))
    ours.hotswap_adapter(tmp_path, "default")
    torch.testing.assert_close(logits(ours, "bert"), expected, atol=ATOL, rtol=RTOL)
