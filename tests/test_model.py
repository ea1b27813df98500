"""Several named adapters on one base: switch, combine, delete, save and load them all."""
import os

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.layers import new_forward_pass, shared_dropout
from conftest import randomize_adapters, tiny_llama

CFG_A = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
CFG_B = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"])


def _two_adapters():
    model = get_peft_model(tiny_llama(), CFG_A)
    model.add_adapter("b", CFG_B)
    randomize_adapters(model)
    return model


def test_switching_adapters_equals_single_adapter_models(ids):
    model = _two_adapters()
    out_a = model(ids).logits
    model.set_adapter("b")
    out_b = model(ids).logits
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    only_b = get_peft_model(tiny_llama(), CFG_B, adapter_name="b")
    only_b.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(only_b(ids).logits, out_b)


def test_only_the_active_adapter_trains():
    model = _two_adapters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable)
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)


def test_two_active_adapters_add_up(ids):
    model = _two_adapters()
    model.set_adapter(["default", "b"])
    both = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.set_adapter("default")
    assert not torch.allclose(model(ids).logits, both, atol=1e-4)


def test_delete_adapter_unwraps_layers_it_alone_used(ids):
    model = _two_adapters()
    model.set_adapter("b")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert type(model.base_model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert "b" not in model.base_model.model.layers[0].self_attn.v_proj.adapter_names
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        model.delete_adapter("b")


def test_save_all_adapters_in_peft_layout_and_load_back(ids, tmp_path):
    model = _two_adapters()
    out_a = model(ids).logits
    model.set_adapter("b")
    out_b = model(ids).logits
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "b"} <= set(os.listdir(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert loaded.active_adapter == "default"
    torch.testing.assert_close(loaded(ids).logits, out_a)
    loaded.set_adapter("b")
    torch.testing.assert_close(loaded(ids).logits, out_b)


def test_unload_gives_back_the_original_model(ids):
    base = tiny_llama()
    base.lm_head.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    expected = base(ids).logits
    model = get_peft_model(base, CFG_A)
    randomize_adapters(model)
    model.merge_adapter()
    plain = model.unload()
    assert plain is base
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == grads
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-6, rtol=0)


def test_print_trainable_parameters(capsys):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    # q_proj is 32 -> 32 in each of 2 layers: (4*32 + 32*4) * 2
    assert trainable == 512
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 512 || all params: {total:,d} || trainable%: {100 * 512 / total:.4f}")


def test_caller_config_is_not_mutated():
    config = LoraConfig(target_modules="all-linear")
    model = get_peft_model(tiny_llama(), config)
    assert config.target_modules == "all-linear"
    assert model.peft_config["default"].target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                           "up_proj", "v_proj"]


def test_dropout_mask_shared_within_a_pass_not_across():
    x = torch.randn(4, 50)
    new_forward_pass()
    first = shared_dropout(x, 0.5)
    assert shared_dropout(x, 0.5) is first  # q, k and v reuse one mask
    assert shared_dropout(x.clone(), 0.5) is not first
    new_forward_pass()
    assert not torch.equal(shared_dropout(x, 0.5), first)



def _gate_up_down(width: int) -> nn.Module:
    """Llama's MLP shape: gate and up read one input, down reads their product (``width`` wide)."""
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(16, width), nn.Linear(16, width), nn.Linear(width, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(0)
    return MLP()


@pytest.mark.parametrize("width", [16, 32])
def test_compiled_training_forward_with_dropout_equals_eager(width):
    """Under torch.compile the dropout cache handed down_proj gate/up's dropped input: silently wrong outputs when
    the widths match (2.2 off at p = 1e-7), a shape error when they differ. Each call now draws its own mask while
    traced; at p = 1e-7 nothing is dropped, so compiled equals eager."""
    model = get_peft_model(_gate_up_down(width), LoraConfig(r=4, target_modules=["gate", "up", "down"],
                                                            lora_dropout=1e-7, init_lora_weights=False)).train()
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing is where the cache went wrong
    torch.testing.assert_close(compiled(x), model(x))


def test_dropout_in_training_takes_inference_tensors():
    """A tensor made under torch.inference_mode has no version counter (the dropout cache's key): a train-mode
    forward under inference_mode, or such a tensor fed in training, raised a RuntimeError; peft runs both."""
    model = get_peft_model(_gate_up_down(16), LoraConfig(r=4, target_modules=["gate", "up", "down"],
                                                         lora_dropout=0.5, init_lora_weights=False)).train()
    with torch.inference_mode():
        x = torch.randn(8, 16)
        assert model(x).shape == (8, 16)
    out = model(x)
    out.sum().backward()
    assert model.base_model.gate.lora_A["default"].grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.clone()))  # eval: no dropout at all

def test_dropout_drawn_once_per_shared_input_in_a_training_pass(ids, monkeypatch):
    """Llama's q/k/v read one hidden state and gate/up another: with all seven projections adapted, a layer
    draws four masks (qkv, o, gate/up, down), and k and v train on the very tensor q was given."""
    from peftkit import layers
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", lora_dropout=0.1)).train()
    draws, apply = [], layers._Dropout.apply
    monkeypatch.setattr(layers._Dropout, "apply", lambda x, *rest: draws.append(x.shape[-1]) or apply(x, *rest))
    seen = {}
    llama = model.base_model
    attn = llama.model.layers[1].self_attn  # layer 0 reads the frozen embeddings: no graph behind its input
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out.grad_fn) and None)
    model(ids).logits.sum().backward()
    assert len(draws) == 4 * len(llama.model.layers)
    hidden, inter = llama.config.hidden_size, llama.config.intermediate_size
    assert sorted(draws[:4]) == sorted([hidden, hidden, hidden, inter])
    dropped = [s.next_functions[1][0] for s in seen.values()]  # the xd input of each fused kernel
    assert dropped[0] is dropped[1] is dropped[2] and type(dropped[0]).__name__ == "_DropoutBackward"


def test_dropout_draws_a_new_mask_per_step_when_layers_are_called_directly():
    """Called without PeftModel's forward (no new pass is announced) on one long-lived input that requires grad:
    each step still draws its own mask, and the second backward does not meet the first step's freed graph."""
    from torch import nn

    from peftkit import get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), LoraConfig(target_modules=["0"], lora_dropout=0.5,
                                                                       init_lora_weights=False)).train()
    x = torch.randn(4, 12, requires_grad=True)
    outs = []
    for _ in range(2):
        out = model.base_model(x)
        out.sum().backward()
        outs.append(out.detach())
    assert not torch.equal(outs[0], outs[1])


def test_dropout_trains_and_is_off_in_eval(ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    randomize_adapters(model)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("native", [False, True])
def test_dropout_keeps_the_right_fraction_and_backpropagates_through_the_mask(native, monkeypatch):
    """On CPU the drawn positions (p = 0.1); with native, the path a GPU takes: torch.native_dropout's mask."""
    from peftkit import layers
    monkeypatch.setattr(layers, "_native_dropout", lambda x: native)
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    new_forward_pass()
    out = shared_dropout(x, 0.1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert abs(out.mean().item() - 1.0) < 0.01  # inverted dropout is unbiased
    out.backward(torch.full_like(out, 2.0))
    torch.testing.assert_close(x.grad, out.detach() * 2.0)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_dropout_masks_are_independent_bernoulli(p):
    """Small p draws the dropped positions by Poisson splitting, large p draws 16 bits per element: both give
    i.i.d. Bernoulli(p) drops: the rate, the rate of neighbouring pairs (p^2) and two masks' overlap."""
    torch.manual_seed(0)
    n = 1_000_000
    drop, scale = _dropped(torch.empty(n), p)
    drop2, _ = _dropped(torch.empty(n), p)
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(drop.float().mean().item() - p) < 5 * sd
    assert abs((drop[1:] & drop[:-1]).float().mean().item() - p * p) < 5 * (p * p / n) ** 0.5
    assert abs((drop & drop2).float().mean().item() - p * p) < 5 * (p * p / n) ** 0.5
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    torch.manual_seed(0)
    assert torch.equal(_dropped(torch.empty(n), p)[0], drop)  # the global seed makes it reproducible
    assert _dropped(torch.empty(0, 4), p)[0].shape == (0, 4)  # an empty batch


def _dropped(x, p):
    """Which elements of ``x`` _Dropout drops (bool, x's shape) and its scale: drawn positions (CPU, p <= 0.2)
    or the 16-bit-lane mask."""
    from peftkit.layers import _lane_mask, _scatters, drop_positions
    if _scatters(x, p):
        dropped = torch.zeros(x.numel(), dtype=torch.bool).index_fill_(0, drop_positions(x, p), True)
        return dropped.view(x.shape), 1 / (1 - p)
    keep, scale = _lane_mask(x, p)
    return ~keep, scale


def test_frozen_head_gets_a_contiguous_input_and_unload_removes_the_hook():
    """torch runs F.linear on a strided 3-D slice against a frozen weight ~6x slower (an expanded-weight bmm);
    logits_to_keep hands the head such a slice, so the wrapper copies it. Same logits; gone after unload."""
    base = tiny_llama()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids, logits_to_keep=1).logits
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    probe = base.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        got = model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [True] and torch.equal(got, expected)
    assert not base.lm_head.weight.requires_grad  # the case the copy is for
    model.unload()
    assert len(base.lm_head._forward_pre_hooks) == 0
    probe.remove()


def test_a_failed_wrap_leaves_no_hook_on_the_head():
    base = tiny_llama()
    with pytest.raises(ValueError):
        get_peft_model(base, LoraConfig(r=2, target_modules=["no_such_module"]))
    assert len(base.lm_head._forward_pre_hooks) == 0


def test_deleting_the_last_adapter_lets_the_base_train_again():
    base = tiny_llama()
    before = {n: p.requires_grad for n, p in base.named_parameters()}
    model = get_peft_model(base, CFG_A)
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    model.delete_adapter("default")
    assert {n: p.requires_grad for n, p in base.named_parameters()} == before and all(before.values())


@pytest.mark.parametrize("name", ["a/b", "../x", "/abs", "a\\b"])
def test_adapter_names_that_are_paths_are_refused(name):
    model = get_peft_model(tiny_llama(), CFG_A)
    with pytest.raises(ValueError, match="slashes"):
        model.add_adapter(name, CFG_B)
    assert list(model.peft_config) == ["default"]


def test_activating_another_adapter_unmerges_the_merged_one_first(ids):
    model = _two_adapters()
    model.set_adapter("b")
    with torch.no_grad():
        only_b = model(ids).logits
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, only_b)
    assert not any(layer.merged_adapters for _, layer in model.named_modules() if hasattr(layer, "merged_adapters"))


def test_an_adapter_loaded_for_inference_runs_in_eval_mode(tmp_path, ids):
    cfg = LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    saved = get_peft_model(tiny_llama(), cfg)
    randomize_adapters(saved)
    saved.save_pretrained(str(tmp_path / "a"))
    saved.add_adapter("b", cfg)
    saved.save_pretrained(str(tmp_path / "ab"), selected_adapters=["b"])
    loaded = PeftModel.from_pretrained(tiny_llama().train(), str(tmp_path / "a"))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, loaded(ids).logits)  # no dropout: the same twice
    trainable = PeftModel.from_pretrained(tiny_llama().train(), str(tmp_path / "a"), is_trainable=True)
    assert trainable.training
    trainable.load_adapter(str(tmp_path / "ab" / "b"), adapter_name="b")
    assert not trainable.training  # load_adapter for inference switches to eval, as PEFT's does


def test_all_linear_for_a_second_adapter_counts_the_layers_the_first_one_wrapped():
    fresh = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    model = get_peft_model(tiny_llama(), CFG_A)  # q_proj, v_proj wrapped
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear"))
    assert model.peft_config["b"].target_modules == fresh.peft_config["default"].target_modules
    layers = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "b" in m.lora_A}
    assert layers == {n for n, m in fresh.named_modules() if hasattr(m, "lora_A")}
    model.add_adapter("c", LoraConfig(r=2, target_modules="all-linear"))  # every linear is wrapped by now
    assert model.peft_config["c"].target_modules == fresh.peft_config["default"].target_modules


@pytest.mark.parametrize("kind", ["lora", "selective"])
def test_bias_all_adapter_saved_beside_another_reloads_onto_a_fresh_base(kind, tmp_path, ids):
    from peftkit import SelectiveConfig

    config = (LoraConfig(r=2, target_modules=["q_proj"], bias="all") if kind == "lora"
              else SelectiveConfig(criterion="magnitude", budget=0.05, bias="all", target_modules=["q_proj"]))
    model = get_peft_model(tiny_llama(bias=True), config)
    randomize_adapters(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(0.1)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))  # wraps layers whose biases "default" trains
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(str(tmp_path), selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(tiny_llama(bias=True), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_merging_into_a_tied_lm_head_leaves_the_embedding_alone(tmp_path, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()

    base = tied()
    embedding = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(base.model.embed_tokens.weight, embedding)
        assert not any("_tied_weight" in n for n, _ in model.named_parameters())
        model.unmerge_adapter()  # tied again, as before the merge
        assert base.lm_head.base_layer.weight is base.model.embed_tokens.weight
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(str(tmp_path))  # saved and reloaded, the merged head is not tied back to the embedding
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_lora_keys_do_not_depend_on_a_bottleneck_adapter_around_the_block(tmp_path, ids):
    from safetensors.torch import load_file

    from peftkit import AdapterConfig

    lora = LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    alone = get_peft_model(tiny_llama(), lora, adapter_name="lora")
    alone.save_pretrained(str(tmp_path / "alone"))
    keys = set(load_file(str(tmp_path / "alone" / "lora" / "adapter_model.safetensors")))
    bottleneck = AdapterConfig(adapter_type="houlsby", bottleneck_size=4)
    for order in ("lora first", "bottleneck first"):
        if order == "lora first":
            model = get_peft_model(tiny_llama(), lora, adapter_name="lora")
            model.add_adapter("b", bottleneck)
        else:  # LoRA can target the layers inside a block a bottleneck adapter wraps
            model = get_peft_model(tiny_llama(), bottleneck, adapter_name="b")
            model.add_adapter("lora", lora)
        randomize_adapters(model)
        model.set_adapter("lora")
        with torch.no_grad():
            expected = model(ids).logits
        model.save_pretrained(str(tmp_path / order), selected_adapters=["lora"])
        assert set(load_file(str(tmp_path / order / "lora" / "adapter_model.safetensors"))) == keys, order
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / order / "lora"))  # onto a plain base
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected)


def test_loading_or_deleting_another_adapter_keeps_the_users_merge(tmp_path, ids):
    import warnings

    model = _two_adapters()
    model.save_pretrained(str(tmp_path), selected_adapters=["b"])
    model.add_adapter("c", CFG_A)
    model.merge_adapter(adapter_names=["b"])  # merged, though "default" is the active one
    with torch.no_grad():
        merged = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unmerging" warning: only the user's set_adapter unmerges
        model.load_adapter(str(tmp_path / "b"), adapter_name="b2")
        model.delete_adapter("c")
    assert any("b" in m.merged_adapters for _, m in model.named_modules() if hasattr(m, "merged_adapters"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged)


def test_a_refused_merge_ties_the_head_back():
    # _untie_for_merge gave lm_head its own copy before any layer merged; a merge refused at an earlier layer left it
    # untied (a second copy of the embedding held for nothing)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    with torch.no_grad():
        base.model.layers[1].self_attn.q_proj.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert base.lm_head.base_layer.weight is base.model.embed_tokens.weight


def test_deleting_an_adapter_merged_into_a_tied_head_ties_it_back(ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    randomize_adapters(model)
    model.merge_adapter()
    model.delete_adapter("default")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "selective", "lora-tied-head"])
def test_a_reference_pass_under_disable_adapter_leaves_a_pending_backward_intact(kind):
    """One adapter merged ("sft"), another training ("dpo"), and a reference pass under disable_adapter() (which
    unmerges and merges back) between the forward and its backward, as DPO trainers run it: merges write the
    weight through .data, as PEFT does, so the backward runs, with the gradients it has without that pass. With
    "sft" on a tied lm_head, the head's own copy (which the pending backward saved) gets its merge back."""
    from peftkit import IA3Config, SelectiveConfig

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    def first():
        return {"lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                "dora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
                "ia3": lambda: IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
                "selective": lambda: SelectiveConfig(target_modules=["down_proj"], criterion="magnitude", budget=0.1),
                "lora-tied-head": lambda: LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
                }[kind]()

    def base():
        if kind != "lora-tied-head":
            return tiny_llama()
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))

    def dpo_grads(reference_pass: bool) -> dict:
        model = get_peft_model(base(), first(), adapter_name="sft")
        model.add_adapter("dpo", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model)
        model.set_adapter("dpo")
        model.merge_adapter(["sft"])
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        if reference_pass:
            with torch.no_grad(), model.disable_adapter():
                reference = model(input_ids=ids, labels=ids).loss
            loss = loss - reference
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, with_reference = dpo_grads(False), dpo_grads(True)
    assert plain.keys() == with_reference.keys() and any(".dpo" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(with_reference[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_wrapping_reads_checkpointing_without_transformers_deprecation_warning():
    """transformers 5 deprecates is_gradient_checkpointing (every get_peft_model warned); the newer name is read."""
    import warnings

    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model.train()(input_ids=ids, labels=ids).loss.backward()  # reentrant checkpointing still reaches the adapters
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_adapter_makes_the_adapter_trainable_unless_inference_mode(tmp_path):
    # PEFT's set_adapter(name, inference_mode=False): an adapter loaded for inference becomes trainable when set;
    # peftkit kept it frozen (code that loads, sets and trains had nothing to train) and refused the keyword
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert _trainable(model) == set()
    model.set_adapter("default", inference_mode=True)
    assert _trainable(model) == set()
    model.set_adapter("default")
    names = _trainable(model)
    assert len(names) == 4 and all(".lora_" in n and n.endswith(".default") for n in names)
    model.set_requires_grad("default", requires_grad=False)
    assert _trainable(model) == set()
    model.set_requires_grad(["default"])
    assert _trainable(model) == names
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.set_requires_grad("nope")
    frozen = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert _trainable(frozen) == set()  # get_peft_model keeps the config's inference_mode


def test_two_adapters_with_their_own_head_copy_cannot_run_together():
    # only one copy of a head can run: the other adapter's copy got no gradient and was saved untrained
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2, num_labels=2,
                                                      pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"adapters \['default', 'b'\] each train their own copy of 'score'"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default"]
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"]))  # no head of its own: fine beside one
    model.set_adapter(["default", "c"])
    assert model.active_adapters == ["default", "c"]


def test_an_adapter_added_after_the_last_was_deleted_is_active():
    # it was left inactive and frozen: a model with one adapter that neither ran nor trained
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.delete_adapter("default")
    assert model.active_adapters == [] and _trainable(model)  # the base trains again, as before get_peft_model
    model.add_adapter("next", LoraConfig(r=4, target_modules=["v_proj"]))
    assert model.active_adapters == ["next"]
    assert len(_trainable(model)) == 4 and all("v_proj.lora_" in n for n in _trainable(model))  # base frozen again
    model.add_adapter("later", LoraConfig(r=4, target_modules=["q_proj"]))  # one is active: the new one waits
    assert model.active_adapters == ["next"]
