"""Tiny offline assets for the CLI tests: a saved tiny Llama with a word-level tokenizer, and a tiny dataset."""
import json
import os
import random

from conftest import tiny_llama

COMPLAINT = ["late", "broken", "rude", "refund", "never", "worst", "cold", "missing"]
PRAISE = ["thanks", "great", "love", "fast", "friendly", "perfect", "happy", "kind"]
SUBJECTS = ["order", "driver", "staff", "pizza", "parcel", "room"]
TEMPLATE_WORDS = "Is this customer message a complaint ? Answer complaint or no . Message : Answer".split()


def make_rows(n: int, seed: int) -> list[dict]:
    """Short messages; a complaint uses complaint words, the others praise words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        bad = i % 2 == 0
        words = rng.sample(COMPLAINT if bad else PRAISE, 2) + [rng.choice(SUBJECTS)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "text_label": "complaint" if bad else "no complaint"})
    return rows


def write_data(directory: str) -> str:
    """train / validation / test .jsonl files in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for split, n, seed in (("train", 24, 0), ("validation", 6, 1), ("test", 6, 2)):
        with open(os.path.join(directory, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in make_rows(n, seed))
    return directory


def save_tiny_model(directory: str) -> str:
    """tiny_llama() and a word-level tokenizer over the data and prompt words, saved for from_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; LlamaConfig's bos / eos ids are 1 / 2
    words = sorted(set(COMPLAINT + PRAISE + SUBJECTS + TEMPLATE_WORDS))
    vocab = {w: i for i, w in enumerate(specials + words)}
    assert len(vocab) <= 64  # tiny_llama's vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    model = tiny_llama()
    model.config.pad_token_id = 3
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
