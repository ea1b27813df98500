"""Loading is safe and strict; saving is atomic; bad input gets a clear error."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit import checkpoint
from conftest import randomize_adapters, tiny_llama


def _saved(tmp_path, **kw):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return model


def _snapshot(model):
    return ([n for n, _ in model.named_modules()], {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_untouched(model, snap):
    names, params = snap
    assert [n for n, _ in model.named_modules()] == names
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (value, grad) in params.items():
        assert torch.equal(now[n], value) and now[n].requires_grad == grad, n


def test_shape_mismatch_names_key_and_shapes_and_leaves_model_as_it_was(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_llama()
    base.lm_head.weight.requires_grad_(False)  # a user's own freezing must survive the failed load
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"lora_A\.weight' has shape \(4, 32\) but the model expects \(8, 32\)"):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_untouched(base, snap)


def test_missing_and_unexpected_keys_are_refused(tmp_path):
    _saved(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    first = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != first}, file)
    with pytest.raises(ValueError, match="lacks tensor"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"layers\.9.*matches no module"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_load_adapter_keeps_existing_adapters(tmp_path, ids):
    _saved(tmp_path / "a")
    bad = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    bad.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    expected = model(ids).logits
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(tmp_path / "b", adapter_name="b")
    _assert_untouched(model, snap)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    torch.testing.assert_close(model(ids).logits, expected)


def test_truncated_file_is_a_clear_error(tmp_path):
    _saved(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    base = tiny_llama()
    snap = _snapshot(base)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_untouched(base, snap)


def test_corrupt_json_unknown_type_missing_dir(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)
    for text in ("null", "[1, 2]", '"LORA"'):
        (tmp_path / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match="not an object of config fields"):
            PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NOPE", "r": 4}))
    with pytest.raises(ValueError, match=r"unknown peft_type 'NOPE'.*LORA"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftConfig.from_pretrained(tmp_path / "nowhere")


def test_unsupported_feature_in_foreign_config_is_refused(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(use_qalora=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_qalora=True"):
        PeftConfig.from_pretrained(tmp_path)
    for variant in ("kasa_config", "velora_config", "monteclora_config"):  # on even with all defaults ({})
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, use_qalora=False, **{variant: {}})))
        with pytest.raises(ValueError, match=f"sets {variant}=.*does not support"):
            PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, use_qalora=False, kasa_config=None,
                                                                  megatron_config=None, eva_config=None)))
    assert PeftConfig.from_pretrained(tmp_path).r == 4  # switched off (as PEFT writes them), they load
    # ensure_weight_tying matters only on tied embeddings (test_interop: the error then names it); here it does nothing
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, use_qalora=False, ensure_weight_tying=True)))
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"].r == 4
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 16)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="matches no module") as refused:  # nothing tied: not the field's fault
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "ensure_weight_tying" not in str(refused.value)


def test_an_empty_layers_pattern_means_any_layer_list():
    # PEFT reads layers_pattern="" as none given; peftkit took it literally and matched no layer
    one = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                                  layers_pattern=""))
    assert [n for n, m in one.named_modules() if hasattr(m, "base_layer")] == ["base_model.model.layers.1.self_attn.q_proj"]
    assert one.peft_config["default"].layers_pattern is None


def test_pickle_needs_opt_in(tmp_path, ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert os.listdir(tmp_path) and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_malicious_pickle_is_not_executed(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="cannot read"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_crash_while_saving_keeps_previous_adapter(tmp_path, monkeypatch):
    _saved(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(tiny_llama(seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=7)

    def crash(data, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_crash_while_writing_the_config_keeps_the_previous_weights_too(tmp_path, monkeypatch):
    # weights and config are both written in full before either is renamed: a failure on the config (the second
    # file) must not leave new weights beside the old config
    _saved(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

    def crash(path, text):
        with open(path, "w") as fh:
            fh.write("{")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # no temp files either


def test_saving_in_the_other_format_removes_the_stale_weights_file(tmp_path, ids):
    old = _saved(tmp_path)  # adapter_model.safetensors
    new = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(new, seed=9)
    new.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.bin"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, new(ids).logits)
        assert not torch.allclose(loaded(ids).logits, old(ids).logits)
    new.save_pretrained(tmp_path)  # and back
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_crash_at_the_stale_file_never_leaves_the_new_config_beside_old_weights(tmp_path, ids, monkeypatch):
    """The other format's file goes before any rename: a crash there leaves the old config and no weights that
    load silently (before, the new config was already in place beside the old .safetensors, which loading prefers)."""
    old = _saved(tmp_path)
    new = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(new, seed=9)
    real_remove = os.remove

    def crash(path):
        if str(path).endswith("adapter_model.safetensors"):
            real_remove(path)
            raise KeyboardInterrupt  # killed right after the stale file went
        real_remove(path)

    monkeypatch.setattr(checkpoint.os, "remove", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path, safe_serialization=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == old.peft_config["default"].lora_alpha
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_target_not_found_suggests_names():
    with pytest.raises(ValueError, match=r"target module 'qproj' not found; did you mean 'q_proj'\?.*candidates"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qproj"]))
    # a second adapter's error lists the model's modules, not the first adapter's lora_A / base_layer internals
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="candidates") as err:
        model.add_adapter("x", LoraConfig(target_modules=["qproj"]))
    assert "q_proj, " in str(err.value) and not any(part in str(err.value) for part in ("lora_A", "base_layer"))
    # a modules_to_save entry matching nothing was reported as a target module
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matches no module of the model"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_container_target_is_refused():
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' is a LlamaAttention; LoRA wraps"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "positive integer"), ({"lora_dropout": 1.0}, r"\[0, 1\)"), ({"bias": "some"}, "bias must be"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"), ({"task_type": "CLS"}, "task_type"),
    ({"layers_pattern": "layers"}, "layers_to_transform"), ({"rank_pattern": {"q": -1}}, "positive integer"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_get_peft_model_twice_and_bad_names():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    for bad in ("", "a.b", "__base__", "default"):
        with pytest.raises(ValueError, match="adapter name|already exists"):
            model.add_adapter(bad, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no adapter named 'x'; this model has \['default'\]"):
        model.set_adapter("x")


def test_saved_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(str(tmp_path))
        checkpoint.atomic_write_text(str(tmp_path / "note.txt"), "hi")
    finally:
        os.umask(mask)
    for name in ("adapter_model.safetensors", "adapter_config.json", "note.txt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def test_atomic_dir_renames_a_finished_directory_and_leaves_nothing_on_a_crash(tmp_path):
    from peftkit.checkpoint import atomic_dir

    def write(directory):
        with open(os.path.join(directory, "weights.bin"), "w") as fh:
            fh.write("x")

    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "out", tmp_path / "empty"):  # absent, or an empty directory
        atomic_dir(str(target), write)
        assert (target / "weights.bin").read_text() == "x"

    def crash(directory):
        write(directory)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_dir(str(tmp_path / "crashed"), crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no crashed/, no partial directory

    called = []
    with pytest.raises(FileExistsError, match="not an empty directory"):  # refused before anything is written
        atomic_dir(str(tmp_path / "out"), called.append)
    assert called == [] and (tmp_path / "out" / "weights.bin").read_text() == "x"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    atomic_dir(str(tmp_path / "link"), write)  # a symlink to an empty directory: the directory gets the files
    assert (tmp_path / "link" / "weights.bin").read_text() == "x" and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("method", ["lora", "selective"])
@pytest.mark.parametrize("two", [False, True], ids=["one", "two"])
def test_a_refused_safe_merge_leaves_no_layer_merged(method, two):
    # two: the bad adapter comes second in the call, so the failing layer has already merged the first one (which
    # stayed merged there, though the error said the call was undone)
    from peftkit import SelectiveConfig

    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if method == "lora"
              else SelectiveConfig(criterion="magnitude", budget=0.05, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(tiny_llama(), config)
    bad = "default"
    if two:
        model.add_adapter("b", config)
        model.set_adapter(["default", "b"])
        bad = "b"
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if "base_layer" in n}
    last = [m for _, m in model.named_modules() if hasattr(m, "merged_adapters")][-1]
    with torch.no_grad():  # one non-finite entry in the last layer's adapter
        next(p for n, p in last.named_parameters()
             if ("lora_B" in n or "selective_values" in n) and n.endswith("." + bad)).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*nothing of this call stays merged"):
        model.merge_adapter(["default", "b"] if two else None, safe_merge=True)
    assert not any(m.merged_adapters for _, m in model.named_modules() if hasattr(m, "merged_adapters"))
    for n, p in model.base_model.named_parameters():
        if n in before:  # selective unmerges bit-exactly; LoRA subtracts its delta again
            assert torch.equal(p, before[n]) if method == "selective" else torch.allclose(p, before[n], atol=1e-6), n


def test_layers_to_transform_needs_a_list_of_targets_and_an_empty_list_narrows_nothing():
    with pytest.raises(ValueError, match="not a regex string"):
        LoraConfig(target_modules=r".*\.q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="not a regex string"):
        LoraConfig(target_modules=r".*\.q_proj", layers_to_transform=[0], layers_pattern="layers")
    LoraConfig(target_modules="all-linear", layers_to_transform=[0])  # resolved to a list of names first
    every = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    empty = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[]))
    assert ({n for n, _ in empty.named_modules() if n.endswith("q_proj")}
            == {n for n, _ in every.named_modules() if n.endswith("q_proj")})
    one = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    assert {n for n, m in one.named_modules() if hasattr(m, "lora_A")} == {"base_model.model.layers.1.self_attn.q_proj"}


def test_a_failed_load_puts_back_the_base_embedding_it_overwrote(tmp_path):
    """An adapter on embed_tokens carries the full embedding (as PEFT saves it), copied into the base before the
    device_map is checked: a refused device_map must leave the base's embedding as it was."""
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    base = tiny_llama(seed=5)
    snap = _snapshot(base)
    with pytest.raises(ValueError, match="'disk'"):
        PeftModel.from_pretrained(base, tmp_path, device_map="disk")
    _assert_untouched(base, snap)


def test_a_peft_model_or_its_injected_base_is_not_a_base_again(tmp_path):
    first = _saved(tmp_path)
    inner = first.get_base_model()
    before = _snapshot(first)
    with pytest.raises(ValueError, match="already a PeftModel; use model.add_adapter"):
        PeftModel.from_pretrained(first, tmp_path)
    with pytest.raises(ValueError, match=r"already holds peftkit adapter layers \(e.g. 'model.layers.0.self_attn.q_proj'\)"):
        get_peft_model(inner, LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds peftkit adapter layers"):
        PeftModel.from_pretrained(inner, tmp_path)
    _assert_untouched(first, before)  # the first model's adapter is as it was (r=4, its own values)
    assert first.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 4


def test_adapter_name_lists_refuse_repeats_and_take_one_name(tmp_path, ids):
    model = _saved(tmp_path)
    with torch.no_grad():
        want = model(ids).logits
    with pytest.raises(ValueError, match=r"set_adapter: adapter\(s\) \['default'\] named more than once"):
        model.set_adapter(["default", "default"])  # applied twice, it was the delta doubled
    with pytest.raises(ValueError, match="named more than once"):
        model.merge_adapter(["default", "default"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    model.save_pretrained(tmp_path / "one", selected_adapters="default")  # one name, not its characters
    assert sorted(os.listdir(tmp_path / "one")) == ["adapter_config.json", "adapter_model.safetensors"]
    model.merge_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()


def test_wrapping_keeps_each_submodules_train_or_eval_mode():
    base = tiny_llama()
    base.train()
    base.model.layers[1].eval()  # e.g. a block the user keeps frozen in eval mode
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert model.training and not base.model.layers[1].training and base.model.layers[0].training


@pytest.mark.parametrize("kwargs, needle", [
    (dict(target_modules=[]), "target_modules is an empty list"),
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]),
     "none is left to adapt: exclude_modules leaves out e.g. 'model.layers.0.self_attn.q_proj'"),
    (dict(target_modules=["q_proj"], layers_to_transform=[7]), "none is left to adapt: layers_to_transform=[7]"),
    (dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), "none is left to adapt: modules_to_save"),
])
def test_targets_that_match_but_are_all_left_out_say_why(kwargs, needle):
    """These said "target module 'q_proj' not found; did you mean 'q_proj'?" (or raised IndexError)."""
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    assert needle in str(err.value)


def test_a_named_adapters_subfolder_is_pointed_to_and_a_clashing_file_stops_the_save_first(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="sentiment")
    model.save_pretrained(tmp_path / "one")
    with pytest.raises(FileNotFoundError, match=r"its subfolders \['sentiment'\] hold adapters .*pass subfolder='sentiment'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "one")
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "one", subfolder="sentiment", adapter_name="sentiment")
    both = tmp_path / "both"
    _saved(both)
    (both / "LICENSE").write_text("the user's file")
    before = {f: (both / f).read_bytes() for f in os.listdir(both)}
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("LICENSE", LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="adapter 'LICENSE' is saved in the subfolder .* which is a file there"):
        model.save_pretrained(both)
    assert {f: (both / f).read_bytes() for f in os.listdir(both)} == before  # "default" was not written either
    with pytest.raises(ValueError, match="save_directory is empty"):
        model.save_pretrained("")


@pytest.mark.parametrize("names", [[""], ["classifier", ""]])
def test_an_empty_modules_to_save_name_is_refused(names):
    # names match as plain suffixes (PEFT's rule), so "" took every module: 32 nested wrappers with prompt tuning
    from peftkit import PromptTuningConfig

    with pytest.raises(ValueError, match="modules_to_save .* holds an empty name"):
        LoraConfig(target_modules=["q_proj"], modules_to_save=names)
    with pytest.raises(ValueError, match="modules_to_save .* holds an empty name"):
        PromptTuningConfig(num_virtual_tokens=2, modules_to_save=names)
