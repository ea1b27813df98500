"""IA3 maths on tiny modules: output vs input scaling, merging (zeros included), several adapters, config errors."""
import logging

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.ia3 import IA3Layer
from conftest import tiny_llama


class Net(nn.Module):
    """Two independent layers fed the same input: "k" (out 4) and "ff" (out 5), both from 6 features."""

    def __init__(self, kind=nn.Linear):
        super().__init__()
        torch.manual_seed(0)
        self.k = kind(6, 4) if kind is nn.Linear else kind(4, 6)  # GPT-2's Conv1D takes (nf=out, nx=in)
        self.ff = kind(6, 5) if kind is nn.Linear else kind(5, 6)
        with torch.no_grad():
            self.k.bias.normal_()
            self.ff.bias.normal_()

    def forward(self, x):
        return torch.cat([self.k(x), self.ff(x)], dim=-1)


def _randomise(model, seed=0, centre=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + centre - 0.5)


def _vector(model, module, adapter="default"):
    return model.base_model.get_submodule(module).ia3_l[adapter].detach()


@pytest.fixture
def x():
    return torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", [nn.Linear, Conv1D])
def test_output_scaling_and_input_scaling_formulas(kind, x):
    net = Net(kind)
    wk, bk, wf, bf = (t.detach().clone() for t in (net.k.weight, net.k.bias, net.ff.weight, net.ff.bias))
    if kind is Conv1D:  # Conv1D stores (in, out); bring both to Linear's (out, in)
        wk, wf = wk.t(), wf.t()
    model = get_peft_model(net, IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"]))
    assert _vector(model, "k").shape == (4, 1)  # (out, 1): scales the output
    assert _vector(model, "ff").shape == (1, 6)  # (1, in): scales the input
    torch.testing.assert_close(model(x), torch.cat([x @ wk.t() + bk, x @ wf.t() + bf], -1))  # ones: unchanged
    _randomise(model)
    lk, lf = _vector(model, "k").flatten(), _vector(model, "ff").flatten()
    expected = torch.cat([lk * (x @ wk.t() + bk), (x * lf) @ wf.t() + bf], -1)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind", [nn.Linear, Conv1D])
def test_merge_scales_weight_rows_or_columns_and_only_output_bias(kind, x):
    model = get_peft_model(Net(kind), IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"]))
    _randomise(model)
    expected = model(x)
    k, ff = model.base_model.k, model.base_model.ff
    before = {n: t.detach().clone() for n, t in model.base_model.state_dict().items() if "ia3" not in n}
    lk, lf = _vector(model, "k"), _vector(model, "ff")
    model.merge_adapter()
    out_axis_scale = lk if kind is nn.Linear else lk.t()  # (out, 1) or Conv1D's (1, out)
    in_axis_scale = lf if kind is nn.Linear else lf.t()  # (1, in) or Conv1D's (in, 1)
    torch.testing.assert_close(k.base_layer.weight, before["k.base_layer.weight"] * out_axis_scale)
    torch.testing.assert_close(k.base_layer.bias, before["k.base_layer.bias"] * lk.flatten())
    torch.testing.assert_close(ff.base_layer.weight, before["ff.base_layer.weight"] * in_axis_scale)
    assert torch.equal(ff.base_layer.bias, before["ff.base_layer.bias"]), "input scaling must leave the bias alone"
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    for name, tensor in model.base_model.state_dict().items():
        if "ia3" not in name:
            torch.testing.assert_close(tensor, before[name], atol=1e-7, rtol=1e-6, msg=name)


def test_zero_scales_merge_and_unmerge_exactly(x):
    model = get_peft_model(Net(), IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"]))
    _randomise(model)
    with torch.no_grad():
        model.base_model.k.ia3_l["default"][1] = 0.0  # one output silenced
        model.base_model.ff.ia3_l["default"][0, 2] = 0.0  # one input feature dropped
    expected = model(x)
    assert torch.all(expected[..., 1] == 0)
    before = {n: t.detach().clone() for n, t in model.base_model.state_dict().items() if "ia3" not in n}
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)
    with model.disable_adapter():  # unmerges: the zeroed row / column must come back, not stay 0 or turn NaN
        for name, tensor in model.base_model.state_dict().items():
            if "ia3" not in name:
                assert torch.isfinite(tensor).all(), name
                torch.testing.assert_close(tensor, before[name], atol=1e-7, rtol=1e-6, msg=name)
    assert torch.equal(model.base_model.k.base_layer.weight[1], torch.zeros(6)), "merge is back after the block"
    model.unmerge_adapter()
    assert torch.equal(model.base_model.k.base_layer.weight[1], before["k.base_layer.weight"][1])
    assert torch.equal(model.base_model.ff.base_layer.weight[:, 2], before["ff.base_layer.weight"][:, 2])


def test_safe_merge_refuses_non_finite_and_leaves_weights(x):
    model = get_peft_model(Net(), IA3Config(target_modules=["k"], feedforward_modules=[]))
    weight = model.base_model.k.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.k.ia3_l["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.k.base_layer.weight, weight)
    assert model.base_model.k.merged_adapters == []


def test_two_adapters_multiply_and_may_disagree_on_feedforward(x):
    net = Net()
    w, b = net.k.weight.detach().clone(), net.k.bias.detach().clone()
    model = get_peft_model(net, IA3Config(target_modules=["k"], feedforward_modules=["k"]), adapter_name="inp")
    model.add_adapter("outp", IA3Config(target_modules=["k"], feedforward_modules=[]))
    _randomise(model)
    li, lo = _vector(model, "k", "inp"), _vector(model, "k", "outp")
    assert li.shape == (1, 6) and lo.shape == (4, 1)  # the layer keeps feedforward per adapter
    model.set_adapter(["inp", "outp"])
    expected = lo.flatten() * ((x * li.flatten()) @ w.t() + b)
    torch.testing.assert_close(model(x)[..., :4], expected)
    model.set_adapter("outp")
    torch.testing.assert_close(model(x)[..., :4], lo.flatten() * (x @ w.t() + b))
    model.set_adapter(["inp", "outp"])
    model.merge_adapter()
    torch.testing.assert_close(model(x)[..., :4], expected)
    model.delete_adapter("inp")  # unmerges it first
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.k.base_layer.weight, w)
    torch.testing.assert_close(model(x)[..., :4], lo.flatten() * (x @ w.t() + b))


class ConvNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = conv(3, 4, 3, padding=1)
        self.c2 = conv(4, 2, 1)

    def forward(self, x):
        return self.c2(self.c1(x))


@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv3d])
def test_conv_scales_channels_and_merges(conv):
    spatial = (5,) * (2 if conv is nn.Conv2d else 3)
    x = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1))
    model = get_peft_model(ConvNet(conv), IA3Config(target_modules=["c1", "c2"], feedforward_modules=["c2"]))
    ones = (1,) * len(spatial)
    assert _vector(model, "c1").shape == (1, 4, *ones) == _vector(model, "c2").shape  # (1, C, 1, 1[, 1])
    _randomise(model)
    c1, c2 = model.base_model.c1.base_layer, model.base_model.c2.base_layer
    expected = c2(c1(x) * _vector(model, "c1") * _vector(model, "c2"))  # c1's output, then c2's input
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x[0]), expected[0])  # unbatched (C, H, W) input broadcasts too
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# --- defaults and target resolution --------------------------------------------------------------
def test_llama_defaults_match_peft_tables():
    model = get_peft_model(tiny_llama(), IA3Config())
    config = model.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"] and config.feedforward_modules == ["down_proj"]
    layers = {n: m for n, m in model.base_model.named_modules() if isinstance(m, IA3Layer)}
    assert len(layers) == 6
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l["default"].shape == (16, 1)  # 2 kv heads x 8
    assert layers["model.layers.0.mlp.down_proj"].ia3_l["default"].shape == (1, 48)  # intermediate size
    assert model.get_nb_trainable_parameters()[0] == 2 * (16 + 16 + 48)


def test_default_feedforward_keeps_only_targeted_names():
    # PEFT would record feedforward_modules=['down_proj'] here and then refuse to reload its own adapter
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "v_proj"]))
    assert model.peft_config["default"].feedforward_modules == []
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["v_proj", "mlp.down_proj", "o_proj"],
                                                   feedforward_modules=["mlp.down_proj"]))
    assert model.base_model.model.layers[1].mlp.down_proj.ia3_l["default"].shape == (1, 48)
    # a default narrower than a target ("mlp.c_proj" under "c_proj") joins the targets: same modules, and the
    # saved config passes PEFT's exact subset check
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    model = get_peft_model(gpt2, IA3Config(target_modules="all-linear"))
    config = model.peft_config["default"]
    assert config.feedforward_modules == ["mlp.c_proj"] and "mlp.c_proj" in config.target_modules
    assert model.base_model.transformer.h[0].mlp.c_proj.ia3_l["default"].shape == (1, 64)  # input of c_proj
    assert model.base_model.transformer.h[0].attn.c_proj.ia3_l["default"].shape == (16, 1)


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.o = nn.Linear(6, 6)
        self.wo = nn.Linear(6, 3)

    def forward(self, x):
        return self.wo(self.o(x))


def test_feedforward_list_uses_peft_plain_suffix_rule(caplog):
    # PEFT tests key.endswith(name) without a dot: "o" makes "wo" feedforward too; we follow and warn
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        model = get_peft_model(Named(), IA3Config(target_modules=["o", "wo"], feedforward_modules=["o"]))
    assert _vector(model, "o").shape == (1, 6) and _vector(model, "wo").shape == (1, 6)
    assert any("wo" in r.getMessage() for r in caplog.records)
    exact = get_peft_model(Named(), IA3Config(target_modules=["o", "wo"], feedforward_modules=r"o"))
    assert _vector(exact, "o").shape == (1, 6) and _vector(exact, "wo").shape == (3, 1)  # regex: whole name


def test_json_leaves_out_unset_fields_peft_lacks():
    data = IA3Config(target_modules=["k"], feedforward_modules=[]).to_dict()
    assert data["peft_type"] == "IA3" and "layers_to_transform" not in data and "layers_pattern" not in data
    data = IA3Config(target_modules=["k"], feedforward_modules=[], layers_to_transform=1, layers_pattern="h").to_dict()
    assert data["layers_to_transform"] == [1] and data["layers_pattern"] == "h"


def test_init_false_gives_random_vectors():
    model = get_peft_model(Net(), IA3Config(target_modules=["k"], feedforward_modules=[], init_ia3_weights=False))
    assert not torch.allclose(_vector(model, "k"), torch.ones(4, 1))


# --- bad configurations --------------------------------------------------------------------------
def test_feedforward_must_be_targeted():
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["k_proj", "down_proj"])
    with pytest.raises(ValueError, match=r"\['mlp.c_proj'\] are not in target_modules"):  # exact names, as PEFT
        IA3Config(target_modules=["c_proj"], feedforward_modules=["mlp.c_proj"])


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(feedforward_modules=3), TypeError, r"feedforward_modules = 3 \(int\) does not fit: it takes a str or a list"),
    (dict(init_ia3_weights="yes"), ValueError, "init_ia3_weights = 'yes' .*takes a bool; write true without quotes"),
    (dict(layers_pattern="layers"), ValueError, "layers_pattern only takes effect"),
])
def test_bad_field_values(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        IA3Config(target_modules=["k"], **kwargs)


@pytest.mark.parametrize("config, pattern", [
    (IA3Config(), "no default IA3 target_modules for model type None"),
    (IA3Config(target_modules=["k"]), r"no default IA3 feedforward_modules .* or to \[\]"),
    (IA3Config(target_modules=["ffx"], feedforward_modules=[]), "target module 'ffx' not found; did you mean 'ff'"),
])
def test_custom_models_need_explicit_names(config, pattern):
    net = Net()
    with pytest.raises(ValueError, match=pattern):
        get_peft_model(net, config)
    assert isinstance(net.k, nn.Linear), "a failed injection leaves the model untouched"


def test_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="'model.embed_tokens' is a Embedding; IA3 wraps Linear"):
        get_peft_model(tiny_llama(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        get_peft_model(grouped, IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="already holds a LORA adapter"):
        model.add_adapter("ia3", IA3Config())
    assert list(model.peft_config) == ["default"]


def test_add_weighted_adapter_combines_ia3_vectors_as_peft_does(tmp_path):
    """PEFT's IA3 add_weighted_adapter: sum_i w_i l_i per module over the sources that scale it, targets and
    feed-forward modules united. Loaded from PEFT's files, peftkit's combination gives PEFT's logits."""
    import peft as hf_peft

    theirs = hf_peft.get_peft_model(tiny_llama(), hf_peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"]), adapter_name="a")
    theirs.add_adapter("b", hf_peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    gen = torch.Generator().manual_seed(0)
    for name, tensor in theirs.named_parameters():
        if "ia3_l" in name:
            tensor.data = 1 + 0.3 * torch.randn(tensor.shape, generator=gen)
    theirs.save_pretrained(str(tmp_path))
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.3], "c")
    theirs.set_adapter("c")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    ours.load_adapter(str(tmp_path / "b"), "b")
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.3], "c")
    ours.set_adapter("c")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert ours.peft_config["c"].target_modules == ["down_proj", "k_proj", "v_proj"]
    assert ours.peft_config["c"].feedforward_modules == ["down_proj"]
    with pytest.raises(ValueError, match="IA3 adapters combine linearly"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "d", combination_type="svd")
    ours.add_adapter("ff_q", IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"]))
    ours.add_adapter("out_q", IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="scale 'model.layers.0.self_attn.q_proj' on different sides"):
        ours.add_weighted_adapter(["ff_q", "out_q"], [1.0, 1.0], "d")
    assert "d" not in ours.peft_config


def test_ia3_arithmetic_refuses_sources_narrowed_differently_and_names_what_is_wrong():
    """Sources with different exclude_modules: the combined adapter would scale a module no source scales (its
    vector 0: the module's output zeroed) or drop one; refused. (layers_to_transform is saved as the chosen full
    names, so sources narrowed by it combine exactly.) A missing name or a LoRA source among IA3 ones is named (it
    fell through to LoRA's 'combines LoRA adapters only')."""
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                   exclude_modules=["model.layers.0.self_attn.k_proj"]),
                           adapter_name="a")
    model.add_adapter("b", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    model.add_adapter("l", LoraConfig(r=2, target_modules=["q_proj"]))
    for names, needle in ((["a", "b"], r"exclude_modules differ \(\[\['model.layers.0.self_attn.k_proj'\], None\]\)"),
                          (["a", "zz"], "no adapter named 'zz'"),
                          (["a", "l"], r"adapter 'l' is a LORA adapter; add_weighted_adapter combines adapters of one kind \(LoRA with LoRA, IA3")):
        with pytest.raises(ValueError, match=needle):
            model.add_weighted_adapter(names, [1.0, 1.0], "c")
    assert sorted(model.peft_config) == ["a", "b", "l"]


def test_ia3_sources_narrowed_by_layers_to_transform_combine_exactly():
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                   layers_to_transform=[0, 1], init_ia3_weights=False), adapter_name="a")
    model.add_adapter("b", IA3Config(target_modules=["v_proj"], feedforward_modules=[], layers_to_transform=[1],
                                     init_ia3_weights=False))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c")
    assert sorted(model.peft_config["c"].target_modules) == ["model.layers.0.self_attn.k_proj",
                                                            "model.layers.1.self_attn.k_proj",
                                                            "model.layers.1.self_attn.v_proj"]
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        model.set_adapter(["a", "b"])
        both = model(ids).logits
        model.set_adapter("c")
        torch.testing.assert_close(model(ids).logits, both)  # each module scaled by its one source
