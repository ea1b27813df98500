"""Tiny models, a word-level tokenizer and data files for the training tests (all in-process, no downloads)."""
from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

WORDS = ("message label answer is this a customer complaint no refund broken late great thanks love slow rude "
         "happy order item fine bad good the my was very not ok help where when why please shipping").split()
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one id per word of WORDS and per punctuation mark, no special tokens added."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + [":", "?", ".", "!", ","])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


VOCAB = len(SPECIALS) + len(WORDS) + 5


def llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over the tiny vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config)


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A tiny T5 over the tiny vocabulary."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def bert_config(labels: list[str]) -> BertConfig:
    """A tiny BERT config with a head for ``labels``."""
    return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, num_labels=len(labels),
                      id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})


def bert_cls(labels: list[str], seed: int = 0) -> BertForSequenceClassification:
    """A tiny BERT sequence classifier."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(labels))


def bert_tok(labels: list[str], seed: int = 0) -> BertForTokenClassification:
    """A tiny BERT token classifier."""
    torch.manual_seed(seed)
    return BertForTokenClassification(bert_config(labels))


COMPLAINTS = ["my order was late", "the item was broken", "very slow shipping", "rude help", "not ok refund please",
              "my refund was late", "bad item", "where is my order", "the order was broken", "slow rude help"]
PRAISE = ["great thanks", "love the item", "happy customer", "the order was fine", "very good help",
          "thanks a lot great", "good shipping", "love my order", "very happy thanks", "fine item ok"]


def label_rows(n_each: int = 10) -> list[dict]:
    """Rows for causal-label / seq-cls: complaint vs no complaint, alternating."""
    rows = []
    for i in range(n_each):
        rows.append({"text": COMPLAINTS[i % len(COMPLAINTS)], "text_label": "complaint"})
        rows.append({"text": PRAISE[i % len(PRAISE)], "text_label": "no complaint"})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    """Write rows as JSON lines; the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def label_dir(root: str, n_each: int = 8) -> str:
    """A directory with train / validation / test jsonl files of label rows."""
    rows = label_rows(n_each)
    write_jsonl(os.path.join(root, "train.jsonl"), rows)
    write_jsonl(os.path.join(root, "validation.jsonl"), rows[:6])
    write_jsonl(os.path.join(root, "test.jsonl"), rows[6:12])
    return root
