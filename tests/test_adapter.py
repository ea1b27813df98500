"""Bottleneck adapters: placement on real architectures, the residual maths, training, errors, save / load."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration,
                          ViTConfig, ViTModel)

from peftkit import AdapterConfig, PeftModel, get_peft_model
from peftkit.methods.adapter import BottleneckLayer
from conftest import randomize_adapters, tiny_llama

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                               num_heads=4, decoder_start_token_id=0)).eval()


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48)).eval()


def tiny_vit():
    torch.manual_seed(0)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              image_size=8, patch_size=4)).eval()


PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
# arch -> (builder, inputs, {adapter_type: suffixes of the wrapped modules})
ARCHS = {
    "llama": (tiny_llama, {"input_ids": IDS}, {"houlsby": {"self_attn", "mlp"}, "pfeiffer": {"mlp"}}),
    "gpt2": (tiny_gpt2, {"input_ids": IDS}, {"houlsby": {"attn", "mlp"}, "pfeiffer": {"mlp"}}),
    "t5": (tiny_t5, {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]},
           {"houlsby": {"SelfAttention", "DenseReluDense"}, "pfeiffer": {"DenseReluDense"}}),
    "bert": (tiny_bert, {"input_ids": IDS}, {"houlsby": {"attention.output.dense", "output.dense"},
                                             "pfeiffer": {"output.dense"}}),
    "vit": (tiny_vit, {"pixel_values": PIXELS}, {"houlsby": {"attention", "mlp"}, "pfeiffer": {"mlp"}}),
}
CASES = [(a, t) for a in ARCHS for t in ("houlsby", "pfeiffer", "parallel") if (a, t) != ("bert", "parallel")]


def _wrapped(model):
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]


@pytest.mark.parametrize("arch, adapter_type", CASES)
def test_unchanged_at_init_and_on_the_forward_path(arch, adapter_type):
    build, inputs, sites = ARCHS[arch]
    base_out = build()(**inputs)[0]
    model = get_peft_model(build(), AdapterConfig(adapter_type=adapter_type, bottleneck_size=4))
    wrapped = _wrapped(model)
    expected = sites.get(adapter_type, sites["pfeiffer"])  # parallel sits beside the FFN block
    assert len(wrapped) == (4 if adapter_type == "houlsby" else 2)
    assert all(any(n == s or n.endswith("." + s) for s in expected) for n in wrapped), wrapped
    torch.testing.assert_close(model(**inputs)[0], base_out, atol=1e-6, rtol=0)
    randomize_adapters(model)
    assert not torch.allclose(model(**inputs)[0], base_out, atol=1e-4), "adapters are not on the forward path"
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs)[0], base_out, atol=1e-6, rtol=0)


def test_bert_hook_points_are_the_output_projections_before_add_and_norm():
    model = get_peft_model(tiny_bert(), AdapterConfig(bottleneck_size=4))
    sites = ("attention.output.dense", "output.dense")
    assert _wrapped(model.base_model) == [f"encoder.layer.{i}.{s}" for i in (0, 1) for s in sites]


class Block(nn.Module):
    """Returns a tuple, like an attention block, and takes a keyword argument."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x, scale=1.0):
        return self.proj(x) * scale, "extra"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()

    def forward(self, x, scale=1.0):
        return self.block(x, scale=scale)


@pytest.mark.parametrize("adapter_type", ["pfeiffer", "parallel"])
def test_residual_equals_the_hand_computed_formula(adapter_type):
    model = get_peft_model(Tiny(), AdapterConfig(adapter_type=adapter_type, ffn_modules=["block"], bottleneck_size=3,
                                                  non_linearity="tanh", scaling=0.5))
    layer = model.base_model.block
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert tuple(down.weight.shape) == ((3, 6) if adapter_type == "parallel" else (3, 4))
    assert not up.weight.any() and not up.bias.any(), "the up-projection starts at zero"
    x = torch.randn(5, 6)
    h = model.base_model.block.base_layer.proj(x) * 2.0
    torch.testing.assert_close(model(x, scale=2.0)[0], h)
    randomize_adapters(model)
    out, extra = model(x, scale=2.0)
    source = x if adapter_type == "parallel" else h  # He et al.: the block's input; Houlsby / Pfeiffer: its output
    expected = h + 0.5 * (torch.tanh(source @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    torch.testing.assert_close(out, expected)
    assert extra == "extra", "the rest of a tuple output passes through"


def test_adamw_lowers_the_loss_and_changes_only_adapter_weights():
    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=8)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down." in n or ".adapter_up." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".adapter_down." in n for n in changed) and any(".adapter_up." in n for n in changed)


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction_factor": 8, "bottleneck_size": 4}, "not both"),
    ({"bottleneck_size": 0}, "positive integer"),
    ({"bottleneck_size": 2.5}, r"bottleneck_size = 2.5 \(float\) does not fit: it takes an int"),
    ({"reduction_factor": -2}, "positive number"),
    ({"non_linearity": "swish"}, "non_linearity must be one of"),
    ({"adapter_type": "serial"}, "adapter_type must be one of"),
    ({"target_modules": ["mlp"]}, "not target_modules"),
    ({"adapter_type": "pfeiffer", "attn_modules": ["self_attn"]}, "feed-forward block only"),
    ({"scaling": float("nan")}, "finite"),
    ({"ffn_modules": 3}, r"ffn_modules = 3 \(int\) does not fit: it takes a str or a list of str"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdapterConfig(**kwargs)


def test_size_defaults_and_reduction_factor():
    assert AdapterConfig().reduction_factor == 16 and AdapterConfig(bottleneck_size=4).reduction_factor is None
    model = get_peft_model(tiny_llama(), AdapterConfig(adapter_type="pfeiffer", reduction_factor=8))
    assert tuple(model.base_model.model.layers[0].mlp.adapter_down["default"].weight.shape) == (4, 32)


@pytest.mark.parametrize("build, config, match", [
    (tiny_llama, AdapterConfig(adapter_type="pfeiffer", ffn_modules=["mlpp"]),
     r"ffn_modules=\['mlpp'\].*did you mean 'mlp'"),
    (Tiny, AdapterConfig(adapter_type="parallel"), "no default hook points for model type None"),
    (Tiny, AdapterConfig(ffn_modules=["block"]), "no default hook points"),  # houlsby also needs attn_modules
    (tiny_bert, AdapterConfig(ffn_modules=["output.dense"]), "matches both attn_modules and ffn_modules"),
    (tiny_bert, AdapterConfig(adapter_type="parallel"), "no default ffn_modules for adapter_type='parallel'"),
    (tiny_llama, AdapterConfig(adapter_type="pfeiffer", ffn_modules=["mlp", "down_proj"]), "hook points nest"),
    (tiny_llama, AdapterConfig(adapter_type="pfeiffer", ffn_modules=["act_fn"]), "without linear layers"),
])
def test_bad_hook_points_fail_at_get_peft_model_and_leave_the_model_alone(build, config, match):
    base = build()
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, config)
    assert not _wrapped(base) and all(p.requires_grad for p in base.parameters())


def test_defaults_are_resolved_into_the_saved_config_only():
    user = AdapterConfig(bottleneck_size=4)
    model = get_peft_model(tiny_bert(), user)
    assert user.attn_modules is None and user.ffn_modules is None
    config = model.peft_config["default"]
    assert config.attn_modules == ["attention.output.dense"] and config.ffn_modules == r".*\.layer\.\d+\.output\.dense"


def test_merge_is_refused_and_unload_restores_the_base():
    base_out = tiny_llama()(IDS).logits
    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4))
    randomize_adapters(model)
    adapted = model(IDS).logits
    with pytest.raises(ValueError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.base_model.model.layers[0].mlp.merge(["default"])  # the layer refuses too, not only PeftModel
    torch.testing.assert_close(model(IDS).logits, adapted, atol=0, rtol=0)
    plain = model.unload()
    assert not _wrapped(plain)
    torch.testing.assert_close(plain(IDS).logits, base_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("inner", ["lora", "ia3"])
@pytest.mark.parametrize("call", ["unload", "merge_and_unload"])
def test_unload_with_an_adapter_inside_a_bottleneck_block(inner, call):
    """A LoRA / IA3 layer inside a block a bottleneck adapter wraps: unload and merge_and_unload unwrap the inner
    layer first (outer first moved its path: an AttributeError, and a half-unloaded model)."""
    from peftkit import IA3Config, LoraConfig

    base_out = tiny_llama()(IDS).logits
    model = get_peft_model(tiny_llama(), AdapterConfig(adapter_type="houlsby", bottleneck_size=4))
    inner_config = (LoraConfig(r=2, target_modules=["q_proj", "down_proj"]) if inner == "lora"
                    else IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    model.add_adapter("inner", inner_config)
    randomize_adapters(model)
    model.set_adapter("inner")  # merge_and_unload merges the active adapter; the bottleneck one is only unwrapped
    adapted = model(IDS).logits
    plain = getattr(model, call)()
    assert not _wrapped(plain) and not model.peft_config
    expected = adapted if call == "merge_and_unload" else base_out
    torch.testing.assert_close(plain(IDS).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(adapted, base_out, atol=1e-3)  # the inner adapter did change the output


def test_adapters_made_beside_a_bottleneck_name_layers_as_on_a_plain_base(tmp_path):
    """Inside a block a bottleneck adapter wraps, q_proj sits at self_attn.base_layer.q_proj. Configs that peftkit
    writes (add_weighted_adapter's targets and rank_pattern, target_modules="auto") name it self_attn.q_proj, so the
    adapter reloads onto a plain base in peftkit and in PEFT; and full plain paths given by the user match it."""
    from peftkit import LoraConfig

    model = get_peft_model(tiny_llama(), AdapterConfig(adapter_type="houlsby", bottleneck_size=4))
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("auto", LoraConfig(r=2, target_modules="auto", auto_criterion="magnitude", auto_budget=0.3))
    randomize_adapters(model)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "c", combination_type="cat")
    for name in ("c", "auto"):
        saved = model.peft_config[name]
        assert "base_layer" not in str(saved.target_modules) + str(saved.rank_pattern), (name, saved)
    model.save_pretrained(tmp_path, selected_adapters=["c", "auto"])
    for name in ("c", "auto"):
        plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / name, adapter_name=name)
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        got = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
        assert len(got) == len(saved) > 0
        import peft  # PEFT finds every target too (it raises for a target that matches nothing)

        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / name), adapter_name=name)
        assert sum("lora_A" in k for k in theirs.state_dict()) == sum("lora_A" in k for k in saved)
    pinned = LoraConfig(r=2, target_modules=["model.layers.0.self_attn.q_proj"],
                        rank_pattern={"model.layers.0.self_attn.q_proj": 3})
    model.add_adapter("pinned", pinned)
    assert model.base_model.model.layers[0].self_attn.base_layer.q_proj.lora_A["pinned"].shape[0] == 3


def test_named_adapters_save_load_keys_and_delete(tmp_path):
    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4))
    model.add_adapter("ffn", AdapterConfig(adapter_type="parallel", bottleneck_size=2, scaling=4.0))
    randomize_adapters(model)
    outs = {}
    for names in ("default", "ffn", ["default", "ffn"]):
        model.set_adapter(names)
        outs[str(names)] = model(IDS).logits
    assert not torch.allclose(outs["default"], outs["ffn"])
    assert not torch.allclose(outs["ffn"], outs[str(["default", "ffn"])]), "both adapters act when both are active"
    model.save_pretrained(tmp_path)
    parts = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    blocks = ("self_attn", "mlp")
    assert keys == {f"base_model.model.model.layers.{i}.{m}.{p}" for i in (0, 1) for m in blocks for p in parts}
    assert set(load_file(tmp_path / "ffn" / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.{i}.mlp.{p}" for i in (0, 1) for p in parts}
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path, "ffn", subfolder="ffn")
    torch.testing.assert_close(loaded(IDS).logits, outs["default"], atol=1e-6, rtol=0)
    loaded.set_adapter(["default", "ffn"])
    torch.testing.assert_close(loaded(IDS).logits, outs[str(["default", "ffn"])], atol=1e-6, rtol=0)
    loaded.delete_adapter("default")
    assert len(_wrapped(loaded)) == 2  # the attention wrappers held only "default": unwrapped
    torch.testing.assert_close(loaded(IDS).logits, outs["ffn"], atol=1e-6, rtol=0)


def test_other_adapters_beside_a_bottleneck_on_berts_linear_hook_points():
    """On BERT the bottleneck adapter wraps the output dense layers themselves: "all-linear" for LoRA / IA3 then
    names the other linear layers (it listed the wrapped Linear as a module called 'base_layer' and failed), and
    naming a wrapped one says it already holds an adapter (it said "is a BottleneckLayer ... name leaf layers")."""
    from peftkit import IA3Config, LoraConfig

    for config in (LoraConfig(r=2, target_modules="all-linear"), IA3Config(target_modules="all-linear", feedforward_modules=[])):
        model = get_peft_model(tiny_bert(), AdapterConfig(bottleneck_size=4), "bn")
        model.add_adapter("x", config)
        targets = model.peft_config["x"].target_modules
        assert "base_layer" not in targets and not any(t.endswith("output.dense") for t in targets)
        assert any(t.endswith("intermediate.dense") for t in targets) and any(t.endswith("query") for t in targets)
    model = get_peft_model(tiny_bert(), AdapterConfig(bottleneck_size=4), "bn")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.output.dense' already holds a BOTTLENECK "
                                         r"adapter; one module cannot take a LORA adapter too"):
        model.add_adapter("x", LoraConfig(r=2, target_modules=["dense"]))
    assert [n for n, _ in model.named_modules()] == before and "x" not in model.peft_config


class _OwnBaseLayer(nn.Module):
    """A model with its own submodule called base_layer (not an adapter's): blk.q_proj and blk.base_layer.q_proj."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blk = nn.Module()
        self.blk.q_proj = nn.Linear(8, 8)
        self.blk.base_layer = nn.Sequential()
        self.blk.base_layer.add_module("q_proj", nn.Linear(8, 8))

    def forward(self, x):
        return self.blk.q_proj(x) + self.blk.base_layer.q_proj(x)


@pytest.mark.parametrize("kwargs, ranks", [
    (dict(target_modules=["q_proj"], rank_pattern={"blk.base_layer.q_proj": 2}),
     {"blk.q_proj": 8, "blk.base_layer.q_proj": 2}),
    (dict(target_modules=["q_proj"], exclude_modules=["blk.q_proj"]), {"blk.base_layer.q_proj": 8}),
    (dict(target_modules=["blk.q_proj"]), {"blk.q_proj": 8}),
])
def test_a_models_own_base_layer_keeps_its_name(kwargs, ranks):
    """Only a bottleneck wrapper's base_layer is dropped from names (inject.plain_name); with every name kept, these
    picked the wrong modules and ranks (as PEFT does, checked by review)."""
    from peftkit import LoraConfig

    model = get_peft_model(_OwnBaseLayer(), LoraConfig(**kwargs))
    got = {n: m.lora_A["default"].shape[0] for n, m in model.base_model.named_modules() if hasattr(m, "lora_A")}
    assert got == ranks
