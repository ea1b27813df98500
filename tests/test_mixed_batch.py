"""Mixed-adapter batches: model(..., adapter_names=[...]) equals running each row with its adapter alone."""
import pytest
import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.layers import current_rows
from peftkit.model import BASE_ADAPTER

from conftest import randomize_adapters, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def three_adapters(dora_b: bool = False):
    """Adapters of different ranks, alphas and targets: a (r 4), b (r 8, rsLoRA), c (r 2, attention only)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL, use_dora=dora_b))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model.eval()


def row_by_row(model, names, **inputs):
    """Each row's logits with its adapter alone (set_adapter / disable_adapter)."""
    out = []
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                out.append(model(**row).logits)
        else:
            model.set_adapter(name)
            out.append(model(**row).logits)
    return torch.cat(out)


NAMES = ["a", BASE_ADAPTER, "b", "c", "a", "b"]


@pytest.mark.parametrize("dora", [False, True])
def test_forward_equals_single_adapter(dora):
    model = three_adapters(dora_b=dora)
    ids = torch.randint(0, 64, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        expected = row_by_row(model, NAMES, input_ids=ids)
    assert torch.allclose(mixed, expected, atol=1e-5)
    assert current_rows() is None  # the context is gone after the pass


def test_padding_and_attention_mask():
    model = three_adapters()
    ids = torch.randint(0, 64, (len(NAMES), 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[3, :5] = 0
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        expected = row_by_row(model, NAMES, input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert torch.allclose(mixed[keep], expected[keep], atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_generate_equals_single_adapter_generate(dora):
    model = three_adapters(dora_b=dora)
    ids = torch.randint(1, 64, (len(NAMES), 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :2] = 0  # left padding in two rows
    mask[1, :2] = 0
    ids[4, :4] = 0
    mask[4, :4] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kw)
    for i, name in enumerate(NAMES):
        row = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                alone = model.generate(**row, **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(**row, **kw)
        assert torch.equal(mixed[i], alone[0]), (i, name)
    # the rows really differ by adapter (the test would be vacuous otherwise)
    with torch.no_grad():
        logits = model(input_ids=ids[:1].repeat(4, 1), adapter_names=["a", "b", "c", BASE_ADAPTER]).logits
    assert all((logits[i] - logits[3]).abs().max() > 1e-3 for i in range(3))


def test_cache_invalidated_by_optimizer_step():
    model = three_adapters()
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["a", "b", BASE_ADAPTER]
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=names).logits
    model.set_adapter("a")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids, adapter_names=names).logits
        expected = row_by_row(model, names, input_ids=ids)
    assert not torch.allclose(before[0], after[0], atol=1e-4)
    assert torch.allclose(after, expected, atol=1e-5)


def test_cache_follows_added_and_deleted_adapters():
    model = three_adapters()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "b"])
        model.add_adapter("d", LoraConfig(r=3, target_modules=ALL, init_lora_weights=False))
        model.delete_adapter("b")
        model.eval()
        mixed = model(input_ids=ids, adapter_names=["d", "a"]).logits
        expected = row_by_row(model, ["d", "a"], input_ids=ids)
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_gradients_flow_through_mixed_batch():
    model = three_adapters()
    model.set_adapter(["a", "b"])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids, adapter_names=["a", BASE_ADAPTER]).loss.backward()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["a"].grad.abs().sum() > 0
    assert layer.lora_B["b"].grad is None or layer.lora_B["b"].grad.abs().sum() == 0


def test_training_a_mixed_batch_under_gradient_checkpointing_is_refused():
    """The checkpoint's recompute runs in backward, outside the batch: it ran the active adapters instead of each
    row's, so the gradients came out wrong (up to 161 off) with the loss unchanged."""
    model = three_adapters()
    model.set_adapter(["a", "b"])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(ValueError, match="cannot train under gradient checkpointing"):
        model(input_ids=ids, labels=ids, adapter_names=["a", "b"])
    with torch.no_grad():  # no backward, no recompute: served as usual
        served = model(input_ids=ids, adapter_names=["a", "b"]).logits
    # generate builds no graph: not refused (it was); a model with nothing trainable is, as its inputs may still
    # need gradients (enable_input_require_grads), which the recompute would get wrong (42 off in a review)
    assert model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=2, do_sample=False).shape == (2, 7)
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    with pytest.raises(ValueError, match="cannot train under gradient checkpointing"):
        model(input_ids=ids, adapter_names=["a", "b"])
    for name in ("a", "b"):
        model.set_requires_grad(name, True)
    model.gradient_checkpointing_disable()
    with torch.no_grad():
        assert torch.equal(served, model(input_ids=ids, adapter_names=["a", "b"]).logits)
    model(input_ids=ids, labels=ids, adapter_names=["a", "b"]).loss.backward()  # trains without checkpointing


def test_errors_before_compute():
    model = three_adapters()
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="3 names for a batch of 2"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(input_ids=ids, adapter_names="a")
    with pytest.raises(ValueError, match="3 names for a batch of 2"):
        model.generate(input_ids=ids, adapter_names=["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(input_ids=ids, adapter_names=["a", "b"], num_beams=2, max_new_tokens=2)
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.unmerge_adapter()
    dropped = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_dropout=0.1, target_modules=ALL), "x").train()
    with pytest.raises(ValueError, match="dropout"):
        dropped(input_ids=ids, adapter_names=["x", BASE_ADAPTER])
    assert current_rows() is None


def test_unsupported_layer_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), "e")
    with pytest.raises(ValueError, match="LoraEmbedding does not support mixed"):
        model(input_ids=torch.randint(0, 64, (1, 4)), adapter_names=["e"])


def test_context_cleared_on_exception(monkeypatch):
    from peftkit.methods import lora_mixed

    def boom(*args):
        raise RuntimeError("boom")

    model = three_adapters()
    monkeypatch.setattr(lora_mixed, "mixed_forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=torch.randint(0, 64, (2, 5)), adapter_names=["a", "b"])
    assert current_rows() is None


def test_ia3_rows_equal_single_adapter():
    from peftkit import IA3Config

    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]), "p")
    model.add_adapter("q", IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]))
    randomize_adapters(model)
    names = ["q", BASE_ADAPTER, "p", "q"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        mixed = model.eval()(input_ids=ids, adapter_names=names).logits
        expected = row_by_row(model, names, input_ids=ids)
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_modules_to_save_heads_per_row():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(LlamaForSequenceClassification(config).eval(), lora, "a")
    model.add_adapter("b", lora)
    randomize_adapters(model)
    with torch.no_grad():
        for head in model.base_model.score.modules_to_save.values():
            head.weight.add_(torch.randn(head.weight.shape))
    names = ["b", BASE_ADAPTER, "a"]
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mixed = model.eval()(input_ids=ids, adapter_names=names).logits
        expected = row_by_row(model, names, input_ids=ids)
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_an_active_bottleneck_adapter_refuses_a_mixed_batch_even_of_base_rows(ids):
    from peftkit import AdapterConfig

    model = get_peft_model(tiny_llama(), AdapterConfig(adapter_type="houlsby", bottleneck_size=4))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    rows = [BASE_ADAPTER] * ids.shape[0]
    for names in (rows, ["lora"] * ids.shape[0]):  # it would run on every row, whatever the row names
        with pytest.raises(ValueError, match="bottleneck adapter 'default' runs on every row"):
            model(ids, adapter_names=names)
    model.set_adapter("lora")  # with only LoRA active, base rows are the base model
    with torch.no_grad():
        with model.disable_adapter():
            base = model(ids).logits
        torch.testing.assert_close(model(ids, adapter_names=rows).logits, base)


def test_one_large_adapter_does_not_pad_the_stacks_of_the_others():
    """Every adapter was padded to the largest rank the layer held: twenty rank-4 adapters took 17x their own size
    once a rank-256 one was loaded. Stacked per rank, the stacks hold each adapter once plus a zero slot per rank."""
    from peftkit.methods import lora_mixed

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "s0")
    for i in range(1, 5):
        model.add_adapter(f"s{i}", LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("big", LoraConfig(r=64, lora_alpha=8, target_modules=["q_proj"]))
    randomize_adapters(model)
    model.eval()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    st = lora_mixed.stacks(layer, torch.float32)
    held = sum(layer.lora_A[n].numel() + layer.lora_B[n].numel() for n in layer.lora_A)
    zero_slots = 64 + 2  # one zero slot per rank stack, of that rank
    assert sum(s.a.numel() + s.b.numel() for s in st.ranks) == held + (layer.in_features + layer.out_features) * zero_slots
    assert [s.slots for s in st.ranks] == [("s0", "s1", "s2", "s3", "s4"), ("big",)]
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(2))
    for names in (["s1", "big", BASE_ADAPTER, "s4"], ["s0", "s3", "s0", BASE_ADAPTER]):  # both ranks; one rank
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=names).logits
            assert torch.allclose(mixed, row_by_row(model, names, input_ids=ids), atol=1e-5)
