"""The training loop and evaluation of peftkit.train on tiny models: losses, schedule, determinism, resume, tasks."""
import math
import os

import pytest
import torch

from peftkit import LoraConfig, get_peft_model, registered_types
from peftkit.train import DataConfig, TrainConfig, Trainer, TrainingInterrupted, evaluate, predict
from peftkit.train import checkpoints
from peftkit.train.data import collate, encode, label_ids, prompt_ids
from peftkit.train.metrics import _candidate_logprob, label_scores
from peftkit.train.models import forward_loss, wrap_model
from peftkit.train.trainer import lr_factor

import train_tiny
from train_tiny import label_rows

TEMPLATE = "message : {text} label :"
DATA = DataConfig(prompt_template=TEMPLATE, max_length=32)
SPLITS = {"train": label_rows(10), "validation": label_rows(3), "test": label_rows(3)}


def lora_llama(seed: int = 0, dropout: float = 0.1):
    model = train_tiny.llama(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def make_trainer(tmp_path, seed: int = 0, data: DataConfig = DATA, splits=SPLITS, dropout: float = 0.1, **train):
    settings = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "seed": seed, "log_every": 1, "save_every": 3, **train}
    torch.manual_seed(seed)
    return Trainer(lora_llama(seed, dropout), train_tiny.tokenizer(), data, TrainConfig(**settings), splits, str(tmp_path),
                   log=lambda message: None, progress=False)


def adapter(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.adapter_parameters("default").items()}


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


# --- evaluation ----------------------------------------------------------------------------------
def test_constrained_scores_equal_hand_computed_logprobs_and_argmax():
    model, tok = lora_llama(dropout=0.0).eval(), train_tiny.tokenizer()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LoRA B off zero: the adapter matters
    texts = ["my order was late", "great thanks", "the item"]
    labels = ["complaint", "no complaint"]
    got = label_scores(model, tok, texts, labels, DATA, batch_size=2)  # batched, left-padded, cached prompt
    for i, text in enumerate(texts):
        for j, label in enumerate(labels):
            prompt, target = prompt_ids(tok, text, DATA, 28), label_ids(tok, label)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + target])).logits[0].log_softmax(-1)
            want = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(target))
            assert got[i, j].item() == pytest.approx(want, abs=1e-4)
    uncached = torch.stack([_candidate_logprob(model, [prompt_ids(tok, t, DATA, 28) for t in texts],
                                               label_ids(tok, lab), tok.pad_token_id) for lab in labels], dim=1)
    assert torch.allclose(got, uncached, atol=1e-4)
    rows = [{"text": t, "text_label": "complaint"} for t in texts]
    preds = [r["prediction"] for r in predict(model, tok, rows, DATA, labels=labels)]
    assert preds == [labels[int(k)] for k in got.argmax(1)]
    result = evaluate(model, tok, rows, DATA, labels=labels)
    assert result["accuracy"] == pytest.approx(sum(p == "complaint" for p in preds) / 3)


def test_exact_scoring_generates_and_matches():
    model, tok = lora_llama(dropout=0.0).eval(), train_tiny.tokenizer()
    data = DataConfig(prompt_template=TEMPLATE, scoring="exact")
    rows = label_rows(2)
    result = evaluate(model, tok, rows, data)
    preds = [r["prediction"] for r in predict(model, tok, rows, data)]
    assert result["accuracy"] == pytest.approx(sum(p == r["text_label"] for p, r in zip(preds, rows)) / len(rows))


# --- loss ---------------------------------------------------------------------------------------
def test_loss_is_taken_on_label_tokens_only():
    model, tok = lora_llama(dropout=0.0).eval(), train_tiny.tokenizer()
    rows = label_rows(2)
    batch = collate([encode(r, tok, DATA) for r in rows], tok.pad_token_id, "causal-label")
    loss, count = forward_loss(model, batch, "causal-label")
    assert count == int((batch["labels"] != -100).sum()) == sum(len(label_ids(tok, r["text_label"])) for r in rows)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    want = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    changed = batch["input_ids"].clone()
    changed[0, -len(label_ids(tok, rows[0]["text_label"])) - 3] = 7  # a prompt token: not a target
    batch2 = dict(batch, input_ids=changed)
    assert forward_loss(model, batch2, "causal-label")[1] == count


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    rows = {"train": label_rows(2), "validation": label_rows(1), "test": label_rows(1)}  # 4 rows
    # SGD: the update is proportional to the gradient (Adam's first step is its sign, which hides differences)
    settings = {"splits": rows, "epochs": 1, "lr": 1.0, "optimizer": "sgd", "dropout": 0.0}
    big = make_trainer(tmp_path / "a", batch_size=4, grad_accum=1, **settings)
    small = make_trainer(tmp_path / "b", batch_size=2, grad_accum=2, **settings)
    big.train()
    small.train()
    assert big.steps_per_epoch == small.steps_per_epoch == 1
    start = adapter(make_trainer(tmp_path / "c", splits=rows))
    for k, v in adapter(big).items():
        assert not torch.equal(v, start[k]) or "lora_A" in k  # B moved (A gets no gradient while B is 0)
        assert torch.allclose(v, adapter(small)[k], atol=1e-6), k


def test_clipping_is_applied(tmp_path):
    trainer = make_trainer(tmp_path, max_grad_norm=1e-3, epochs=1, lr=1.0, optimizer="sgd")
    before = adapter(trainer)
    seen = []
    trainer.train(on_step=lambda step, info: seen.append(info["grad_norm"]))
    assert seen[0] > 1e-3  # the raw norm is reported; the update used the clipped one
    after = adapter(trainer)
    moved = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    assert moved < 1e-3 * trainer.steps_per_epoch * 10  # SGD lr 1 with momentum: bounded by the clip


def test_warmup_then_linear_decay_values(tmp_path):
    assert [lr_factor(s, 10, 2, "linear") for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    trainer = make_trainer(tmp_path, epochs=2, warmup_ratio=0.2, lr=1e-2)  # 5 steps per epoch: 10 steps, 2 warmup
    lrs = []
    trainer.train(on_step=lambda step, info: lrs.append(info["lr"]))
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 10, 2, "linear") for s in range(10)])


# --- determinism and resume ---------------------------------------------------------------------
def test_same_seed_bit_identical_other_seed_not(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer = make_trainer(tmp_path / name, seed=seed)
        trainer.train()
        runs.append(adapter(trainer))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch (5 steps per epoch) and the last step of epoch 1
def test_resume_after_interrupt_is_bit_identical(tmp_path, stop_at):
    whole = make_trainer(tmp_path / "whole", keep_best=False, save_every=2)
    whole_rows = whole.train()

    def interrupt(step, info):
        if step == stop_at:
            raise KeyboardInterrupt

    cut = make_trainer(tmp_path / "cut", keep_best=False, save_every=2)
    with pytest.raises(TrainingInterrupted) as err:
        cut.train(on_step=interrupt)
    assert err.value.step == stop_at
    assert checkpoints.latest(str(tmp_path / "cut")).endswith(f"step-{stop_at:08d}")
    resumed = make_trainer(tmp_path / "cut", keep_best=False, save_every=2)
    rows = resumed.train(resume=True)
    for k, v in adapter(whole).items():
        assert torch.equal(v, adapter(resumed)[k]), k
    assert _strip_timing(rows) == _strip_timing(whole_rows)
    on_disk = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(on_disk) == len(whole_rows)


def test_ctrl_c_during_the_optimizer_step_resumes_bit_identical(tmp_path):
    """A real SIGINT in the middle of step 3's update: held until the update, its counters and the RNG snapshot
    agree, so the saved checkpoint is step 3's and the resumed run equals an uninterrupted one."""
    import signal

    whole = make_trainer(tmp_path / "whole", keep_best=False)
    whole.train()
    cut = make_trainer(tmp_path / "cut", keep_best=False)
    step, calls = cut.optimizer.step, []

    def step_with_sigint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    cut.optimizer.step = step_with_sigint
    with pytest.raises(TrainingInterrupted) as err:
        cut.train()
    assert err.value.step == 3
    resumed = make_trainer(tmp_path / "cut", keep_best=False)
    resumed.train(resume=True)
    for k, v in adapter(whole).items():
        assert torch.equal(v, adapter(resumed)[k]), k


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path).train(resume=True)
    make_trainer(tmp_path).train()
    with pytest.raises(ValueError, match=r"cannot resume: training settings \['lr'\]"):
        make_trainer(tmp_path, lr=0.5).train(resume=True)


# --- early stopping, keep best ------------------------------------------------------------------
def test_early_stopping_stops(tmp_path):
    trainer = make_trainer(tmp_path, epochs=6, early_stopping_patience=1, lr=1e-9)  # nothing improves
    rows = trainer.train()
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(evals) == 2 and trainer.state["early_stopped"] and trainer.state["global_step"] == 10


def test_keep_best_restores_the_best_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, keep_best=True, lr=0.3)
    snapshots = {}

    def record(step, info):
        snapshots[step] = adapter(trainer)

    trainer.train(on_step=record)
    best_step = trainer.state["best_step"]
    evals = [r for r in trainer.rows if r["event"] == "eval"]
    assert max(r["accuracy"] for r in evals) == trainer.state["best_metric"]
    assert best_step == [r["step"] for r in evals if r["accuracy"] == trainer.state["best_metric"]][0]
    for k, v in adapter(trainer).items():
        assert torch.equal(v, snapshots[best_step][k])


# --- every task trains --------------------------------------------------------------------------
def _losses(model, tok, data, splits, tmp_path, lr=5e-2):
    trainer = Trainer(model, tok, data, TrainConfig(epochs=4, batch_size=4, lr=lr, log_every=1, warmup_ratio=0.0,
                                                    schedule="constant", keep_best=False), splits, str(tmp_path),
                      log=lambda m: None, progress=False)
    rows = trainer.train()
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    return losses, trainer


def _lowered(losses: list[float]) -> bool:
    """Training lowered the loss: the mean over the last quarter of the logged steps is below the first
    quarter's (single batches of these tiny runs are noisy; a dropout draw can lift one last batch)."""
    k = max(1, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_sft_trains_and_reports_perplexity(tmp_path):
    rows = [{"text": f"please help {w}", "text_label": f"ok {w} thanks"} for w in ("order", "item", "refund", "shipping")] * 2
    data = DataConfig(task="sft", max_length=32)
    losses, trainer = _losses(lora_llama(), train_tiny.tokenizer(), data, {"train": rows, "validation": rows[:2],
                                                                          "test": rows[:2]}, tmp_path)
    assert _lowered(losses), losses
    result = evaluate(trainer.model, train_tiny.tokenizer(), rows[:2], data)
    assert result["perplexity"] > 1.0 and 0.0 <= result["exact_match"] <= 1.0


def test_seq2seq_trains(tmp_path):
    rows = label_rows(4)
    data = DataConfig(task="seq2seq", max_length=32)
    model = wrap_model(train_tiny.t5(), "lora", {"target_modules": ["q", "v"]}, "seq2seq")
    losses, trainer = _losses(model, train_tiny.tokenizer(), data, {"train": rows, "validation": rows[:4],
                                                                   "test": rows[:4]}, tmp_path)
    assert _lowered(losses), losses
    assert "exact_match" in evaluate(trainer.model, train_tiny.tokenizer(), rows[:4], data)


def test_seq_cls_trains_head_and_adapter(tmp_path):
    labels = ["complaint", "no complaint"]
    data = DataConfig(task="seq-cls")
    model = wrap_model(train_tiny.bert_cls(labels), "lora", {"target_modules": ["query", "value"]}, "seq-cls")
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    losses, trainer = _losses(model, train_tiny.tokenizer(), data, SPLITS, tmp_path)
    assert _lowered(losses), losses
    result = evaluate(trainer.model, train_tiny.tokenizer(), SPLITS["test"], data)
    assert result["accuracy"] > 0.5


def test_token_cls_trains(tmp_path):
    tags = ["O", "B"]
    rows = [{"text": "my order was late", "text_label": ["O", "B", "O", "O"]},
            {"text": "the item was broken", "text_label": ["O", "B", "O", "O"]}] * 4
    data = DataConfig(task="token-cls")
    from peftkit.train.data import normalise_row
    rows = [normalise_row(r, data) for r in rows]
    model = wrap_model(train_tiny.bert_tok(tags), "lora", {"target_modules": ["query", "value"]}, "token-cls")
    losses, trainer = _losses(model, train_tiny.tokenizer(), data, {"train": rows, "validation": rows[:2],
                                                                   "test": rows[:2]}, tmp_path, lr=1e-1)
    assert _lowered(losses), losses
    result = evaluate(trainer.model, train_tiny.tokenizer(), rows[:2], data)
    assert result["token_accuracy"] == 1.0 and result["f1"] == 1.0


def test_full_fine_tuning_trains_every_parameter(tmp_path):
    model = wrap_model(train_tiny.llama(), "full", {}, "causal-label")
    assert all(p.requires_grad for p in model.parameters())
    losses, _ = _losses(model, train_tiny.tokenizer(), DATA, SPLITS, tmp_path, lr=1e-3)
    assert _lowered(losses), losses


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="lr=0 must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="optimizer='adam' must be one of"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="max_grad_norm=0 must be > 0, or None"):
        TrainConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        wrap_model(train_tiny.llama(), "lorra", {}, "causal-label")
    with pytest.raises(ValueError, match=r"LORA has no setting\(s\) \['rank'\]"):
        wrap_model(train_tiny.llama(), "LoRA", {"rank": 4}, "causal-label")
    # PEFT's own fields in a job's peft settings read as in an adapter_config.json: off is read past, on refused
    assert wrap_model(train_tiny.llama(), "lora", {"lora_bias": False, "revision": None}, "causal-label") is not None
    with pytest.raises(ValueError, match=r"LoraConfig\(lora_bias=True\) turns on a Hugging Face PEFT feature"):
        wrap_model(train_tiny.llama(), "lora", {"lora_bias": True}, "causal-label")
    quantized = train_tiny.llama()
    quantized.quantization_method = "gptq"  # full fine-tuning too: requires_grad_ failed on packed weights, barely
    with pytest.raises(ValueError, match="the base model is quantized"):
        wrap_model(quantized, "full", {}, "causal-label")


def test_peft_model_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer as HFTrainer, TrainingArguments

    from peftkit import PeftModel

    tok = train_tiny.tokenizer()
    model = lora_llama(dropout=0.0)
    dataset = [encode(r, tok, DATA) for r in label_rows(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             remove_unused_columns=False)  # PeftModel.forward takes **kwargs: keep every column
    hf = HFTrainer(model=model, args=args, train_dataset=dataset,
                   data_collator=lambda examples: collate(examples, tok.pad_token_id, "causal-label"))
    result = hf.train()
    assert math.isfinite(result.training_loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)  # only adapter tensors moved
    assert any("lora_B" in n for n in changed)
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(train_tiny.llama(), str(tmp_path / "adapter"))
    saved = model.adapter_parameters("default")
    for k, v in reloaded.adapter_parameters("default").items():
        assert torch.equal(v, saved[k]), k
    ids = torch.tensor([dataset[0]["input_ids"]])
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("method", registered_types())
def test_every_registered_method_trains_and_scores(tmp_path, method):
    tok = train_tiny.tokenizer()
    calibration = [collate([encode(r, tok, DATA) for r in label_rows(2)], tok.pad_token_id, "causal-label")]
    model = wrap_model(train_tiny.llama(), method.lower(), {}, "causal-label", calibration)
    before = {k: v.detach().clone() for k, v in model.adapter_parameters("default").items()}
    trainer = Trainer(model, tok, DATA, TrainConfig(epochs=1, batch_size=4, lr=1e-2, log_every=1), SPLITS,
                      str(tmp_path), log=lambda m: None, progress=False)
    rows = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in rows if r["event"] == "train")
    after = model.adapter_parameters("default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the cached-prompt scoring path (or, for prompt methods, the per-label path) agrees with one forward per row
    texts = ["my order was late", "great thanks"]
    got = label_scores(model, tok, texts, ["complaint", "no complaint"], DATA)
    for i, text in enumerate(texts):
        prompt, target = prompt_ids(tok, text, DATA, 28), label_ids(tok, "complaint")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, -len(target) - 1:-1]
        want = float(logits.log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).sum())
        assert got[i, 0].item() == pytest.approx(want, abs=1e-4)


def test_precision_and_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="'fp16' needs a CUDA GPU; on CPU use 'fp32' or 'bf16'"):
        make_trainer(tmp_path / "fp16", precision="fp16")
    # bf16 autocast on CPU, with LoRA (its fused kernels step aside under autocast) and with full fine-tuning
    for method in ("lora", "full"):
        model = wrap_model(train_tiny.llama(), method, {}, "causal-label")
        bf16 = Trainer(model, train_tiny.tokenizer(), DATA, TrainConfig(epochs=1, batch_size=4, precision="bf16"),
                       SPLITS, str(tmp_path / f"bf16-{method}"), log=lambda m: None, progress=False)
        assert all(math.isfinite(r["loss"]) for r in bf16.train() if r["event"] == "train")
    plain = make_trainer(tmp_path / "plain", epochs=1, dropout=0.0)
    checkpointed = make_trainer(tmp_path / "ckpt", epochs=1, dropout=0.0, gradient_checkpointing=True)
    inner = checkpointed.model.base_model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    plain.train()
    checkpointed.train()
    for k, v in adapter(plain).items():
        assert torch.allclose(v, adapter(checkpointed)[k], atol=1e-5), k


def test_predict_rows_without_labels():
    model, tok = lora_llama(dropout=0.0).eval(), train_tiny.tokenizer()
    rows = [{"text": "my order was late"}, {"text": "great thanks"}]
    with pytest.raises(ValueError, match="pass labels="):
        predict(model, tok, rows, DATA)
    out = predict(model, tok, rows, DATA, labels=["complaint", "no complaint"])
    assert [r["text"] for r in out] == [r["text"] for r in rows]
    assert all(r["prediction"] in ("complaint", "no complaint") for r in out)
    generated = predict(model, tok, rows, DataConfig(prompt_template=TEMPLATE, scoring="exact"))
    assert all(isinstance(r["prediction"], str) for r in generated)
    tagger = wrap_model(train_tiny.bert_tok(["O", "B"]), "lora", {"target_modules": ["query"]}, "token-cls").eval()
    tags = predict(tagger, tok, [{"text": "my order was late"}], DataConfig(task="token-cls"))
    assert len(tags[0]["prediction"]) == 4 and set(tags[0]["prediction"]) <= {"O", "B"}


def test_checkpoint_saved_twice_at_one_step_and_a_half_written_step_is_skipped(tmp_path):
    trainer = make_trainer(tmp_path, keep_best=False, max_steps=2, save_every=100)
    trainer.train()
    first = checkpoints.save(trainer)
    again = checkpoints.save(trainer)  # the same step again (Ctrl-C right after a periodic save)
    assert first == again == checkpoints.latest(str(tmp_path))
    assert sorted(os.listdir(again)) == [checkpoints.STATE_FILE]  # no temp file left beside it
    os.makedirs(os.path.join(os.path.dirname(again), "step-00000099"))  # a crash before its state file landed
    assert checkpoints.latest(str(tmp_path)) == again
