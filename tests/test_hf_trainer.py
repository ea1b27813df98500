"""peftkit.PeftTrainer: transformers.Trainer with a peftkit PeftModel, with Trainer's default arguments."""
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, TrainingArguments

from peftkit import LoraConfig, PeftModel, PeftTrainer, get_peft_model
from peftkit.hf_trainer import load_adapter_weights


def tiny_gpt2() -> GPT2LMHeadModel:
    """Tied input and output embeddings, as SmolLM2: the case a whole-model state dict cannot be saved in."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def lm_rows(n: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, 8), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones(8, dtype=torch.long), "labels": row} for row in ids]


def args(tmp_path, **kw) -> TrainingArguments:
    # everything else at Trainer's defaults: remove_unused_columns=True, safetensors checkpoints
    settings = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_steps": 2,
                "report_to": [], "use_cpu": True, "seed": 0, "data_seed": 0, **kw}
    return TrainingArguments(output_dir=str(tmp_path), **settings)


def lora_gpt2():
    return get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))


def adapter_values(model) -> dict:
    return {k: v.detach().clone() for k, v in model.adapter_parameters("default").items()}


def test_checkpoints_and_save_model_write_the_adapter_of_a_tied_model(tmp_path):
    model = lora_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PeftTrainer(model=model, args=args(tmp_path / "run"), train_dataset=lm_rows())
    trainer.train()  # plain Trainer fails here: safetensors refuses the tied wte / lm_head state dict
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
        assert "model.safetensors" not in files
    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "final"))
    ids = lm_rows(2)[0]["input_ids"][None]
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    whole = lora_gpt2()
    PeftTrainer(model=whole, args=args(tmp_path / "whole"), train_dataset=lm_rows()).train()
    resumed = lora_gpt2()
    PeftTrainer(model=resumed, args=args(tmp_path / "resumed"), train_dataset=lm_rows()).train(
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    expected, got = adapter_values(whole), adapter_values(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(v, adapter_values(lora_gpt2())[k]) for k, v in got.items())  # it did train


def test_evaluate_reports_loss_and_metrics_and_the_best_checkpoint_comes_back(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 50, (6,), generator=gen), "token_type_ids": torch.zeros(6, dtype=torch.long),
             "attention_mask": torch.ones(6, dtype=torch.long), "labels": torch.tensor(i % 2)} for i in range(16)]
    seen = []

    def accuracy(prediction):
        seen.append(prediction.label_ids)
        return {"acc": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = PeftTrainer(model=model, args=args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                                                 load_best_model_at_end=True, metric_for_best_model="eval_loss"),
                          train_dataset=rows, eval_dataset=rows[:8], compute_metrics=accuracy)
    assert trainer.label_names == ["labels"]  # read off the base model's forward, as for a PEFT model
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_acc"] <= 1 and seen and seen[-1] is not None
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    check = get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query", "value"]))
    load_adapter_weights(check, best)  # the best checkpoint's values are what the model holds at the end
    for key, value in adapter_values(check).items():
        assert torch.equal(model.adapter_parameters("default")[key], value), key
    assert trainer.state.best_metric == pytest.approx(min(
        entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry and "epoch" in entry
        and entry.get("step", 0) <= 6), abs=1e-6)


def test_loading_a_checkpoint_that_lacks_an_adapter_changes_nothing(tmp_path):
    model = lora_gpt2()
    model.save_pretrained(str(tmp_path / "one"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    values = {name: {k: v.clone() for k, v in model.adapter_parameters(name).items()} for name in model.peft_config}
    with pytest.raises(FileNotFoundError, match="no saved values for adapter 'other'"):
        load_adapter_weights(model, str(tmp_path / "one"))
    for name, saved in values.items():
        for key, value in model.adapter_parameters(name).items():
            assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("trainer_cls", ["PeftTrainer", "Trainer", "PeftTrainer compiled"])
def test_label_smoothing_scores_a_causal_lm_against_the_next_token(tmp_path, trainer_cls):
    """Trainer shifts the labels for label smoothing by the model's class name (a PEFT model's base model's); a
    peftkit model answers with its base model's, so plain Trainer shifts them too (it read "PeftModel" and trained on
    the unshifted loss, 0.39 above PEFT's, silently). Compiled, Trainer reads the wrapper's name: PeftTrainer's own
    smoother shifts a causal LM's labels whatever name Trainer reads."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LabelSmoother

    model, rows = lora_gpt2(), lm_rows(4)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():  # LoRA's B starts at zero: the first step's loss is the base model's
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        count = int((batch["labels"] != -100).sum())  # Trainer's num_items_in_batch: the loss is a sum over it
        smooth = LabelSmoother(epsilon=0.1)
        expected = smooth(outputs, batch["labels"], shift_labels=True, num_items_in_batch=count).item()
        unshifted = smooth(outputs, batch["labels"], num_items_in_batch=count).item()
    settings = {"torch_compile": True, "torch_compile_backend": "eager"} if "compiled" in trainer_cls else {}
    if trainer_cls == "Trainer":  # the README's plain-Trainer settings; PeftTrainer runs with Trainer's defaults
        settings.update(remove_unused_columns=False, label_names=["labels"])
    trainer = {"PeftTrainer": PeftTrainer, "Trainer": Trainer}[trainer_cls.split()[0]](
        model=model, args=args(tmp_path, max_steps=1, logging_steps=1, label_smoothing_factor=0.1, save_strategy="no",
                               **settings), train_dataset=rows)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-4) and abs(expected - unshifted) > 0.05
    assert repr(model).startswith("PeftModel(\n  (base_model): GPT2LMHeadModel(")  # the name Trainer reads aside


def test_a_checkpoint_whose_second_adapter_does_not_fit_loads_nothing(tmp_path):
    """Resume reads every adapter's file; one that does not fit its adapter leaves all of them as they were (the
    first one, already filled, is put back)."""
    from conftest import randomize_adapters

    model = lora_gpt2()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_adapters(model)
    model.save_pretrained(str(tmp_path / "saved"))
    wrong = lora_gpt2()
    wrong.add_adapter("other", LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True))  # r=3: other shapes
    values = {name: {k: v.clone() for k, v in wrong.adapter_parameters(name).items()} for name in wrong.peft_config}
    with pytest.raises(ValueError, match="shape"):
        load_adapter_weights(wrong, str(tmp_path / "saved"))
    for name, saved in values.items():
        for key, value in wrong.adapter_parameters(name).items():
            assert torch.equal(value, saved[key]), (name, key)
    saved_default = model.adapter_parameters("default")
    assert any(not torch.equal(v, saved_default[k]) for k, v in values["default"].items())  # it would have changed


@pytest.mark.parametrize("method", ["p_tuning", "prefix_projection"])
def test_resuming_an_encoder_is_refused_before_anything_changes(tmp_path, method):
    """A P-tuning checkpoint (or prefix tuning's with prefix_projection) holds the encoder's output, not the encoder
    (PEFT's format): resume says so and leaves the encoder in place (it used to drop the encoder, then fail on the
    optimizer's parameter groups; prefix projection was not caught at all)."""
    from peftkit import PrefixTuningConfig, PromptEncoderConfig

    def build():
        config = (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8)
                  if method == "p_tuning" else
                  PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                     encoder_hidden_size=8))
        return get_peft_model(tiny_gpt2(), config)

    PeftTrainer(model=build(), args=args(tmp_path / "run"), train_dataset=lm_rows()).train()
    resumed = build()
    names = [n for n, _ in resumed.named_parameters()]
    with pytest.raises(ValueError, match="trains an encoder.*cannot resume"):
        PeftTrainer(model=resumed, args=args(tmp_path / "again"), train_dataset=lm_rows()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert [n for n, _ in resumed.named_parameters()] == names and any("mlp_head" in n or "transform" in n for n in names)


def test_a_failed_load_puts_back_an_encoder_it_had_dropped(tmp_path):
    """All or none: a P-tuning adapter filled before a later adapter fails gets its encoder back."""
    from peftkit import PromptEncoderConfig

    def build(r: int):
        model = get_peft_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                encoder_hidden_size=8))
        model.add_adapter("other", LoraConfig(r=r, target_modules=["c_attn"], fan_in_fan_out=True))
        return model

    build(2).save_pretrained(str(tmp_path / "saved"))
    wrong = build(3)
    before = {n: p.detach().clone() for n, p in wrong.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter_weights(wrong, str(tmp_path / "saved"))
    after = dict(wrong.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())


def test_p_tuning_with_load_best_model_at_end_ends_on_the_best_checkpoints_embeddings(tmp_path):
    """The best model at the end is loaded for use, not to train on: a P-tuning adapter takes the saved encoder
    output as its embeddings (only a resume is refused)."""
    from safetensors.torch import load_file

    from peftkit import PromptEncoderConfig

    model = get_peft_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                            encoder_hidden_size=8))
    trainer = PeftTrainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2,
                                                 load_best_model_at_end=True), train_dataset=lm_rows(),
                          eval_dataset=lm_rows(4))
    trainer.train()
    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    prompts = model.prompt_modules["default"]
    assert getattr(prompts, "mlp_head", None) is None
    torch.testing.assert_close(prompts.prompt_embeddings().detach(), saved["prompt_embeddings"])


def test_a_failed_load_puts_back_the_base_embedding_an_adapter_carried():
    """An adapter on embed_tokens carries the full embedding (as PEFT saves it): a later adapter that does not fit
    undoes that write too, as from_pretrained's failed load does."""
    import tempfile

    from conftest import randomize_adapters, tiny_llama

    def build(r: int):
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
        model.add_adapter("other", LoraConfig(r=r, target_modules=["v_proj"]))
        return model

    saved = build(2)
    randomize_adapters(saved, seed=3)
    with torch.no_grad():
        saved.base_model.model.embed_tokens.base_layer.weight.add_(1.0)  # the saved embedding differs from the base's
    with tempfile.TemporaryDirectory() as tmp:
        saved.save_pretrained(tmp)
        wrong = build(3)
        before = wrong.base_model.model.embed_tokens.base_layer.weight.detach().clone()
        with pytest.raises(ValueError, match="shape"):
            load_adapter_weights(wrong, tmp)
    assert torch.equal(wrong.base_model.model.embed_tokens.base_layer.weight, before)
