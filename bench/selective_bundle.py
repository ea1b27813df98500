"""Pack all-MiniLM-L6-v2 and SST-2 small enough to travel to the device machine (a 64 MiB limit), exactly.

The weights file is 91 MB, most of it the 30,522-row word-embedding table; SST-2 uses ~9,400 of those tokens.
``pack`` keeps only those rows (and the TSVs, tokenizer and config); ``rebuild`` writes model.safetensors
with the other rows zero. Rows no sentence uses get no gradient and never reach an output, so every number
``bench/selective.py`` measures is the same as with the full file (checked: identical logits).

    python bench/selective_bundle.py pack out/selbench          # here (out/ is git-ignored)
    # on the device, carry ["out/selbench"]:
    python3 bench/selective_bundle.py rebuild out/selbench && \\
      SST2_DIR=out/selbench/data MINILM_DIR=out/selbench/model python3 bench/selective.py --in-process
"""
from __future__ import annotations

import csv
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
import selective  # noqa: E402  (bench/selective.py: model_dir, DATA)

KEY = "embeddings.word_embeddings.weight"
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pack(directory: str) -> None:
    """Write ``directory``/model (weights without unused embedding rows) and ``directory``/data (the TSVs)."""
    from transformers import AutoTokenizer

    source, model_out, data_out = selective.model_dir(), os.path.join(directory, "model"), os.path.join(directory, "data")
    os.makedirs(model_out, exist_ok=True)
    os.makedirs(data_out, exist_ok=True)
    for name in FILES:
        shutil.copy(os.path.join(source, name), model_out)
    tokenizer, used = AutoTokenizer.from_pretrained(source), set()
    for split in ("train.tsv", "test.tsv"):
        shutil.copy(os.path.join(selective.DATA, split), data_out)
        with open(os.path.join(selective.DATA, split), encoding="utf-8") as fh:
            rows = [r["sentence"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
        for ids in tokenizer(rows)["input_ids"]:
            used.update(ids)
    used.update(tokenizer.all_special_ids)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    rows = torch.tensor(sorted(used))
    table = tensors.pop(KEY)
    tensors.update({"__rows": table[rows].clone(), "__ids": rows, "__shape": torch.tensor(list(table.shape))})
    save_file(tensors, os.path.join(model_out, "parts.safetensors"))


def rebuild(directory: str) -> None:
    """Write ``directory``/model/model.safetensors from the packed parts."""
    model_dir = os.path.join(directory, "model")
    tensors = load_file(os.path.join(model_dir, "parts.safetensors"))
    table = torch.zeros(tuple(tensors.pop("__shape").tolist()), dtype=tensors["__rows"].dtype)
    table[tensors.pop("__ids")] = tensors.pop("__rows")
    tensors[KEY] = table
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("pack", "rebuild"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else rebuild)(sys.argv[2])
