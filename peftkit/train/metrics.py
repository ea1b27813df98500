"""Evaluation: predictions per task (constrained label scoring, greedy generation, heads) and their metrics."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import lookup
from ..model import PeftModel
from .data import DataConfig, collate, encode, label_ids, label_set, normalise_row, prompt_ids
from .models import _accepts, _inner, forward_loss

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "token_accuracy": True, "f1": True,
                    "exact_match": True, "perplexity": False}
DEFAULT_METRIC = {"causal-label": "accuracy", "seq-cls": "accuracy", "token-cls": "f1",
                  "sft": "perplexity", "seq2seq": "exact_match"}
TASK_METRICS = {"causal-label": ("accuracy", "macro_f1"), "seq-cls": ("accuracy", "macro_f1"),  # what evaluate gives
                "token-cls": ("token_accuracy", "f1"), "sft": ("exact_match", "perplexity"), "seq2seq": ("exact_match",)}


def accuracy(preds: list, golds: list) -> float:
    """Share of predictions equal to the gold value."""
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: list, golds: list) -> float:
    """Unweighted mean of per-class F1 over every class seen in golds or predictions."""
    scores = []
    for cls in sorted(set(golds) | set(preds), key=str):
        tp = sum(p == cls and g == cls for p, g in zip(preds, golds))
        fp = sum(p == cls and g != cls for p, g in zip(preds, golds))
        fn = sum(p != cls and g == cls for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- predictions ----------------------------------------------------------------------------------
@torch.no_grad()
def label_scores(model: nn.Module, tokenizer, texts: list[str], labels: list[str], data: DataConfig,
                 batch_size: int = 16) -> torch.Tensor:
    """(rows, labels) summed log-probabilities of each label's tokens (with end-of-sequence) after each prompt."""
    targets = [label_ids(tokenizer, label) for label in labels]
    room = data.max_length - max(len(t) for t in targets)
    prompts = [prompt_ids(tokenizer, text, data, room) for text in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    scores = torch.empty(len(prompts), len(targets))
    for chunk in _batches(order, batch_size):
        batch = [prompts[i] for i in chunk]
        if _shares_prompt_cache(model):
            scores[chunk] = _cached_logprobs(model, batch, targets, tokenizer.pad_token_id)
        else:
            scores[chunk] = torch.stack([_candidate_logprob(model, batch, t, tokenizer.pad_token_id)
                                         for t in targets], dim=1)
    return scores


def _shares_prompt_cache(model: nn.Module) -> bool:
    # the prompt's key/value cache can serve every label unless a prompt method rewrites inputs / the cache
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if isinstance(model, PeftModel) and model.active_adapter is not None:
        return not lookup(model.peft_config[model.active_adapter].peft_type)[1].acts_on_inputs
    return True


def _cached_logprobs(model: nn.Module, prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> torch.Tensor:
    # one forward over the prompts, then one short forward per label over the cached keys / values
    batch = collate([{"input_ids": p, "labels": [-100] * len(p)} for p in prompts], pad_id, "causal-label")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=True, **_keep(model, 1))
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.2 names it "cache"
    cache_arg = "cache" if _accepts(type(_inner(model)), "cache") else "past_key_values"
    first = out.logits[:, -1].float().log_softmax(-1)  # (batch, vocab)
    columns = []
    for target in targets:
        score = first[:, target[0]]
        if len(target) > 1:  # feed target[:-1] after the prompt; it predicts target[1:]
            feed = torch.tensor(target[:-1]).expand(len(prompts), -1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(feed)], dim=1)
            positions = batch["position_ids"][:, -1:] + torch.arange(1, len(target))  # (batch, len - 1)
            logits = model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{cache_arg: cache}).logits.float()
            index = torch.tensor(target[1:]).expand(len(prompts), -1).unsqueeze(-1)
            score = score + logits.log_softmax(-1).gather(-1, index).squeeze(-1).sum(-1)
            cache.crop(-(len(target) - 1))  # back to the prompt alone for the next label
        columns.append(score)
    return torch.stack(columns, dim=1)  # (batch, labels)


def _keep(model: nn.Module, count: int) -> dict:
    return {"logits_to_keep": count} if _accepts(type(_inner(model)), "logits_to_keep") else {}


def _candidate_logprob(model: nn.Module, prompts: list[list[int]], target: list[int], pad_id: int) -> torch.Tensor:
    # one forward over the batch with this label appended; logits only at the label's positions
    examples = [{"input_ids": p + target, "labels": [-100] * len(p) + target} for p in prompts]
    batch = collate(examples, pad_id, "causal-label")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    keep = len(target) + 1
    logits = model(**inputs, **_keep(model, keep)).logits[:, -keep:-1].float()  # (batch, len(target), vocab)
    index = torch.tensor(target).expand(len(prompts), -1).unsqueeze(-1)  # (batch, len(target), 1)
    return logits.log_softmax(-1).gather(-1, index).squeeze(-1).sum(-1)  # (batch,)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, texts: list[str], data: DataConfig, max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of each prompt (decoder-only) or outputs (seq2seq), decoded and stripped."""
    out = []
    for chunk in _batches(texts, batch_size):
        if data.task == "seq2seq":
            enc = [{"input_ids": tokenizer(data.template().format(text=t), truncation=True,
                                           max_length=data.max_length)["input_ids"], "labels": [0]} for t in chunk]
            batch = collate(enc, tokenizer.pad_token_id, "seq2seq")
        else:
            prompts = [prompt_ids(tokenizer, t, data, data.max_length - max_new_tokens) for t in chunk]
            batch = collate([{"input_ids": p, "labels": [-100] * len(p)} for p in prompts],
                            tokenizer.pad_token_id, "causal-label")
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated if data.task == "seq2seq" else generated[:, batch["input_ids"].shape[1]:]
        out.extend(text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def head_predictions(model: nn.Module, tokenizer, rows: list[dict], data: DataConfig, batch_size: int) -> list:
    """seq-cls: one label per row; token-cls: one tag per word (read at each word's first sub-token)."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    rows = [normalise_row(r, data) for r in rows]  # token-cls words given as one string become a list
    out = []
    for chunk in _batches(rows, batch_size):
        if data.task == "token-cls":  # the gold tags only mark positions here; unknown tags map to 0
            examples = [encode({**r, data.label_column: [t if t in label2id else id2label[0] for t in
                                                         r.get(data.label_column) or [id2label[0]] * len(r[data.text_column])]},
                               tokenizer, data, label2id) for r in chunk]
        else:
            examples = [{"input_ids": tokenizer(r[data.text_column], truncation=True,
                                                max_length=data.max_length)["input_ids"], "labels": 0} for r in chunk]
        batch = collate(examples, tokenizer.pad_token_id, data.task)
        best = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        if data.task == "seq-cls":
            out.extend(id2label[int(i)] for i in best)
        else:
            for row_best, row_labels in zip(best, batch["labels"]):
                out.append([id2label[int(i)] for i, lab in zip(row_best, row_labels) if lab != -100])
    return out


def _target_max_length(tokenizer, labels: list[str]) -> int:
    return max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + 1


def _known_labels(rows: list[dict], data: DataConfig, labels: Optional[list[str]]) -> Optional[list[str]]:
    # the label set to score / size generation by: given, else read from the rows (None when they have no labels)
    if labels:
        return list(labels)
    if rows and all(data.label_column in r for r in rows):
        return label_set(rows, data)
    return None


def predictions(model: nn.Module, tokenizer, rows: list[dict], data: DataConfig, batch_size: int = 16,
                labels: Optional[list[str]] = None) -> list:
    """One prediction per row (a label string, a generated text, or a list of tags); rows need no label column."""
    was_training = model.training
    model.eval()
    try:
        texts = [r[data.text_column] for r in rows]
        known = _known_labels(rows, data, labels) if data.task in ("causal-label", "sft", "seq2seq") else None
        if data.task == "causal-label" and data.scoring == "constrained":
            if not known:
                raise ValueError(f"constrained scoring needs the label set: pass labels=[...] (the training labels) "
                                 f"for rows without a {data.label_column!r} column")
            scores = label_scores(model, tokenizer, texts, known, data, batch_size)
            return [known[int(i)] for i in scores.argmax(-1)]
        if data.task in ("causal-label", "sft", "seq2seq"):
            new_tokens = _target_max_length(tokenizer, known) if known else 64
            return generate_texts(model, tokenizer, texts, data, new_tokens, batch_size)
        return head_predictions(model, tokenizer, rows, data, batch_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, rows: list[dict], data: DataConfig, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood of the target tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in _batches(rows, batch_size):
            batch = collate([encode(r, tokenizer, data) for r in chunk], tokenizer.pad_token_id, data.task)
            loss, n = forward_loss(model, batch, data.task)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return math.exp(min(total / max(count, 1), 50.0))


def evaluate(model: nn.Module, tokenizer, rows: list[dict], data: DataConfig, batch_size: int = 16,
             labels: Optional[list[str]] = None) -> dict:
    """Task metrics on ``rows``: accuracy + macro_f1 (labels), token_accuracy + f1 (tags), exact_match (+ perplexity)."""
    preds = predictions(model, tokenizer, rows, data, batch_size, labels)
    golds = [r[data.label_column] for r in rows]
    if data.task == "token-cls":
        flat_p = [t for p, g in zip(preds, golds) for t in p[:len(g)]]
        flat_g = [t for p, g in zip(preds, golds) for t in g[:len(p)]]  # words cut by truncation are not scored
        return {"token_accuracy": accuracy(flat_p, flat_g), "f1": macro_f1(flat_p, flat_g), "n": len(rows)}
    if data.task in ("causal-label", "seq-cls"):
        return {"accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds), "n": len(rows)}
    result = {"exact_match": accuracy([p.strip() for p in preds], [g.strip() for g in golds]), "n": len(rows)}
    if data.task == "sft":
        result["perplexity"] = perplexity(model, tokenizer, rows, data, batch_size)
    return result


def predict(model: nn.Module, tokenizer, rows: list[dict], data: DataConfig, batch_size: int = 16,
            labels: Optional[list[str]] = None) -> list[dict]:
    """Each row with its ``prediction`` added."""
    preds = predictions(model, tokenizer, rows, data, batch_size, labels)
    return [{**row, "prediction": pred} for row, pred in zip(rows, preds)]
