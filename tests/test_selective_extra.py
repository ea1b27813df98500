"""Selective fine-tuning, part 2: compact checkpoints, target_modules="auto", refinement, the selection report."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit import IA3Config, LoraConfig, PeftModel, SelectiveConfig, get_peft_model
from peftkit.config import AUTO_CRITERIA
from peftkit.methods.selective import SelectiveLayer
from peftkit.methods.selective_codec import decode_gaps, decode_index, encode_gaps, encode_index
from peftkit.methods.selective_scoring import CRITERIA, score_weights
from conftest import randomize_adapters, tiny_llama, train_briefly


def _batches(n=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=gen)), "labels": ids} for _ in range(n)]


# --- compact indices -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [[], [0], [5], [0, 1, 2, 3], [127, 128, 300, 16511, 16512, 2 ** 40 + 7]])
def test_gap_code_round_trips_edge_values(index):
    index = torch.tensor(index, dtype=torch.long)
    stream = encode_gaps(index)
    assert stream.dtype == torch.uint8 and torch.equal(decode_gaps(stream), index)


def test_gap_code_byte_lengths_and_layout():
    # gaps minus one: 0, 126 (one byte each), 128 (0x80 0x01), 16383 (0xFF 0x7F), 16384 (0x80 0x80 0x01)
    index = torch.tensor([0, 127, 256, 16640, 33025])
    assert encode_gaps(index).tolist() == [0, 126, 0x80, 0x01, 0xFF, 0x7F, 0x80, 0x80, 0x01]


def test_random_sparse_indices_round_trip_and_cost_under_1_4_bytes():
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(1_000_000, generator=gen)[:10_000].sort().values  # 1% of a 1M weight
    stored = encode_index(index, 1_000_000)
    assert stored.dtype == torch.uint8 and stored.numel() < 1.4 * index.numel()
    assert torch.equal(decode_index(stored), index)
    rows = torch.arange(0, 4000, 300)  # gaps of 299: two bytes each, as long as int16: the stream is kept
    assert encode_index(rows, 4000).dtype == torch.uint8 and torch.equal(decode_index(encode_index(rows, 4000)), rows)
    assert encode_index(torch.tensor([20000, 30000]), 2 ** 15).dtype == torch.int16  # 4 bytes < 3 + 2 bytes


def test_truncated_stream_is_refused():
    with pytest.raises(ValueError, match="truncated"):
        decode_gaps(torch.tensor([0x05, 0x80], dtype=torch.uint8))


def _trained(granularity="element", budget=0.05, save_dtype=None):
    config = SelectiveConfig(criterion="grad", budget=budget, granularity=granularity, save_dtype=save_dtype)
    model = get_peft_model(tiny_llama(), config, calibration_batches=_batches())
    train_briefly(model.train(), steps=3, lr=1e-2)
    return model.eval()


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_compact_checkpoint_is_exact_and_smaller(granularity, ids, tmp_path):
    model = _trained(granularity)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    index_keys = [k for k in tensors if k.endswith("selective_indices")]
    assert index_keys and all(tensors[k].dtype in (torch.uint8, torch.int16) for k in index_keys)
    for path, layer in model.base_model.named_modules():
        if isinstance(layer, SelectiveLayer):
            stored = tensors[f"base_model.model.{path}.selective_indices"]
            assert torch.equal(decode_index(stored), layer.selective_indices["default"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(ids).logits, expected)


def test_old_int64_checkpoints_still_load(ids, tmp_path):
    model = _trained("element")
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: decode_index(v) if k.endswith("selective_indices") else v for k, v in load_file(file).items()}
    assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith("selective_indices"))
    save_file(tensors, file)
    assert torch.equal(PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits, expected)


def test_save_dtype_is_opt_in_and_casts_values_only(ids, tmp_path):
    model = _trained("element", save_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    values = [v for k, v in tensors.items() if k.endswith("selective_values")]
    assert values and all(v.dtype == torch.bfloat16 for v in values)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for path, layer in model.base_model.named_modules():
        if isinstance(layer, SelectiveLayer):
            other = loaded.base_model.get_submodule(path)
            want = layer.selective_values["default"].detach().to(torch.bfloat16).float()
            assert torch.equal(other.selective_values["default"], want)
            assert torch.equal(other.selective_indices["default"], layer.selective_indices["default"])
    with pytest.raises(ValueError, match="save_dtype must be"):
        SelectiveConfig(save_dtype="int8")


# --- target_modules="auto" ------------------------------------------------------------------------------------
def _hand_mean_fisher(batches):
    # mean over batches of the squared gradient, then the mean over each module's weight; plain autograd
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    total = {n: 0.0 for n in names}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n in names:
            total[n] = total[n] + model.get_submodule(n).weight.grad.square()
    return {n: float((total[n] / len(batches)).mean()) for n in names}


def test_lora_auto_picks_the_top_modules_saves_them_and_loads_anywhere(ids, tmp_path):
    import peft

    batches = _batches(3)
    means = _hand_mean_fisher(batches)
    expected = sorted(means, key=means.get, reverse=True)[:5]
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="auto", auto_budget=5),
                           calibration_batches=batches)
    chosen = model.peft_config["default"].target_modules
    assert set(chosen) == set(expected) and len(chosen) == 5
    assert sorted(n for n, m in model.base_model.named_modules() if hasattr(m, "lora_A")) == sorted(chosen)
    randomize_adapters(model)
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == chosen and "auto_criterion" not in saved and "auto_budget" not in saved
    assert torch.equal(PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits, out)  # no calibration needed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        oracle = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not [w for w in caught if "auto_" in str(w.message) or "Unexpected" in str(w.message)]
    torch.testing.assert_close(oracle(ids).logits, out, atol=1e-5, rtol=1e-5)


def test_auto_fraction_and_layer_filters():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="auto", auto_budget=0.5, auto_criterion="magnitude",
                                                    layers_to_transform=[1], layers_pattern="layers"))
    chosen = model.peft_config["default"].target_modules
    assert len(chosen) == 4 and all(n.startswith("model.layers.1.") for n in chosen)  # half of layer 1's seven


def test_ia3_auto_keeps_feedforward_a_subset_and_loads_in_peft(ids, tmp_path):
    import peft

    model = get_peft_model(tiny_llama(), IA3Config(target_modules="auto", auto_budget=1.0), calibration_batches=_batches())
    config = model.peft_config["default"]
    assert len(config.target_modules) == 14
    assert config.feedforward_modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    randomize_adapters(model)
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(oracle(ids).logits, out, atol=1e-5, rtol=1e-5)


def test_auto_errors():
    base = tiny_llama()
    with pytest.raises(ValueError, match="pass calibration_batches"):
        get_peft_model(base, LoraConfig(target_modules="auto"))
    assert not any(hasattr(m, "lora_A") for m in base.modules())
    with pytest.raises(ValueError, match="auto_budget must be"):
        LoraConfig(target_modules="auto", auto_budget=0)
    with pytest.raises(ValueError, match="auto_criterion must be"):
        LoraConfig(target_modules="auto", auto_criterion="hessian")
    assert set(AUTO_CRITERIA) == set(CRITERIA)
    assert "auto_budget" not in LoraConfig(target_modules=["q_proj"]).to_dict()
    with pytest.raises(ValueError, match="for LoraConfig / IA3Config"):
        SelectiveConfig(target_modules="auto")


# --- progressive refinement ----------------------------------------------------------------------------------
def _trained_selective(config):
    """A selective tiny Llama after three Adam steps on one batch (eval mode), its optimizer and that batch."""
    model = get_peft_model(tiny_llama(), config, calibration_batches=_batches())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batches(1, seed=9)[0]
    for _ in range(3):
        model.train()(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), opt, batch


def _dense_deltas(model, name="default"):
    return {p: m.delta_weight(name).detach().clone() for p, m in model.base_model.named_modules()
            if isinstance(m, SelectiveLayer) and name in m.adapter_names}


@pytest.mark.parametrize("granularity, old, new", [("element", 0.05, 0.02), ("row", 0.2, 0.1), ("element", 0.02, 0.05)])
def test_refine_keeps_surviving_values_drops_the_rest_and_remaps_adam(granularity, old, new, ids):
    import copy

    from peftkit.methods.selective_refine import refine

    model, opt, batch = _trained_selective(SelectiveConfig(criterion="fisher", budget=old, granularity=granularity))
    before = _dense_deltas(model)
    moments = {p: _scatter_state(m, opt) for p, m in model.base_model.named_modules() if isinstance(m, SelectiveLayer)}
    reference = copy.deepcopy(model)
    counts = refine(model, _batches(), new, optimizer=opt)
    scored = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    if granularity == "element":
        assert sum(counts.values()) == round(new * scored)
    assert counts == model.peft_config["default"].selected_counts and model.peft_config["default"].budget == new
    after = _dense_deltas(model)
    for path, delta in after.items():
        mask = _mask(model.base_model.get_submodule(path))
        old_delta = before.get(path, torch.zeros_like(delta))
        assert torch.equal(delta, old_delta * mask)  # kept entries keep their values, new ones start at zero
        old_m = moments.get(path, torch.zeros_like(delta))
        assert torch.equal(_scatter_state(model.base_model.get_submodule(path), opt), old_m * mask)
    with torch.no_grad():  # the output changes only by the dropped deltas: zero them on the reference
        for path, layer in reference.base_model.named_modules():
            if isinstance(layer, SelectiveLayer):
                keep = _mask(model.base_model.get_submodule(path)) if path in after else torch.zeros_like(before[path])
                flat = layer._flat_positions("default")
                layer.selective_values["default"].mul_(keep.view(-1)[flat])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    held = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert held == sum(counts.values())
    model.train()(**batch).loss.backward()  # the optimizer steps on the new sizes
    opt.step()


def test_refine_carries_accumulated_gradients_and_keeps_frozen_adapters_frozen():
    from peftkit.methods.selective_refine import refine

    model, opt, batch = _trained_selective(SelectiveConfig(criterion="fisher", budget=0.05))
    model.train()(**batch).loss.backward()  # a gradient accumulated before the refine
    before = {p: (m._flat_positions("default").clone(), m.selective_values["default"].grad.clone())
              for p, m in model.base_model.named_modules() if isinstance(m, SelectiveLayer)}
    refine(model, _batches(), 0.03, optimizer=opt)
    for path, layer in model.base_model.named_modules():
        if not isinstance(layer, SelectiveLayer):
            continue
        values, flat = layer.selective_values["default"], layer._flat_positions("default")
        assert values.grad is not None and values.grad.shape == values.shape
        old_flat, old_grad = before.get(path, (flat[:0], values.grad[:0]))
        dense = torch.zeros(layer.base_layer.weight.numel())
        dense[old_flat] = old_grad
        assert torch.equal(values.grad, dense[flat])  # kept entries keep their gradient, new ones start at zero
    model.train()(**batch).loss.backward()  # accumulates onto the carried gradients
    opt.step()
    # an adapter that is not trained (inactive, or loaded for inference) stays frozen through a refine
    model.add_adapter("b", SelectiveConfig(criterion="fisher", budget=0.02), calibration_batches=_batches())
    refine(model, _batches(), 0.05, adapter_name="b")
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".b"))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("selective_values.default"))


@pytest.mark.parametrize("granularity, ranking, old, budget, f", [
    ("element", "global", 0.05, 0.05, 0.5), ("element", "global", 0.05, 0.02, 0.5),
    ("element", "global", 0.02, 0.05, 0.5), ("row", "per_module", 0.25, 0.25, 0.5),
    ("row", "per_module", 0.5, 0.8, 1.0)])  # the last: fewer unselected rows than the grown share
def test_refine_regrow_keeps_the_largest_trained_deltas_and_grows_the_best_scores(granularity, ranking, old, budget, f):
    """Drop and grow: of the k units the budget allows, the (1 - f) k held units with the largest |delta| (mean
    over a row) stay with their values (all held ones if fewer; more if too few units are left to grow into);
    the rest are the best-scoring units not held before, starting at zero."""
    from peftkit.methods.selective_refine import _score_adapted, refine
    from peftkit.methods.selective_scoring import unit_scores

    model, opt, _ = _trained_selective(SelectiveConfig(criterion="sensitivity", budget=old, ranking=ranking,
                                                       granularity=granularity))
    config, base = model.peft_config["default"], model.base_model
    layers = {p: m for p, m in base.named_modules() if isinstance(m, SelectiveLayer)}
    names = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    weights = {n: (layers[n].base_layer if n in layers else base.get_submodule(n)).weight for n in names}
    scores = _score_adapted(base, weights, config, "default", _batches(), None)
    before = {}  # (module, unit) -> (|delta| of the unit, its values)
    for path, layer in layers.items():
        values = layer.selective_values["default"].detach()
        index = layer.selective_indices["default"]
        rows = values.view(index.numel(), -1)
        before.update({(path, int(u)): (float(rows[j].abs().mean()), rows[j].clone()) for j, u in enumerate(index)})
    refine(model, _batches(), budget, optimizer=opt, regrow=f)
    groups = [[n] for n in names] if ranking == "per_module" else [names]
    for group in groups:
        units = {n: unit_scores(scores[n], granularity) for n in group}
        k = round(budget * sum(u.numel() for u in units.values()))
        total = sum(u.numel() for u in units.values())
        held_here = sorted((m, key) for key, (m, _) in before.items() if key[0] in group)
        keep = min(len(held_here), max(round((1 - f) * k), k - (total - len(held_here))))
        expect_kept = {key for _, key in held_here[len(held_here) - keep:]}
        after = {}
        for n in group:
            layer = base.get_submodule(n)
            if isinstance(layer, SelectiveLayer) and "default" in layer.adapter_names:
                index = layer.selective_indices["default"]
                rows = layer.selective_values["default"].detach().view(index.numel(), -1)
                after.update({(n, int(u)): rows[j] for j, u in enumerate(index)})
        assert len(after) == k
        assert {key for key in after if key in before} == expect_kept
        for key in expect_kept:
            assert torch.equal(after[key], before[key][1])  # kept with its trained values
        grown = [key for key in after if key not in before]
        assert all(not after[key].any() for key in grown)  # new units start at zero
        rest = sorted(((float(units[n][u]), (n, u)) for n in group for u in range(units[n].numel())
                       if (n, u) not in before), reverse=True)
        assert {key for _, key in rest[:len(grown)]} == set(grown)
    with pytest.raises(ValueError, match="regrow must be a fraction"):
        refine(model, _batches(), budget, regrow=0.0)


def _mask(layer):
    mask = torch.zeros(layer.base_layer.weight.numel())
    mask[layer._flat_positions("default")] = 1.0
    return mask.view(layer.base_layer.weight.shape)


def _scatter_state(layer, opt):
    # Adam's first moment of this layer's values as a dense (out, in) tensor (zero where none)
    values = layer.selective_values["default"]
    state = opt.state.get(values, {}).get("exp_avg", torch.zeros_like(values))
    dense = torch.zeros(layer.base_layer.weight.numel())
    dense[layer._flat_positions("default")] = state.detach()
    return dense.view(layer.base_layer.weight.shape)


def test_refine_errors():
    from peftkit.methods.selective_refine import refine

    model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="magnitude", budget=0.05))
    with pytest.raises(ValueError, match="budget must be a fraction"):
        refine(model, None, 1.5)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        refine(model, None, 0.02)
    with pytest.raises(ValueError, match="selective adapter named"):
        refine(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])), None, 0.02)


# --- report --------------------------------------------------------------------------------------------------
def test_report_counts_match_saved_indices_and_png_is_valid(tmp_path):
    from peftkit.methods.selective_report import split_name

    model = _trained("row", 0.1)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    per_module, per_cell = {}, {}
    for key, stored in tensors.items():
        if key.endswith("selective_indices"):
            path = key[len("base_model.model."):-len(".selective_indices")]
            width = model.base_model.get_submodule(path).base_layer.in_features
            per_module[path] = decode_index(stored).numel() * width
            cell = split_name(path)
            per_cell[cell] = per_cell.get(cell, 0) + per_module[path]
    text = (tmp_path / "selection.md").read_text()
    table, modules = text.split("## Per module")
    header = [h.strip() for h in table.splitlines()[6].strip("|").split("|")]
    for line in table.splitlines()[8:]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for kind, value in zip(header[1:-1], cells[1:-1]):
                assert int(value) == per_cell.get((cells[0], kind), 0)
            assert int(cells[-1]) == sum(v for (layer, _), v in per_cell.items() if layer == cells[0])
    rows = {c[0]: int(c[1]) for c in (line.strip("|").split("|") for line in modules.splitlines() if line.startswith("| model"))}
    assert {k.strip(): v for k, v in rows.items()} == per_module
    png = (tmp_path / "selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert split_name("model.layers.12.self_attn.q_proj") == ("12", "self_attn.q_proj")
    assert split_name("bert.pooler.dense") == ("-", "bert.pooler.dense")


def test_refine_into_a_module_another_method_wraps_is_refused_before_any_change():
    from peftkit.methods.selective_refine import refine

    model = get_peft_model(tiny_llama(), SelectiveConfig(criterion="fisher", budget=0.005), calibration_batches=_batches())
    counts = dict(model.peft_config["default"].selected_counts)
    linear = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    free = [n for n in linear if n not in counts]
    model.add_adapter("lora", LoraConfig(r=2, target_modules=[free[-1]]))
    before = _dense_deltas(model)
    with pytest.raises(ValueError, match="LoraLinear wraps.*nothing was changed"):
        refine(model, _batches(), 0.5)  # a large budget reaches every module, the LoRA-wrapped one too
    assert model.peft_config["default"].selected_counts == counts
    after = _dense_deltas(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_calibration_batches_go_to_the_models_device():
    """Batches read on the CPU for a model elsewhere are moved to its input embeddings' device ('meta' stands in
    for a GPU here); a model placed by accelerate (hf_device_map) gets them as they are, its hooks move inputs."""
    from conftest import tiny_llama
    from peftkit.methods.selective_scoring import on_model_device

    batch = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]]), "note": "kept"}
    model = tiny_llama()
    same = on_model_device(model, batch)
    assert same["input_ids"] is batch["input_ids"] and same["note"] == "kept"
    model.to("meta")  # every weight on another device than the batch
    moved = on_model_device(model, batch)
    assert moved["input_ids"].device.type == "meta" and moved["labels"].device.type == "meta"
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is left as it was
    model.hf_device_map = {"": "cpu"}
    assert on_model_device(model, batch)["input_ids"] is batch["input_ids"]


class _SharedWeights(nn.Module):
    """l2 shares l1's weight (weight-shared blocks); ``alias`` is l1 registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.l2.weight = self.l1.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        y = self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))
        return {"logits": y, "loss": None if labels is None else ((y - labels) ** 2).mean()}


def test_scoring_shared_weights_and_aliases():
    """A weight two Linear layers share is scored once (target_modules='auto' crashed: the first name's hook freed
    the gradient the second's read); a Linear registered under two names counts as shared for selective."""
    batches = [{"x": torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),
                "labels": torch.randn(3, 2, generator=torch.Generator().manual_seed(2))}]
    model = _SharedWeights()
    weights = {"l1": model.l1.weight, "l2": model.l2.weight, "out": model.out.weight}
    scores = score_weights(model, weights, "fisher", batches)
    assert scores["l1"] is scores["l2"] and bool(scores["l1"].any())
    model.l1.weight.requires_grad_(True)
    model.zero_grad()
    model(**batches[0])["loss"].backward()
    torch.testing.assert_close(scores["l1"], model.l1.weight.grad.square())  # the summed gradient of both uses
    get_peft_model(_SharedWeights(), LoraConfig(r=2, target_modules="auto", auto_criterion="fisher", auto_budget=2),
                   calibration_batches=batches)
    aliased = _SharedWeights()
    aliased.l2.weight = nn.Parameter(aliased.l2.weight.detach().clone())  # untied: only the alias shares now
    aliased.alias = aliased.l1
    with pytest.raises(ValueError, match="'l1' shares its weight with 'alias'"):
        get_peft_model(aliased, SelectiveConfig(criterion="magnitude", budget=0.5, target_modules=["l1"]))


def test_scoring_puts_back_each_submodules_mode():
    from conftest import tiny_llama

    model = tiny_llama().train()
    model.model.layers[0].eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    get_peft_model(model, SelectiveConfig(criterion="fisher", budget=0.05),
                   calibration_batches=[{"input_ids": ids, "labels": ids}])
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_report_rows_and_columns_for_two_stacks_and_numbered_parts():
    """The layer is the first numbered segment: T5's "block.1.layer.0.SelfAttention.k" is block 1, type
    "layer.0.SelfAttention.k" (the last ".1." was taken, giving twice the columns), and encoder and decoder blocks
    are separate rows (they were summed)."""
    from peftkit.methods.selective_report import _grid, split_name

    counts = {"encoder.block.0.layer.0.SelfAttention.k": (1, 10), "encoder.block.1.layer.0.SelfAttention.k": (2, 10),
              "encoder.block.1.layer.1.DenseReluDense.wi": (3, 10), "decoder.block.0.layer.0.SelfAttention.k": (4, 10),
              "decoder.block.0.layer.1.EncDecAttention.k": (5, 10), "lm_head": (6, 10)}
    layers, types, cells = _grid(counts)
    assert layers == ["encoder.block 0", "encoder.block 1", "decoder.block 0", "-"]
    assert types == ["layer.0.SelfAttention.k", "layer.1.DenseReluDense.wi", "layer.1.EncDecAttention.k", "lm_head"]
    assert cells[("encoder.block 1", "layer.0.SelfAttention.k")] == (2, 10)
    assert cells[("decoder.block 0", "layer.0.SelfAttention.k")] == (4, 10)
    assert split_name("model.layers.1.mlp.experts.3.up_proj") == ("1", "mlp.experts.3.up_proj")


def test_a_non_contiguous_weight_is_refused_with_the_reason():
    """The delta goes through a flat view of the weight: training and merge failed with a bare view-size error."""
    model = _SharedWeights()
    model.l1.weight = nn.Parameter(torch.randn(4, 4).t())  # strides (1, 4)
    with pytest.raises(ValueError, match=r"'l1' has a non-contiguous weight \(strides \(1, 4\)"):
        get_peft_model(model, SelectiveConfig(criterion="magnitude", budget=0.5, target_modules=["l1"]))
    assert isinstance(model.l1, nn.Linear)


def test_a_target_another_method_holds_is_refused_before_scoring(monkeypatch):
    from conftest import tiny_llama
    from peftkit.methods import selective

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr(selective, "score_weights", lambda *a, **k: pytest.fail("scored first"))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="q_proj' already holds a LORA adapter; one module cannot take a SELECTIVE"):
        model.add_adapter("s", SelectiveConfig(criterion="fisher", ranking="per_module"),
                          calibration_batches=[{"input_ids": ids, "labels": ids}])
    assert list(model.peft_config) == ["default"]


def test_loading_onto_a_non_contiguous_weight_is_refused_too(tmp_path):
    from conftest import tiny_llama

    saved = get_peft_model(tiny_llama(), SelectiveConfig(criterion="magnitude", budget=0.05, target_modules=["q_proj"]))
    saved.save_pretrained(tmp_path)
    base = tiny_llama()
    q = base.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().t().contiguous().t())  # same values, transposed strides
    with pytest.raises(ValueError, match="q_proj' has a non-contiguous weight"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, SelectiveLayer) for m in base.modules())


def test_a_selective_adapter_beside_a_bottleneck_reloads_on_a_plain_base(tmp_path):
    """Its selection is recorded by plain module names (mlp.down_proj, not mlp.base_layer.down_proj): reloading on a
    plain base failed ("LlamaMLP has no attribute base_layer"). Reloaded beside the bottleneck again, it still fits."""
    from conftest import randomize_adapters, tiny_llama
    from peftkit import AdapterConfig

    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4), adapter_name="bn")
    model.add_adapter("sel", SelectiveConfig(criterion="magnitude", budget=0.05, target_modules=["down_proj"]))
    randomize_adapters(model)
    assert all("base_layer" not in k for k in model.peft_config["sel"].selected_counts)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model.set_adapter("sel")
        alone = model(input_ids=ids).logits
        model.set_adapter(["bn", "sel"])
        both = model(input_ids=ids).logits
        plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "sel", adapter_name="sel")
        torch.testing.assert_close(plain(input_ids=ids).logits, alone)
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bn", adapter_name="bn")
        again.load_adapter(tmp_path / "sel", "sel")
        again.set_adapter(["bn", "sel"])
        torch.testing.assert_close(again(input_ids=ids).logits, both)


def test_a_selection_recorded_by_real_paths_still_loads_beside_the_bottleneck(tmp_path):
    """Adapters saved before selections were recorded by plain names keyed them by the path inside the bottleneck's
    wrapper (mlp.base_layer.down_proj): loading re-keys them."""
    import json

    from conftest import randomize_adapters, tiny_llama
    from peftkit import AdapterConfig

    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=4), adapter_name="bn")
    model.add_adapter("sel", SelectiveConfig(criterion="magnitude", budget=0.05, target_modules=["down_proj"]))
    randomize_adapters(model)
    model.set_adapter(["bn", "sel"])
    model.save_pretrained(tmp_path)
    path = tmp_path / "sel" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["selected_counts"] = {k.replace(".mlp.", ".mlp.base_layer."): v for k, v in config["selected_counts"].items()}
    path.write_text(json.dumps(config))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bn", adapter_name="bn")
    again.load_adapter(tmp_path / "sel", "sel")
    again.set_adapter(["bn", "sel"])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        model.set_adapter("sel")
        plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "sel", adapter_name="sel")  # no bottleneck there
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all("base_layer" not in k for k in again.peft_config["sel"].selected_counts)
    config["selected_counts"] = {"model.layers.9.mlp.down_proj": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names module 'model.layers.9.mlp.down_proj', which this model does not have"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "sel", adapter_name="sel")


def test_refine_regrow_with_rows_ranked_globally_counts_the_budget_in_parameters():
    """Rows of modules with different in_features: select fills the budget in parameters, and so does regrow now
    (it counted rows, and came out short of the budget). Half of it stays with the held rows of largest |delta|."""
    from peftkit.methods.selective_refine import refine

    model, opt, _ = _trained_selective(SelectiveConfig(criterion="sensitivity", budget=0.05, ranking="global",
                                                       granularity="row"))
    base = model.base_model
    layers = {p: m for p, m in base.named_modules() if isinstance(m, SelectiveLayer)}
    held = {(p, int(u)) for p, m in layers.items() for u in m.selective_indices["default"]}
    names = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    widths = {n: tiny_llama().get_submodule(n).in_features for n in names}
    assert len(set(widths.values())) > 1
    total = sum(tiny_llama().get_submodule(n).weight.numel() for n in names)
    counts = refine(model, _batches(), 0.1, optimizer=opt, regrow=0.5)
    budget = round(0.1 * total)
    assert budget - max(widths.values()) < sum(counts.values()) <= budget
    after = {(p, int(u)) for p, m in base.named_modules() if isinstance(m, SelectiveLayer) and "default" in m.adapter_names
             for u in m.selective_indices["default"]}
    kept = after & held
    assert kept and after - held  # some held rows stay, some new ones grow
    assert sum(widths[p] for p, _ in kept) <= round(0.5 * budget)


def test_refine_regrow_under_the_narrowest_row_takes_the_best_unit_as_select_does():
    from peftkit.methods.selective_refine import _drop_and_grow

    units = [torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.2, 0.3])]
    held = [torch.tensor([1.0, float("-inf")]), torch.tensor([float("-inf")] * 3)]
    chosen = _drop_and_grow(units, held, 0.01, 0.5, "global", widths=[9, 7])  # 0.01 of 39 parameters: under 7
    assert [c.tolist() for c in chosen] == [[1], []]  # the best-scoring unit, not an error


@pytest.mark.parametrize("granularity", ["element", "row"])
@pytest.mark.parametrize("fused", [True, False])
def test_second_order_gradients_through_selected_values(granularity, fused, monkeypatch):
    """A gradient penalty (autograd.grad with create_graph=True, then backward through the gradients) raised
    "differentiate twice a function marked once_differentiable"; it now equals plain autograd through
    y = x (W + delta(values))^T + b, for the input and for the values."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)),
                           SelectiveConfig(criterion="magnitude", budget=0.3, granularity=granularity,
                                           target_modules=["0"])).train()
    layer = model.base_model[0]
    with torch.no_grad():
        layer.selective_values["default"].normal_()
    if not fused:
        monkeypatch.setattr(SelectiveLayer, "_fusable", lambda self, x: None)
    values, index = layer.selective_values["default"], layer.selective_indices["default"]
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(5, 12, requires_grad=True)

    def penalty(out):
        loss = (out * torch.linspace(-1, 1, 10)).pow(2).sum()
        grads = torch.autograd.grad(loss, [x, values], create_graph=True)
        return sum(g.pow(2).sum() for g in grads)

    assert (layer._fusable(x) is not None) == fused
    penalty(model(x)).backward()
    got = (x.grad.clone(), values.grad.clone())
    x.grad = values.grad = None
    if granularity == "row":
        dense = weight.detach().index_add(0, index, values.view(-1, 12))
    else:
        dense = weight.detach().reshape(-1).index_add(0, index, values).view(weight.shape)
    penalty(F.linear(x, dense, bias.detach())).backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-5, atol=1e-4)  # (oneDNN's and torch's GEMMs round apart)
    torch.testing.assert_close(got[1], values.grad, rtol=1e-5, atol=1e-4)
