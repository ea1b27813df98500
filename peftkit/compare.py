"""``peftkit compare``: full fine-tuning vs PEFT methods on the same model and data, measured.

Each variant trains in its own ``python -m peftkit train`` subprocess (so its peak memory is its own, as the
run records it from Linux's VmHWM); its summary.json gives the rest. Forgetting is measured here, on the bundled
general text: the change of the LM loss (causal LMs), or representation drift (other models).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from .report import fmt, fmt_bytes

GENERAL_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "general_text.txt")
METRICS = ("accuracy", "token_accuracy", "exact_match", "macro_f1", "f1")  # the first one present is "the" metric
CAUSAL_TASKS = ("causal-label", "sft")


def general_paragraphs(path: str = GENERAL_TEXT) -> list[str]:
    """The bundled general text, one string per paragraph (paragraphs are separated by blank lines)."""
    with open(path, encoding="utf-8") as fh:
        return [p.strip() for p in fh.read().split("\n\n") if p.strip()]


def general_probe(model, tokenizer, task: str, paragraphs: list[str], max_length: int = 128) -> dict:
    """Causal LMs: {"loss": mean token NLL}; other models: {"embeddings": mean-pooled last hidden states}."""
    import torch

    model.eval()
    total, count, pooled = 0.0, 0, []
    with torch.no_grad():
        for text in paragraphs:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            if task in CAUSAL_TASKS:
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"])
                n = int(enc["input_ids"].shape[1]) - 1  # predicted positions
                total, count = total + float(out.loss) * n, count + n
            else:
                pooled.append(_pooled(model, enc))  # (hidden,)
    if task in CAUSAL_TASKS:
        return {"loss": total / max(count, 1)}
    return {"embeddings": torch.stack(pooled)}  # (paragraphs, hidden)


def _pooled(model, enc):
    kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "output_hidden_states": True}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = enc["input_ids"][:, :1]
    out = model(**kwargs)
    hidden = getattr(out, "encoder_last_hidden_state", None)
    hidden = hidden if hidden is not None else out.hidden_states[-1]  # (1, seq, hidden)
    mask = enc["attention_mask"][0].unsqueeze(-1).to(hidden.dtype)  # (seq, 1)
    return (hidden[0] * mask).sum(0) / mask.sum()


def forgetting(before: dict, after: dict) -> float:
    """LM loss after - before, or 1 - mean cosine similarity of the pooled states (representation drift)."""
    import torch

    if "loss" in before:
        return after["loss"] - before["loss"]
    return 1.0 - float(torch.nn.functional.cosine_similarity(before["embeddings"], after["embeddings"], dim=-1).mean())


# --- running the variants ---------------------------------------------------------------------------
def run_variant(job: dict, directory: str, log_path: str, in_process: bool = False) -> dict:
    """Train one variant (a subprocess unless ``in_process``); {"wall_time_s", "peak_rss_bytes", "returncode"}."""
    from .cli.commands import dump_yaml

    config = directory.rstrip(os.sep) + ".job.yaml"
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(dump_yaml(job))
    args = ["train", "--config", config, "--output-dir", directory, "--overwrite", "--quiet"]
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        if in_process:
            code = _train_here(args, log)
        else:
            code = subprocess.Popen([sys.executable, "-m", "peftkit", *args], stdout=log,
                                    stderr=subprocess.STDOUT).wait()
    if code == 130:
        raise KeyboardInterrupt(f"compare interrupted while training {directory}")
    # the peak the run recorded (train.job.peak_rss_bytes: the child's own; its rusage from wait4 would also count
    # this process's memory up to the fork); in-process, the process peak so far
    peak = _read_summary(directory).get("peak_memory_bytes")
    return {"wall_time_s": time.perf_counter() - started, "peak_rss_bytes": peak, "returncode": code}


def _train_here(args: list[str], log) -> int:
    import contextlib

    from .cli import main

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return main(args)


def dir_bytes(path: str) -> Optional[int]:
    """Total size of the files under ``path``; None when it does not exist."""
    if not os.path.isdir(path):
        return None
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def headline_metric(summary: dict) -> tuple[Optional[str], Optional[float]]:
    """(name, value) of the run's main test metric after training."""
    test = summary.get("test") or summary.get("test_after") or {}
    for name in METRICS:
        if isinstance(test.get(name), (int, float)):
            return name, float(test[name])
    return None, None


def peft_for(method: str, given: dict) -> dict:
    """The method flags given to compare that belong to ``method`` (e.g. --target-modules goes to lora and ia3)."""
    if method.lower() == "full":
        return {}
    from .config import lookup

    fields = {f.name for f in dataclasses.fields(lookup(method.upper())[0])}
    return {k: v for k, v in given.items() if k in fields}


def _read_summary(directory: str) -> dict:
    path = os.path.join(directory, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def variant_job(job: dict, method: str, n_train: Optional[int], lrs: Optional[dict[str, float]] = None) -> dict:
    """The shared job for one variant: its method, its method's settings, its training-set size, and its own
    learning rate where ``lrs`` (method -> lr) names one."""
    train = {**job["train"], "lr": lrs[method]} if lrs and method in lrs else job["train"]
    return {**job, "method": method, "peft": peft_for(method, job.get("peft") or {}), "train": train,
            "data": {**job["data"], "max_train_samples": n_train or job["data"].get("max_train_samples")}}


def measure_variant(name: str, job: dict, out_dir: str, before: dict, in_process: bool = False,
                    low_data: bool = False) -> dict:
    """Train one variant (``job`` from variant_job) and collect its row of the comparison."""
    from .cli.runs import job_labels, load_run_model, resolve_run

    directory = os.path.join(out_dir, name)
    method, n_train = job["method"], job["data"]["max_train_samples"]
    process = run_variant(job, directory, os.path.join(out_dir, f"{name}.log"), in_process)
    row: dict[str, Any] = {"variant": name, "method": method, "low_data": low_data, "max_train_samples": n_train,
                           **process}
    if process["returncode"] != 0:
        row["error"] = f"training failed (exit {process['returncode']}); see {name}.log"
        return row
    summary = _read_summary(directory)
    run = resolve_run(directory)
    metric, value = headline_metric(summary)
    row.update(trainable_params=summary.get("trainable_params"), total_params=summary.get("total_params"),
               checkpoint_bytes=dir_bytes(run.adapter_dir or run.model_dir), test_metric=metric, test_value=value,
               n_train=(summary.get("data_sizes") or {}).get("train"))
    labels = summary.get("labels") or job_labels(job)
    model, tokenizer = load_run_model(run, None, job["data"]["task"], labels)
    row["forgetting"] = forgetting(before, general_probe(model, tokenizer, job["data"]["task"], general_paragraphs()))
    return row


# --- the command ------------------------------------------------------------------------------------
def _parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="full fine-tuning vs PEFT methods on the same model and data, measured",
                       description="Train full fine-tuning and each PEFT method (each in its own subprocess) on the "
                       "same model and data; write compare.md, compare.json and compare.png to --output-dir.")
    p.add_argument("--config", metavar="FILE", help="base job config (YAML/JSON); its method is replaced per variant")
    p.epilog = ("Method flags (e.g. --target-modules query value) apply to every variant whose method has that field; "
                "the data and training flags apply to all.")
    p.add_argument("--model", help="model for every variant (default: the job's)")
    p.add_argument("--methods", default="full,lora,ia3",
                   help="comma-separated: 'full' and PEFT methods (default: full,lora,ia3)")
    p.add_argument("--low-data", type=int, metavar="N", help="also run every variant with only N training examples")
    p.add_argument("--output-dir", default="peftkit-compare", metavar="DIR", help="default: ./peftkit-compare")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --output-dir")
    p.add_argument("--full-lr", type=float, metavar="LR", help="learning rate of the full fine-tuning variants "
                   "(full fine-tuning wants a far smaller one than adapters; default: the shared --lr)")
    p.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR", help="a learning rate for one "
                   "method's variants, e.g. --method-lr ia3=1e-2 prompt=3e-2 (IA3 and prompt methods want larger "
                   "ones than LoRA); the others use --lr")
    p.add_argument("--in-process", action="store_true", help="train the variants in this process (starts faster; "
                   "peak memory is then the process peak so far, not each variant's own)")
    return p


def _base_job(args: argparse.Namespace, flags: list) -> dict:
    # the job every variant shares: defaults < --config < --model / data / train flags
    from .cli.commands import load_job_file
    from .cli.flags import given_values
    from .train import JobConfig

    job = (load_job_file(args.config) if args.config else JobConfig()).to_dict()
    given = given_values(args, flags)
    job["data"] = {**job["data"], **given["data"]}
    job["train"] = {**job["train"], **given["train"]}
    job["peft"] = {**(job.get("peft") or {}), **given["peft"]}  # each variant takes the fields its method has
    if args.model:
        job["model"] = args.model
    JobConfig.from_dict({**job, "method": "full", "peft": {}})  # validate the shared settings before any run
    return job


def _check_variants(job: dict, variants: list[tuple[str, str, Optional[int]]], lrs: dict[str, float]) -> None:
    """Every variant's job and method settings, checked before the first one trains (a bad --r would otherwise
    surface only when its variant's turn came); a low-data run must train on fewer examples than the main one."""
    from .cli.commands import CliError
    from .train import JobConfig
    from .train.job import checked_method_config

    main_n = job["data"].get("max_train_samples")
    for name, method, n_train in variants:
        if n_train is not None and main_n is not None and n_train >= main_n:
            raise CliError(f"--low-data {n_train} is not below --max-train-samples {main_n}: the low-data variants "
                           "would train on as much data as the main ones; pass a smaller --low-data")
        data = variant_job(job, method, n_train, lrs)
        try:
            checked_method_config(JobConfig.from_dict(data))
        except (ValueError, TypeError) as err:
            raise CliError(f"variant {name!r}: {err}") from None


def _variants(args: argparse.Namespace) -> list[tuple[str, str, Optional[int]]]:
    from .cli.commands import CliError, check_method_name

    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CliError("--methods is empty; pass e.g. full,lora,ia3")
    for method in methods:
        check_method_name(method)
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise CliError(f"--methods names {repeated} more than once; name each method once")
    if args.low_data is not None and args.low_data < 2:
        raise CliError(f"--low-data {args.low_data}: use at least 2 training examples")
    out = [(m, m, None) for m in methods]
    if args.low_data is not None:
        out += [(f"{m}-n{args.low_data}", m, args.low_data) for m in methods]
    return out


def method_lrs(args: argparse.Namespace, methods: list[str]) -> dict[str, float]:
    """method -> learning rate from --full-lr and --method-lr, each checked (a compared method, a positive number)."""
    from .cli.commands import CliError

    lrs = {"full": args.full_lr} if args.full_lr is not None else {}
    for item in args.method_lr:
        method, sep, value = item.partition("=")
        method = method.strip().lower()
        try:
            lr = float(value)
        except ValueError:
            lr = None
        if not sep or lr is None or not lr > 0:
            raise CliError(f"--method-lr {item!r}: write METHOD=LR with a positive learning rate, e.g. ia3=1e-2")
        if method not in methods:
            raise CliError(f"--method-lr {item!r}: {method!r} is not among the compared methods ({', '.join(methods)})")
        if method in lrs:
            raise CliError(f"--method-lr gives {method!r} a learning rate twice (or with --full-lr); give it once")
        lrs[method] = lr
    return lrs


def run_compare(args: argparse.Namespace, flags: list) -> int:
    """peftkit compare."""
    from .cli.commands import CliError
    from .cli.runs import job_labels
    from .report import write_compare
    from .train import load_model

    variants = _variants(args)
    lrs = method_lrs(args, sorted({method for _, method, _ in variants}))
    job = _base_job(args, flags)
    _check_variants(job, variants, lrs)
    used = {k for _, method, _ in variants for k in peft_for(method, job["peft"])}
    if set(job["peft"]) - used:
        raise CliError(f"method setting(s) {sorted(set(job['peft']) - used)} belong to none of the compared methods "
                       f"({args.methods})")
    if os.path.exists(os.path.join(args.output_dir, "compare.json")) and not args.overwrite:
        raise CliError(f"--output-dir {args.output_dir!r} already holds a comparison; pass --overwrite or another dir")
    from .train.job import holds_run

    held = [name for name, _, _ in variants if holds_run(os.path.join(args.output_dir, name))]
    if held and not args.overwrite:  # each variant trains with --overwrite: a run kept there was replaced silently
        raise CliError(f"--output-dir {args.output_dir!r} already holds runs in {held} (a comparison stopped before "
                       "its end, or runs of your own); pass --overwrite to replace them, or choose another dir")
    os.makedirs(args.output_dir, exist_ok=True)
    task = job["data"]["task"]
    base, tokenizer = load_model(job["model"], task, labels=job_labels(job))
    before = general_probe(base, tokenizer, task, general_paragraphs())
    del base
    rows = []
    for name, method, n_train in variants:
        print(f"[{len(rows) + 1}/{len(variants)}] training {name} ...", flush=True)
        rows.append(measure_variant(name, variant_job(job, method, n_train, lrs), args.output_dir, before,
                                    args.in_process, low_data=n_train is not None))
        print(f"    {_line(rows[-1])}", flush=True)
    result = {"model": job["model"], "task": task, "dataset": job["data"].get("dataset"),
              "forgetting_kind": "lm_loss_delta" if task in CAUSAL_TASKS else "representation_drift",
              "full_lr": args.full_lr, "method_lr": lrs, "peak_memory_scope": "process so far" if args.in_process else "per variant", "rows": rows, "job": job}
    write_compare(result, args.output_dir)
    print(f"wrote {os.path.join(args.output_dir, 'compare.md')} (+ compare.json, compare.png)")
    return 1 if any("error" in r for r in rows) else 0


def _line(row: dict) -> str:
    if "error" in row:
        return row["error"]
    return (f"{row['test_metric'] or 'metric'} {fmt(row['test_value'])}, {fmt(row['wall_time_s'])} s, "
            f"peak {fmt_bytes(row['peak_rss_bytes'])}, forgetting {fmt(row['forgetting'])}")


def compare_command():
    """The compare sub-command."""
    from .cli.commands import Command

    return Command(_parser, ("data", "train", "peft"), run_compare)
