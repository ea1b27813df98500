"""peftkit merge and peftkit inspect."""
from __future__ import annotations

import argparse
import json
import os

from .commands import Command, add_adapter_options, check_method_name, run_data, run_label_set, run_model
from .errors import CliError
from .flags import at_least, check_method_flags, given_values, method_classes_from_registry
from .runs import ADAPTER_CONFIG, load_run_model, resolve_run
from ..checkpoint import atomic_dir
from ..report import fmt_bytes
from ..train.data import TASKS

LISTED = 20  # targeted modules listed by inspect before "... and N more"


# --- merge ----------------------------------------------------------------------------------------
def _merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge an adapter into its base model and save the full model",
                       description="merge_and_unload, then save the full model and its tokenizer to --output.")
    add_adapter_options(p)
    p.add_argument("--output", required=True, metavar="DIR", help="a new or empty directory")
    return p


def run_merge(args: argparse.Namespace, flags: list) -> int:
    """peftkit merge."""
    from ..config import PeftConfig, lookup

    if not args.output.strip():
        raise CliError("--output is empty; pass the directory to save the merged model to")
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise CliError(f"--output {args.output!r} is not empty; pass a new or empty directory")
    if os.path.isfile(args.output):
        raise CliError(f"--output {args.output!r} is a file; pass a directory")
    run = resolve_run(args.adapter)
    if run.adapter_dir is None:
        raise CliError(f"{args.adapter!r} holds a full fine-tuned model, not an adapter: there is nothing to merge")
    config = PeftConfig.from_pretrained(run.adapter_dir)
    if not lookup(config.peft_type)[1].mergeable:
        raise CliError(f"a {config.peft_type} adapter cannot be merged into the base weights (it is not a weight "
                       "update); keep using it as an adapter (peftkit eval / predict / generate --adapter)", 1)
    job, data = run_data(args, flags, run)
    model, tokenizer = load_run_model(run, run_model(args, run, job), data.task, run_label_set(run, data))
    from ..train.models import hf_progress_off

    merged = model.merge_and_unload()

    def write(directory: str) -> None:
        merged.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    with hf_progress_off():
        atomic_dir(args.output, write)  # a crash mid-save leaves no half-written --output
    print(f"merged {config.peft_type} adapter into the base model; saved to {args.output}")
    return 0


# --- inspect --------------------------------------------------------------------------------------
def _inspect_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="what a method config targets, or what an adapter holds",
                       description="Either --adapter DIR (its config, tensors and size) or --model M --method "
                       "METHOD [method flags] (the modules it targets and the trainable parameter count).")
    p.add_argument("--adapter", metavar="DIR", help="an adapter directory or a `peftkit train` output directory")
    p.add_argument("--model", help="a model to apply --method to")
    p.add_argument("--method", help="a PEFT method (with --model)")
    p.add_argument("--task", default="causal-label", choices=TASKS,
                   help="the task the model is loaded for (default: causal-label)")
    p.add_argument("--labels", nargs="+", default=["0", "1"], help="class labels for seq-cls / token-cls heads")
    p.add_argument("--limit", type=at_least(0), default=LISTED, metavar="N", help=f"list at most N modules (default: {LISTED})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def adapter_contents(adapter_dir: str) -> dict:
    """An adapter's config and its tensors (name, shape, dtype, bytes), read without loading the weights."""
    from safetensors import safe_open

    from ..checkpoint import WEIGHTS_NAME

    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CliError(f"{config_path} is not valid JSON ({err}); the file is corrupt, re-save the adapter", 1) from None
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise CliError(f"{adapter_dir!r} has no {WEIGHTS_NAME}", 1)
    tensors = []
    try:
        with safe_open(path, framework="pt") as fh:
            for name in sorted(fh.keys()):
                tensor = fh.get_slice(name)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
                numel = 1
                for n in shape:
                    numel *= n
                tensors.append({"name": name, "shape": shape, "dtype": dtype, "bytes": numel * _itemsize(dtype)})
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for a damaged header
        raise CliError(f"cannot read {path}: the file is truncated or corrupt ({err}); re-save the adapter", 1) from None
    return {"config": config, "tensors": tensors, "total_bytes": sum(t["bytes"] for t in tensors),
            "file_bytes": os.path.getsize(path)}


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    return sizes.get(dtype, 1)


def config_targets(model_name: str, method: str, overrides: dict, task: str, labels: list[str]) -> dict:
    """Apply a method to a model: the modules it targets and the trainable / total parameter counts."""
    from ..inject import adapter_layers
    from ..train import load_model
    from ..train.models import wrap_model

    model, _ = load_model(model_name, task, labels=labels)
    try:
        wrapped = wrap_model(model, method, overrides, task)
    except ValueError as err:
        if "calibration" not in str(err):
            raise
        raise CliError(f"{err}; inspect has no data to score with: add --criterion magnitude to see a data-free "
                       "selection, or train and then inspect --adapter", 1) from None
    trainable, total = wrapped.get_nb_trainable_parameters()
    layers = [name for name, _ in adapter_layers(wrapped.base_model)]
    prompt = sorted(wrapped.prompt_modules)
    return {"model": model_name, "method": method, "config": wrapped.peft_config["default"].to_dict(),
            "targeted_modules": layers, "prompt_modules": prompt, "trainable_params": trainable,
            "total_params": total, "trainable_pct": 100.0 * trainable / total}


def run_inspect(args: argparse.Namespace, flags: list) -> int:
    """peftkit inspect."""
    given = given_values(args, flags)["peft"]
    if args.adapter is not None:
        if args.method or given:
            raise CliError("inspect takes either --adapter DIR or --model/--method with method flags, not both")
        run = resolve_run(args.adapter)
        if run.adapter_dir is None:
            raise CliError(f"{args.adapter!r} holds a full model, not an adapter; inspect it with --model/--method")
        info = adapter_contents(run.adapter_dir)
        _print_adapter(info, args)
        return 0
    if not args.model or not args.method:
        raise CliError("inspect needs --adapter DIR, or both --model and --method")
    check_method_name(args.method)
    if args.method.lower() == "full":
        raise CliError("inspect --method needs a PEFT method, not 'full' (full fine-tuning trains every parameter)")
    check_method_flags(args.method, given, flags, method_classes_from_registry())
    info = config_targets(args.model, args.method, given, args.task, args.labels)
    _print_targets(info, args)
    return 0


def _print_adapter(info: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return
    print(f"config ({ADAPTER_CONFIG}):")
    print(json.dumps(info["config"], indent=2, sort_keys=True))
    print(f"tensors ({len(info['tensors'])}):")
    for t in info["tensors"][: args.limit]:
        print(f"  {t['name']}  {tuple(t['shape'])}  {t['dtype']}  {t['bytes']:,d} B")
    if len(info["tensors"]) > args.limit:
        print(f"  ... and {len(info['tensors']) - args.limit} more")
    print(f"total: {info['total_bytes']:,d} bytes of tensors ({fmt_bytes(info['total_bytes'])}); "
          f"file {fmt_bytes(info['file_bytes'])}")


def _print_targets(info: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return
    print(f"{info['method']} on {info['model']}")
    layers = info["targeted_modules"]
    print(f"targeted modules: {len(layers)}")
    for name in layers[: args.limit]:
        print(f"  {name}")
    if len(layers) > args.limit:
        print(f"  ... and {len(layers) - args.limit} more")
    if info["prompt_modules"]:
        tokens = info["config"].get("num_virtual_tokens")
        print(f"acts on the inputs / attention cache: {tokens} virtual tokens (no base module is replaced)")
    print(f"trainable params: {info['trainable_params']:,d} || all params: {info['total_params']:,d} || "
          f"trainable%: {info['trainable_pct']:.4f}")


def merge_command() -> Command:
    """The merge sub-command."""
    return Command(_merge_parser, ("data",), run_merge)


def inspect_command() -> Command:
    """The inspect sub-command."""
    return Command(_inspect_parser, ("peft",), run_inspect)
