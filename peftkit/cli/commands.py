"""The sub-commands: each has an ``add_parser`` (its own options), the flag groups it takes, and ``run``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import CliError
from .flags import at_least, check_method_flags, given_values, method_classes_from_registry
from .runs import check_output_path, data_labels, load_run_model, resolve_run, run_labels, write_rows
from ..train.job import JOB_FILE, holds_run, run_exists_message  # JOB_FILE: the run's job, recorded by run_job: the one record --resume reads


@dataclass
class Command:
    """One sub-command."""

    add_parser: Callable[[Any], argparse.ArgumentParser]
    groups: tuple[str, ...]  # which generated flag groups it takes: "data", "train", "peft"
    run: Callable[[argparse.Namespace, list], int]


# --- train ----------------------------------------------------------------------------------------
def _train_parser(sub) -> argparse.ArgumentParser:
    from . import DEFAULT_OUTPUT_DIR

    p = sub.add_parser("train", help="fine-tune a model (with no arguments: the default LoRA job)",
                       description="Fine-tune a model. With no arguments this runs the default job (JobConfig(): "
                       f"LoRA on the embedded SmolLM2-135M, bundled complaints data) into ./{DEFAULT_OUTPUT_DIR}. "
                       "Precedence: field defaults < --config file < flags.")
    p.add_argument("--config", metavar="FILE", help="job config file (YAML or JSON) with model, method, peft, data, train")
    p.add_argument("--model", help="model: an embedded name (smollm2-135m, minilm-l6), a local path or a Hub id")
    p.add_argument("--method", help="'full' or a PEFT method: " + ", ".join(m.lower() for m in _methods()))
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"where the adapter, metrics, curves and report go (default: ./{DEFAULT_OUTPUT_DIR})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    mode.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint "
                      f"(its recorded {JOB_FILE} is the base job unless --config is given)")
    p.add_argument("--print-config", action="store_true", help="print the resolved job as YAML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _methods() -> list[str]:
    return sorted(method_classes_from_registry())


def resolve_job(args: argparse.Namespace, flags: list):
    """The job: JobConfig defaults, then the --config file, then the flags given."""
    from ..train import JobConfig

    recorded = os.path.join(args.output_dir, JOB_FILE)
    if args.config is not None:
        job, source = load_job_file(args.config), "the config file's"
    elif args.resume and os.path.isfile(recorded):  # a resumed run continues the job it started with
        job, source = load_job_file(recorded), f"the run's recorded {JOB_FILE}'s"
    else:
        job, source = JobConfig(), "the default job's"
    data = job.to_dict()
    if args.model is not None:
        data["model"] = args.model
    if args.method is not None and args.method.lower() != str(data["method"]).lower():
        data["method"], data["peft"] = args.method, _kept_settings(args.method, data.get("peft") or {}, source)
    check_method_name(data["method"])
    given = given_values(args, flags)
    check_method_flags(data["method"], given["peft"], flags, method_classes_from_registry())
    data["data"] = {**data.get("data", {}), **given["data"]}
    data["train"] = {**data.get("train", {}), **given["train"]}
    data["peft"] = {**(data.get("peft") or {}), **given["peft"]}
    try:
        job = JobConfig.from_dict(data)
    except (ValueError, TypeError) as err:  # a flag value the config refuses: a usage error
        raise CliError(f"invalid job settings: {err}") from None
    _check_method_settings(job)
    return job


def _check_method_settings(job) -> None:
    """The method's settings, from the config file as from flags, built into its config now, so that
    --print-config shows only a job that would run."""
    from ..train.job import checked_method_config

    try:
        checked_method_config(job)
    except (ValueError, TypeError) as err:
        raise CliError(f"invalid job settings: {err}") from None


def _kept_settings(method: str, peft: dict, source: str) -> dict:
    # --method replaced the base job's method: keep its method settings the new method also has
    check_method_name(method)
    cls = method_classes_from_registry().get(method.upper())  # None for "full": it has no settings
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    dropped = sorted(set(peft) - fields)
    if dropped:
        print(f"peftkit: note: --method {method} drops {source} {dropped} (not {method} settings)", file=sys.stderr)
    return {k: v for k, v in peft.items() if k in fields}


def load_job_file(path: str):
    """JobConfig.load, with a missing or invalid file as a usage error naming the file."""
    from ..train import JobConfig

    if not os.path.isfile(path):
        raise CliError(f"--config {path!r} does not exist")
    try:
        return JobConfig.load(path)
    except (ValueError, TypeError) as err:
        raise CliError(f"--config {path}: {' '.join(str(err).split())}") from None


def check_method_name(method: str) -> None:
    """Refuse a method that is neither 'full' nor registered (exit 2), listing the choices."""
    methods = _methods()
    if str(method).lower() != "full" and str(method).upper() not in methods:
        raise CliError(f"unknown method {method!r}; choose 'full' or one of: {', '.join(m.lower() for m in methods)}")


def dump_yaml(data: dict) -> str:
    """YAML text of a plain dict (keys in their order)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def run_train(args: argparse.Namespace, flags: list) -> int:
    """peftkit train."""
    job = resolve_job(args, flags)
    if args.print_config:
        print(dump_yaml(job.to_dict()), end="")
        return 0
    if holds_run(args.output_dir) and not (args.overwrite or args.resume):
        raise CliError(f"--output-dir {run_exists_message(args.output_dir)}")
    from ..train import run_job

    summary = run_job(job, args.output_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"done: {os.path.join(args.output_dir, 'report.md')}" if isinstance(summary, dict) else "done")
    return 0


# --- eval / predict / generate --------------------------------------------------------------------
def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--adapter and --model, shared by eval / predict / generate / merge."""
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a `peftkit train` output directory, an adapter directory, or a full-model directory")
    p.add_argument("--model", help="base model (default: the one the run recorded)")


def _eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate an adapter (or a fine-tuned full model) on a split",
                       description="Evaluate a trained adapter. Data flags default to the run's job config.")
    add_adapter_options(p)
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="default: test")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def run_data(args: argparse.Namespace, flags: list, run, needs_dataset: bool = False):
    """(the run's JobConfig, or the default one; its DataConfig with this command line's data flags). A run that
    recorded no job (an adapter folder of its own, a merged model) has no data settings to go by: ``needs_dataset``
    then asks for --dataset (eval read the bundled data and scored 0.54 where the run's test set gives 0.70), and
    the default settings used are named."""
    from ..train import DataConfig, JobConfig

    recorded, given = run.job_dict(), given_values(args, flags)["data"]
    job = JobConfig.from_dict(recorded) if recorded else JobConfig()
    data = DataConfig.from_dict({**job.data.to_dict(), **given})
    if not recorded:
        if needs_dataset and "dataset" not in given:
            raise CliError(f"{args.adapter!r} records no training job (no summary.json beside it), so its data is "
                           "unknown; pass --dataset (and --task, --text-column, --label-column as they were)")
        print(f"note: {args.adapter!r} records no training job; the data settings are the defaults (task "
              f"{data.task!r}) where no flag gives them", file=sys.stderr)
    return job, data


def run_model(args: argparse.Namespace, run, job) -> Optional[str]:
    """--model, else the base model the run recorded; None where it recorded none (load_run_model then takes the
    adapter's base_model_name_or_path, where the default job's model was taken: the wrong base, a shape error)."""
    return args.model or (job.model if run.job_dict() else None)


def run_label_set(run, data) -> Any:
    """The label set the model was trained on: recorded by the run, else derived from the training split."""
    labels = run_labels(run)
    return labels if labels is not None else data_labels(data)


def run_eval(args: argparse.Namespace, flags: list) -> int:
    """peftkit eval."""
    from ..train import evaluate, load_splits
    from ..train.data import label_set

    run = resolve_run(args.adapter)
    job, data = run_data(args, flags, run, needs_dataset=True)
    labels = run_label_set(run, data)
    rows = load_splits(data)[args.split]
    unseen = sorted(set(label_set(rows, data)) - set(labels)) if labels is not None else []
    if unseen:  # gold labels the model never trained on can only be scored wrong (it reported 0.0, no word why)
        raise CliError(f"the {args.split} split has labels the run never trained on: {unseen[:10]}; the model "
                       f"predicts {labels[:20]}. Map the labels to those, or pass the run's own --dataset", 1)
    model, tokenizer = load_run_model(run, run_model(args, run, job), data.task, labels)
    metrics = evaluate(model, tokenizer, rows, data, labels=labels)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        for name, value in metrics.items():
            print(f"{args.split} {name}: {value:.4f}" if isinstance(value, float) else f"{args.split} {name}: {value}")
    return 0


def _predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="batch predictions for a file of inputs",
                       description="Predict for every row of --input (csv/tsv/json/jsonl/parquet); write --output "
                       "(.csv/.tsv/.jsonl/.json) with a 'prediction' column.")
    add_adapter_options(p)
    p.add_argument("--input", required=True, metavar="FILE", help="rows holding the text column")
    p.add_argument("--output", required=True, metavar="FILE", help="where the predictions go (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def run_predict(args: argparse.Namespace, flags: list) -> int:
    """peftkit predict."""
    from ..train import predict
    from ..train.data import nested_rows, normalise_row, read_file

    if not os.path.isfile(args.input):
        what = "is a directory; pass a data file" if os.path.isdir(args.input) else "does not exist"
        raise CliError(f"--input {args.input!r} {what}")
    check_output_path(args.output)
    if os.path.isdir(args.output):
        raise CliError(f"--output {args.output!r} is a directory; pass a file name (.csv, .tsv, .jsonl or .json)")
    if os.path.exists(args.output) and not args.overwrite:
        raise CliError(f"--output {args.output!r} already exists; pass --overwrite to replace it")
    run = resolve_run(args.adapter)
    job, data = run_data(args, flags, run)
    rows = read_file(args.input)
    if not rows:
        raise CliError(f"--input {args.input!r} has no rows; there is nothing to predict", 1)
    missing = [i for i, r in enumerate(rows) if r.get(data.text_column) is None]
    if missing:
        raise CliError(f"--input row {missing[0] + 1} has no {data.text_column!r} column; it has {sorted(rows[missing[0]])}. "
                       "Name the text column with --text-column", 1)
    nested = nested_rows(rows, data.text_column, data.task)
    if nested:  # str() of it would be the text the model reads
        raise CliError(f"--input row {nested[0] + 1} holds a {type(rows[nested[0]][data.text_column]).__name__} in "
                       f"{data.text_column!r}; this task takes one text per row", 1)
    rows = [normalise_row(r, data) for r in rows]  # the text as training reads it (a number in JSON: its digits)
    labels = run_label_set(run, data)
    model, tokenizer = load_run_model(run, run_model(args, run, job), data.task, labels)
    out = predict(model, tokenizer, rows, data, labels=labels)
    write_rows(out, args.output)
    print(f"wrote {len(out)} predictions to {args.output}")
    return 0


def _generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text from a prompt with an adapter",
                       description="Greedy generation with the adapter (causal LMs).")
    add_adapter_options(p)
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads one prompt per line from stdin")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, metavar="N", help="default: 32")
    p.add_argument("--use-template", action="store_true",
                   help="wrap the prompt in the run's prompt template (as in training), e.g. for label answers")
    return p


def run_generate(args: argparse.Namespace, flags: list) -> int:
    """peftkit generate."""
    import torch

    prompts = [args.prompt] if args.prompt != "-" else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise CliError("--prompt - read no prompts from stdin")
    run = resolve_run(args.adapter)
    job, data = run_data(args, flags, run)
    if data.task not in ("causal-label", "sft", "seq2seq"):
        raise CliError(f"this run's task is {data.task!r}, which does not generate text; use `peftkit predict`")
    model, tokenizer = load_run_model(run, run_model(args, run, job), data.task, None)
    for prompt in prompts:
        text = data.template().format(text=prompt) if args.use_template else prompt
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        start = 0 if data.task == "seq2seq" else enc["input_ids"].shape[1]
        print(tokenizer.decode(out[0, start:], skip_special_tokens=True))
    return 0


def all_commands() -> dict[str, Command]:
    """Every sub-command by name, in the order --help lists them."""
    from .tools import inspect_command, merge_command
    from ..compare import compare_command

    return {
        "train": Command(_train_parser, ("data", "train", "peft"), run_train),
        "eval": Command(_eval_parser, ("data",), run_eval),
        "predict": Command(_predict_parser, ("data",), run_predict),
        "generate": Command(_generate_parser, ("data",), run_generate),
        "merge": merge_command(),
        "inspect": inspect_command(),
        "compare": compare_command(),
        "serve": Command(_serve_parser, (), _run_serve),
    }


def _serve_parser(sub) -> argparse.ArgumentParser:
    from ..serve import add_arguments

    parser = sub.add_parser("serve", help="OpenAI-style HTTP server: one base model, a directory of adapters",
                            description="Serve a base model and its adapters over HTTP (/v1/completions, "
                                        "/v1/chat/completions, /v1/models); needs `pip install peftkit[serve]`.")
    add_arguments(parser)
    return parser


def _run_serve(args: argparse.Namespace, flags: list) -> int:
    from ..serve import main

    return main(args)
