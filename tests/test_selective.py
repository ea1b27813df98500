"""Selective fine-tuning: scores, selection, sparse training, checkpoints, errors."""
import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, SelectiveConfig, get_peft_model
from peftkit.methods.selective import SelectiveLayer
from peftkit.methods.selective_codec import decode_index
from peftkit.methods.selective_scoring import score_weights, select, top_k
from conftest import tiny_llama, train_briefly


class Tiny(nn.Module):
    """One bias-free Linear, loss = sum of squared errors: gradients are easy to write by hand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x, labels=None):
        out = self.lin(x)
        return {"logits": out, "loss": None if labels is None else ((out - labels) ** 2).sum()}


def _tiny_batches():
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=gen), "labels": torch.randn(4, 2, generator=gen)} for _ in range(3)]


def _hand_grad(weight, batch):
    # d/dW sum((x W^T - y)^2) = 2 (x W^T - y)^T x, (out, in)
    return 2 * (batch["x"] @ weight.T - batch["labels"]).T @ batch["x"]


@pytest.mark.parametrize("criterion", ["grad", "fisher", "sensitivity", "magnitude"])
def test_scores_equal_hand_computed(criterion):
    model, batches = Tiny(), _tiny_batches()
    weight = model.lin.weight
    weight.requires_grad_(False)  # restored exactly as it was, whatever it was
    before = weight.detach().clone()
    data = None if criterion == "magnitude" else batches
    scores = score_weights(model.train(), {"lin": weight}, criterion, data)["lin"]
    grads = [_hand_grad(before, b) for b in batches]
    expected = {
        "grad": sum(g.abs() for g in grads) / 3,
        "fisher": sum(g ** 2 for g in grads) / 3,
        "sensitivity": sum((before * g).abs() for g in grads) / 3,
        "magnitude": before.abs(),
    }[criterion]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weight, before) and not weight.requires_grad and weight.grad is None and model.training


def test_num_batches_and_loss_fn():
    model, batches = Tiny(), _tiny_batches()
    weight = model.lin.weight.detach().clone()
    only_first = score_weights(model, {"lin": model.lin.weight}, "fisher", batches, num_batches=1)["lin"]
    torch.testing.assert_close(only_first, _hand_grad(weight, batches[0]) ** 2)
    halved = score_weights(model, {"lin": model.lin.weight}, "grad", batches[:1],
                           loss_fn=lambda out, batch: out["loss"] / 2)["lin"]
    torch.testing.assert_close(halved, _hand_grad(weight, batches[0]).abs() / 2)


def test_top_k_exact_and_ties_by_position():
    scores = [torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([3.0, 0.0])]
    assert [c.tolist() for c in top_k(scores, 2)] == [[1, 2], []]  # three 3.0s: the first two by position
    assert [c.tolist() for c in top_k(scores, 3)] == [[1, 2], [0]]
    assert [c.tolist() for c in top_k(scores, 4)] == [[1, 2, 3], [0]]
    assert [c.tolist() for c in select(scores, None, 2.0, "global")] == [[1, 2], [0]]  # strictly above
    assert [c.tolist() for c in select(scores, 0.5, None, "per_module")] == [[1, 2], [0]]


def test_per_module_ranking_keeps_every_module():
    # 10% of a 4-row module rounds to no row: it used to drop out of the selection silently, though named as a target
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    config = SelectiveConfig(criterion="magnitude", budget=0.1, granularity="row", ranking="per_module",
                             target_modules=["0", "2"])
    peft_model = get_peft_model(model, config)
    assert peft_model.peft_config["default"].selected_counts == {"0": 6 * 64, "2": 1 * 64}
    layer = model[2]  # wrapped in place
    assert layer.selective_indices["default"].tolist() == [int(layer.base_layer.weight.abs().mean(1).argmax())]
    assert [c.tolist() for c in select([torch.tensor([1.0, 5.0, 2.0])], 0.1, None, "per_module")] == [[1]]


def _llama_batches(n=2):
    gen = torch.Generator().manual_seed(5)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=gen)), "labels": ids} for _ in range(n)]


def _selected_dense(layer, name="default"):
    # bool mask (out, in) of the entries this adapter trains
    mask = torch.zeros(layer.base_layer.weight.numel(), dtype=torch.bool)
    positions = layer._flat_positions(name)
    mask[positions if positions is not None else slice(None)] = True
    return mask.view(layer.base_layer.weight.shape)


def test_global_budget_selects_exactly_the_top_k():
    batches = _llama_batches()
    base = tiny_llama()
    weights = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    scores = score_weights(base, weights, "fisher", batches)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = round(0.02 * flat.numel())
    expected = set(torch.sort(flat, descending=True, stable=True).indices[:k].tolist())
    model = get_peft_model(base, SelectiveConfig(criterion="fisher", budget=0.02), calibration_batches=batches)
    assert sum(model.peft_config["default"].selected_counts.values()) == k
    got, offset = set(), 0
    for name, score in scores.items():
        module = model.base_model.get_submodule(name)
        if isinstance(module, SelectiveLayer):
            got |= {offset + i for i in module.selective_indices["default"].tolist()}
        offset += score.numel()
    assert got == expected


def test_threshold_selects_exactly_those_above():
    config = SelectiveConfig(criterion="magnitude", threshold=0.05, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(), config)
    for layer in model.base_model.modules():
        if isinstance(layer, SelectiveLayer):
            assert torch.equal(_selected_dense(layer), layer.base_layer.weight.abs() > 0.05)


@pytest.mark.parametrize("granularity", ["element", "row", "module"])
def test_training_changes_only_selected_entries_and_optimizer_is_o_k(granularity):
    budget = {"element": 0.01, "row": 0.05, "module": 0.2}[granularity]
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = SelectiveConfig(criterion="sensitivity", budget=budget, granularity=granularity)
    model = get_peft_model(base, cfg, calibration_batches=_llama_batches()).train()
    counts = model.peft_config["default"].selected_counts
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == sum(counts.values())
    masks = {n: _selected_dense(m) for n, m in model.base_model.named_modules() if isinstance(m, SelectiveLayer)}
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        module = name[: -len(".weight")]
        if module in masks:
            mask = masks[module]
            assert torch.equal(param[~mask], original[name][~mask])  # bit-identical outside the selection
            assert (param[mask] != original[name][mask]).float().mean() > 0.9
        else:
            assert torch.equal(param, original[name]), name


def _trained(granularity="element", budget=0.05):
    model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="grad", budget=budget, granularity=granularity),
                           calibration_batches=_llama_batches())
    train_briefly(model.train(), steps=3, lr=1e-2)
    return model.eval()


@pytest.mark.parametrize("granularity", ["element", "row", "module"])
def test_save_load_merge_unmerge_exact(granularity, ids, tmp_path):
    model = _trained(granularity, 0.2 if granularity == "module" else 0.05)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(ids).logits, expected)
    assert loaded.peft_config["default"].selected_counts == model.peft_config["default"].selected_counts
    base = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    loaded.merge_adapter()
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    loaded.unmerge_adapter()
    for name, param in loaded.base_model.named_parameters():
        if "selective_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_unmerge_after_the_model_changed_dtype_restores_the_base(granularity):
    """The entries a merge overwrote are kept outside the module's tensors, so .to() does not convert them: unmerge
    converts them itself (it failed with a dtype error, and a retry had lost them)."""
    model = _trained(granularity)
    base = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    model.merge_adapter()
    model.to(torch.float64)
    model.unmerge_adapter()
    model.to(torch.float32)
    for name, param in model.base_model.named_parameters():
        if "selective_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name


def test_checkpoint_keys_and_sizes(tmp_path):
    from safetensors.torch import load_file

    model = _trained("row", 0.1)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    counts = model.peft_config["default"].selected_counts
    assert set(tensors) == {f"base_model.model.{n}.selective_{a}" for n in counts for a in ("values", "indices")}
    for name, count in counts.items():
        assert tensors[f"base_model.model.{name}.selective_values"].numel() == count
        width = model.base_model.get_submodule(name).base_layer.in_features
        assert decode_index(tensors[f"base_model.model.{name}.selective_indices"]).numel() == count // width


def test_two_selective_adapters_on_one_model(ids, tmp_path):
    model = _trained("element", 0.05)
    model.add_adapter("rows", SelectiveConfig(criterion="fisher", budget=0.05, granularity="row"),
                      calibration_batches=_llama_batches())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "selective_values.rows" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    model.set_adapter(["default", "rows"])
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "rows", "rows")
    loaded.set_adapter(["default", "rows"])
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)
    base = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    loaded.merge_adapter()
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    loaded.unmerge_adapter()
    assert all(torch.equal(p, base[n]) for n, p in loaded.named_parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0.0}, "budget must be a fraction in"),
    ({"budget": 1.5}, "budget must be a fraction in"),
    ({"budget": 0.1, "threshold": 0.5}, "not both"),
    ({"criterion": "hessian"}, "criterion must be one of"),
    ({"granularity": "module", "ranking": "per_module"}, "use ranking='global'"),
    ({"bias": "lora_only"}, "bias must be one of"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveConfig(**kwargs)


def _assert_untouched(base, original):
    assert not any(isinstance(m, SelectiveLayer) for m in base.modules())
    for name, param in base.named_parameters():
        assert torch.equal(param, original[name]) and param.grad is None and param.requires_grad


@pytest.mark.parametrize("config, batches, message", [
    (SelectiveConfig(criterion="fisher"), None, "pass calibration_batches"),
    (SelectiveConfig(criterion="grad"), [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], "gave no scalar loss"),
    (SelectiveConfig(criterion="grad"), [], "calibration_batches is empty"),
    (SelectiveConfig(criterion="magnitude", threshold=100.0), None, "threshold 100.0 selects nothing"),
    (SelectiveConfig(criterion="magnitude", budget=1e-6), None, "selects nothing"),
    (SelectiveConfig(criterion="magnitude", target_modules=["qproj"]), None, "did you mean 'q_proj'"),
    (SelectiveConfig(criterion="magnitude", target_modules=["embed_tokens"]), None, "nn.Linear weights only"),
    (SelectiveConfig(criterion="magnitude"), [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], "uses no data"),
    (SelectiveConfig(criterion="fisher"),  # every label ignored: the loss is NaN and no weight gets a gradient
     [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.full((2, 4), -100)}], "score is zero"),
])
def test_bad_input_fails_before_training(config, batches, message):
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config, calibration_batches=batches)
    _assert_untouched(base, original)


def test_calibration_takes_tokenizer_output_and_refuses_a_bare_batch():
    from transformers import BatchEncoding

    batches = _llama_batches()
    encoded = [BatchEncoding(dict(b)) for b in batches]  # what tokenizers and DataCollatorWithPadding return
    config = SelectiveConfig(criterion="fisher", budget=0.01)
    from_dicts = get_peft_model(tiny_llama(), config, calibration_batches=batches)
    from_encodings = get_peft_model(tiny_llama(), config, calibration_batches=encoded)
    assert from_dicts.peft_config["default"].selected_counts == from_encodings.peft_config["default"].selected_counts
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(TypeError, match=r"one batch .*pass a list of batches"):
        get_peft_model(base, config, calibration_batches=batches[0])
    _assert_untouched(base, original)


def test_other_methods_refuse_calibration_data():
    with pytest.raises(ValueError, match="take no calibration_batches"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), calibration_batches=_llama_batches())


def test_sequence_classification_trains_selection_and_new_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 64, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 2, 1])}]
    model = get_peft_model(classifier(), SelectiveConfig(task_type="SEQ_CLS", criterion="fisher", budget=0.02),
                           calibration_batches=batches)
    config = model.peft_config["default"]
    assert config.modules_to_save == ["classifier", "score"] and "score" not in config.target_modules
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".selective_values." in n or ".modules_to_save." in n for n in trainable)
    assert any("score.modules_to_save" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()(**batches[0]).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():  # inference: the trained and the loaded model both on the plain path, equal to the bit
        expected = model(input_ids=batches[0]["input_ids"]).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batches[0]["input_ids"]).logits, expected)


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_sparse_forward_matches_dense_delta(granularity):
    model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="magnitude", budget=0.2, granularity=granularity,
                                                         target_modules=["q_proj"]))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.selective_values["default"].normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weight = layer.base_layer.weight
    outputs, grads = [], []
    for run in (lambda: layer(x), lambda: nn.functional.linear(x, weight + layer.delta_weight("default"))):
        out = run()
        out.square().sum().backward()
        outputs.append(out)
        grads.append((x.grad.clone(), layer.selective_values["default"].grad.clone()))
        x.grad, layer.selective_values["default"].grad = None, None
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for sparse, dense in zip(*grads):
        torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


def test_scoring_frees_each_gradient_as_it_goes(monkeypatch):
    import peftkit.methods.selective_scoring as scoring

    base = tiny_llama()
    weights = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    live, accumulate = [], scoring._accumulate

    def counting(criterion, score, weight, grad):
        live.append(sum(w.grad is not None for w in weights.values()))
        accumulate(criterion, score, weight, grad)

    monkeypatch.setattr(scoring, "_accumulate", counting)
    scores = score_weights(base, weights, "fisher", _llama_batches())
    assert len(live) == 2 * len(weights) and max(live) == 1  # one gradient alive at a time, besides the scores
    assert all(s.shape == w.shape and s.dtype == torch.float32 for s, w in zip(scores.values(), weights.values()))


def test_unmerging_one_of_two_overlapping_adapters_keeps_the_other():
    model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="magnitude", budget=0.3, target_modules=["q_proj"]))
    model.add_adapter("other", SelectiveConfig(criterion="magnitude", budget=0.3, target_modules=["q_proj"]))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.selective_values["default"].fill_(1.0)
        layer.selective_values["other"].fill_(2.0)
    layer.merge(["default", "other"])
    layer.unmerge(["default"])  # same selection: "other" alone must remain
    torch.testing.assert_close(layer.base_layer.weight, base + layer.delta_weight("other").detach())
    assert layer.merged_adapters == ["other"]
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, base)


def test_shared_target_fields_restrict_what_is_scored():
    config = SelectiveConfig(criterion="magnitude", budget=0.5, ranking="per_module", target_modules="all-linear",
                             exclude_modules=["o_proj"], layers_to_transform=[1], layers_pattern="layers")
    counts = get_peft_model(tiny_llama(), config).peft_config["default"].selected_counts
    assert counts and all(n.startswith("model.layers.1.") and not n.endswith("o_proj") for n in counts)
    assert len(counts) == 6  # q, k, v, gate, up, down of layer 1, half of each


@pytest.mark.parametrize("bad", ["out_of_range", "repeated"])
def test_corrupt_indices_are_refused_and_base_left_intact(bad, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _trained("element", 0.05)
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("selective_indices") and tensors[k].numel() > 1)
    tensors[key] = decode_index(tensors[key])  # the old raw int64 form, which can hold any corruption
    tensors[key][-1] = 10 ** 6 if bad == "out_of_range" else tensors[key][-2]
    save_file(tensors, file)
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="strictly increasing"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, SelectiveLayer) for m in base.modules())
    assert all(torch.equal(p, original[n]) for n, p in base.named_parameters())


def test_bias_all_trains_every_bias_beside_the_selection_and_reloads(tmp_path):
    """bias="all" (BitFit's parameters next to the sparse deltas): every bias, LayerNorms' included, trains and
    is saved; a fresh base with the adapter loaded gives the same logits."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, num_labels=2)).eval()

    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 64, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}
    model = get_peft_model(classifier(), SelectiveConfig(task_type="SEQ_CLS", budget=0.02, bias="all"),
                           calibration_batches=[batch])
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert any("LayerNorm.bias" in n for n in biases) and any("attention.self.query.base_layer.bias" in n
                                                             or "attention.self.query.bias" in n for n in biases)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in biases}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()(**batch).loss.backward()
    opt.step()
    # every bias moved, except the head's original, which the trained copy stands in for (PEFT's rule keeps both)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if n in biases and "classifier.base_layer" not in n)
    model.eval()
    with torch.no_grad():  # inference: both models on the plain path, so equal to the bit
        expected = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(k.endswith("LayerNorm.bias") for k in saved) == 5  # embeddings + 2 per layer
    loaded = PeftModel.from_pretrained(classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, expected)


@pytest.mark.parametrize("granularity", ["element", "row"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_path_matches_the_plain_path(bias, granularity):
    """Training an element or row selection runs base + delta as one GEMM (a copy of W with the values added); the
    output, the input gradient and every trained gradient equal the plain path's (base GEMM + delta product)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 64, (3, 5), generator=gen), "labels": torch.tensor([0, 1, 1])}
    model = get_peft_model(base, SelectiveConfig(task_type="SEQ_CLS", budget=0.1, bias=bias, granularity=granularity,
                                                 ranking="global" if granularity == "element" else "per_module"),
                           calibration_batches=[batch])
    layers = [m for m in model.modules() if isinstance(m, SelectiveLayer)]
    assert len(layers) > 3 and all(layer.granularity["default"] == granularity for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.selective_values["default"].normal_(std=0.1, generator=gen)

    def run():
        model.zero_grad()
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=batch["labels"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        return out.logits.detach(), embeds.grad, grads

    x = torch.zeros(1, 32)
    assert all(layer._fusable(x) == "default" for layer in layers)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32-class GEMMs would round W + delta: the plain path runs
    try:
        assert all(layer._fusable(x) is None for layer in layers)
    finally:
        torch.set_float32_matmul_precision(previous)
    with torch.no_grad():
        assert all(layer._fusable(x) is None for layer in layers)  # inference (grad mode off) keeps the plain path
    fused = run()
    for layer in layers:
        layer.base_layer.register_forward_hook(lambda mod, inp, out: None)  # a hook sends it down the plain path
        assert layer._fusable(x) is None
    plain = run()
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys() and any(".selective_values." in n for n in fused[2])
    assert (bias == "all") == any(n.endswith("intermediate.dense.base_layer.bias") for n in fused[2])
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name)


@pytest.mark.parametrize("granularity, budget", [("element", 0.05), ("row", 0.1), ("module", 0.3)])
def test_selective_trains_under_bf16_autocast(granularity, budget):
    # mixed precision (torch.autocast, as HF Trainer's bf16=True): the delta's product runs in bf16, its gradient
    # comes back float32 and close to the float32 run's
    batch = _llama_batches(1)[0]
    grads = {}
    for autocast in (False, True):
        model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="magnitude", budget=budget, granularity=granularity))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads[autocast] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[True].items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name
        assert torch.allclose(g, grads[False][name], rtol=0.1, atol=0.02 * float(grads[False][name].abs().max())), name


def test_a_config_holding_a_selection_is_not_reused_as_placeholders(tmp_path):
    # a selected adapter's config records counts per module; a new model built from it without the saved values
    # would train placeholder indices (the first k entries), so it is refused unless the selection is reset
    trained = get_peft_model(tiny_llama(), SelectiveConfig(criterion="fisher", budget=0.01), calibration_batches=_llama_batches())
    config = trained.peft_config["default"]
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    for batches in (None, _llama_batches()):
        with pytest.raises(ValueError, match="already holds a selection"):
            get_peft_model(base, config, calibration_batches=batches)
        _assert_untouched(base, original)
    import dataclasses

    again = get_peft_model(base, dataclasses.replace(config, selected_counts=None), calibration_batches=_llama_batches())
    assert again.peft_config["default"].selected_counts == config.selected_counts  # same data: the same selection
    trained.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert loaded.peft_config["default"].selected_counts == config.selected_counts
    with pytest.raises(ValueError, match="already holds a selection"):  # a loaded adapter's config, reused, too
        get_peft_model(tiny_llama(), loaded.peft_config["default"])


def test_gpt2_conv1d_layers_get_an_error_that_says_so():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"is a Conv1D.*not supported; use LoRA or IA3") as err:
        get_peft_model(model, SelectiveConfig(criterion="magnitude", budget=0.01))  # all-linear by default
    assert "all-linear" not in str(err.value)


def test_tied_weights_are_refused_as_targets():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    original = {n: p.detach().clone() for n, p in tied.named_parameters()}
    for criterion, batches in (("magnitude", None), ("fisher", _llama_batches())):
        with pytest.raises(ValueError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
            get_peft_model(tied, SelectiveConfig(criterion=criterion, budget=0.05, target_modules=["lm_head", "q_proj"]),
                           calibration_batches=batches)
        assert not any(isinstance(m, SelectiveLayer) for m in tied.modules())
        assert all(torch.equal(p, original[n]) for n, p in tied.named_parameters())


def test_num_batches_takes_no_more_than_it_scores_from_an_iterator():
    batches = iter(_llama_batches(3))
    get_peft_model(tiny_llama(), SelectiveConfig(criterion="fisher", budget=0.01, num_batches=2), calibration_batches=batches)
    assert len(list(batches)) == 1  # the third batch is still there for the caller


def test_global_rows_and_modules_fill_the_budget_in_parameters():
    from peftkit.methods.selective_scoring import select

    # hand-made: unit widths 10 (tensor 0) and 100 (tensor 1); budget 0.25 of 4*10 + 2*100 = 240 -> 60 parameters
    scores = [torch.tensor([5.0, 1.0, 4.0, 3.0]), torch.tensor([2.0, 4.5])]
    chosen = select(scores, 0.25, None, "global", widths=[10, 100])
    assert [c.tolist() for c in chosen] == [[0, 1, 2, 3], []]  # 4.5 and 2.0 (100 each) never fit in 60; the rest do
    chosen = select(scores, 0.75, None, "global", widths=[10, 100])
    assert [c.tolist() for c in chosen] == [[0, 1, 2, 3], [1]]  # 5, 4.5, 4, 3 = 130; 2.0 would pass 180; 1.0 fits
    # on a model: whole rows of q_proj (in 32) and down_proj (in 48) ranked together hold the budget's parameters
    for granularity in ("row", "module"):
        config = SelectiveConfig(criterion="magnitude", budget=0.3, granularity=granularity, ranking="global")
        model = get_peft_model(tiny_llama(), config)
        counts = model.peft_config["default"].selected_counts
        weights = {n: m.weight for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
        total, widest = sum(w.numel() for w in weights.values()), max(w.numel() for w in weights.values())
        step = max(w.shape[1] for w in weights.values()) if granularity == "row" else widest
        assert 0.3 * total - step < sum(counts.values()) <= 0.3 * total
