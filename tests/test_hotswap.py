"""Hot swap: in-place loads equal fresh loads, keep the tensor objects, never recompile a compiled model."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.hotswap import hotswap_adapter, prepare_for_hotswap
from conftest import randomize_adapters, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def saved(tmp_path, name: str, config, seed: int, layers: int = 2) -> str:
    """Save a random adapter for the tiny Llama under tmp_path / name; its directory."""
    model = get_peft_model(tiny_llama(layers=layers), config)
    randomize_adapters(model, seed=seed)
    model.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def live(model) -> dict[str, tuple[int, int]]:
    return {k: (id(t), t.data_ptr()) for k, t in model.adapter_parameters("default").items()}


@pytest.fixture
def dirs(tmp_path):
    a = saved(tmp_path, "a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), seed=1)
    # smaller rank, rsLoRA, a per-module rank and alpha: every scaling differs from a's
    b = saved(tmp_path, "b", LoraConfig(r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5}), seed=2)
    return a, b


def test_hotswap_equals_a_fresh_load_in_the_same_tensors(dirs, tmp_path, ids):
    a, b = dirs
    model = PeftModel.from_pretrained(tiny_llama(), a)
    before, out_a = live(model), logits(model, ids)
    hotswap_adapter(model, b)
    out_b = logits(PeftModel.from_pretrained(tiny_llama(), b), ids)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    assert torch.allclose(logits(model, ids), out_b, atol=1e-5)
    assert live(model) == before
    model.save_pretrained(str(tmp_path / "swapped"))  # the old config with the folded B: the same adapter
    assert torch.allclose(logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "swapped")), ids), out_b, atol=1e-5)
    model.hotswap_adapter(a)  # the PeftModel method; and back again
    assert torch.allclose(logits(model, ids), out_a, atol=1e-5)


def test_compiled_model_does_not_recompile_after_a_swap(dirs, ids, tmp_path):
    a = saved(tmp_path, "a1", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), seed=1, layers=1)
    b = saved(tmp_path, "b1", LoraConfig(r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"]),
              seed=2, layers=1)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = PeftModel.from_pretrained(tiny_llama(layers=1), a)
    compiled = torch.compile(model, backend=counting_backend)
    assert torch.allclose(logits(compiled, ids), logits(model, ids), atol=1e-5)
    logits(compiled, ids)
    compiled_once = len(graphs)
    assert compiled_once >= 1
    hotswap_adapter(model, b)
    assert torch.allclose(logits(compiled, ids), logits(PeftModel.from_pretrained(tiny_llama(layers=1), b), ids), atol=1e-5)
    assert len(graphs) == compiled_once  # no recompilation
    # the counter does see recompiles: changing a python-float scaling (what the swap avoids) triggers one
    model.base_model.get_submodule(Q).scaling["default"] *= 2
    logits(compiled, ids)
    assert len(graphs) > compiled_once
    torch._dynamo.reset()


def test_larger_rank_needs_prepare_for_hotswap(dirs, tmp_path, ids):
    a, b = dirs
    model = PeftModel.from_pretrained(tiny_llama(), b)  # ranks 4 (q) and 2 (v)
    out_b = logits(model, ids)
    with pytest.raises(ValueError, match=r"rank 8 .* exceeds .* rank 4.*prepare_for_hotswap\(model, target_rank=8\)"):
        hotswap_adapter(model, a)
    assert torch.equal(logits(model, ids), out_b)  # refused before any change
    scalings = {p: m.scaling["default"] for p, m in peftkit.inject.adapter_layers(model.base_model)}
    prepare_for_hotswap(model, 8)
    assert torch.allclose(logits(model, ids), out_b, atol=1e-6)
    config = model.peft_config["default"]
    assert config.r == 8 and config.rank_pattern == {}
    for path, layer in peftkit.inject.adapter_layers(model.base_model):
        assert layer.lora_A["default"].shape[0] == 8 and layer.scaling["default"] == scalings[path]
        assert config.scaling_for(path) == pytest.approx(scalings[path], rel=1e-12)
    model.save_pretrained(str(tmp_path / "padded"))
    assert torch.allclose(logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "padded")), ids), out_b, atol=1e-5)
    hotswap_adapter(model, a)
    assert torch.allclose(logits(model, ids), logits(PeftModel.from_pretrained(tiny_llama(), a), ids), atol=1e-5)
    with pytest.raises(ValueError, match="above target_rank 4"):
        prepare_for_hotswap(model, 4)


def test_refusals_leave_the_adapter_alone(dirs, tmp_path, ids):
    a, _ = dirs
    other = saved(tmp_path, "qk", LoraConfig(r=8, target_modules=["q_proj", "k_proj"]), seed=3)
    ia3 = saved(tmp_path, "ia3", IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]), seed=3)
    model = PeftModel.from_pretrained(tiny_llama(), a)
    out = logits(model, ids)
    with pytest.raises(ValueError, match="target modules differ.*v_proj.*is missing"):
        hotswap_adapter(model, other)
    with pytest.raises(ValueError, match="swaps LoRA adapters.*IA3"):
        hotswap_adapter(model, ia3)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        hotswap_adapter(model, a, adapter_name="x")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, a)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, ids), out, atol=1e-5)
    ia3_model = PeftModel.from_pretrained(tiny_llama(), ia3)
    with pytest.raises(ValueError, match="swaps LoRA adapters.*'default' is a IA3"):
        hotswap_adapter(ia3_model, a)


def test_many_loads_flag_exactly_the_active_adapter_without_walking_the_model(dirs, monkeypatch):
    a, b = dirs
    base = tiny_llama()
    model = PeftModel.from_pretrained(base, a, is_trainable=True)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    # after the first, each load touches only the new adapter and the active one (no walk over every parameter)
    def walked(*args, **kwargs):
        pytest.fail("load_adapter walked every parameter")

    monkeypatch.setattr(model, "parameters", walked)
    monkeypatch.setattr(model.base_model, "parameters", walked)
    for i in range(5):
        model.load_adapter(b if i % 2 else a, f"x{i}", is_trainable=True)
    monkeypatch.undo()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, on in grads.items() if on} and all(".default" in n for n in trainable)
    model.set_adapter("x3")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(".x3")} != set()
    model.unload()
    assert not any(p.requires_grad is False for p in base.parameters())  # the user's flags come back


def _beside_bottleneck(seed: int):
    """LoRA on q_proj inside blocks a bottleneck adapter wraps, its alpha_pattern keyed by a plain dotted path."""
    model = get_peft_model(tiny_llama(), peftkit.AdapterConfig(bottleneck_size=4), adapter_name="bn")
    model.add_adapter("default", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"],
                                            alpha_pattern={"layers.0.self_attn.q_proj": 16}))
    model.set_adapter(["bn", "default"])
    randomize_adapters(model, seed=seed)
    return model.eval()


def test_hotswap_and_prepare_beside_a_bottleneck_adapter_keep_each_layers_scaling(tmp_path):
    """Inside the bottleneck's wrapper q_proj's path holds base_layer; the config's patterns name the plain path.
    Hotswap folded the wrong scaling into B (silently wrong outputs), and prepare_for_hotswap wrote alpha_pattern
    keys with base_layer in them, which no reload matches."""
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    source = _beside_bottleneck(3)
    source.save_pretrained(str(tmp_path / "src"))
    with torch.no_grad():
        want = source(input_ids=ids).logits
    model = _beside_bottleneck(5)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if "lora_" not in k}, strict=False)
    hotswap_adapter(model, str(tmp_path / "src"), "default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-6, rtol=0)
    prepare_for_hotswap(model, 8)
    assert "base_layer" not in str(model.peft_config["default"].alpha_pattern)
    model.save_pretrained(str(tmp_path / "prepared"), selected_adapters=["default"])
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "prepared"))
    live = {n.replace(".base_layer", ""): m.scaling["default"] for n, m in model.base_model.named_modules()
            if hasattr(m, "lora_A")}
    loaded = {n: m.scaling["default"] for n, m in plain.base_model.named_modules() if hasattr(m, "lora_A")}
    assert loaded == live and len(set(live.values())) == 2
