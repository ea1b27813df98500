"""Finding what a run directory holds (adapter or full model, summary, job) and loading it for inference."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from .errors import CliError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Run:
    """What ``--adapter DIR`` points at: an adapter or a full model, with its run's summary when present."""

    adapter_dir: Optional[str]  # holds adapter_config.json
    model_dir: Optional[str]  # a full fine-tuned model (config.json), when the run trained in full
    summary: dict  # the run's summary.json, or {}

    def job_dict(self) -> Optional[dict]:
        """The run's job config as a dict, when the run recorded it."""
        job = self.summary.get("job")
        return job if isinstance(job, dict) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CliError(f"{path} is not valid JSON ({err}); the run directory is damaged", 1) from None
    return data if isinstance(data, dict) else {}


def resolve_run(path: str) -> Run:
    """A run directory, an adapter directory, or a full-model directory -> Run."""
    if not os.path.isdir(path):
        raise CliError(f"--adapter {path!r} does not exist (or is not a directory); pass the output directory of "
                       "`peftkit train` or a directory holding adapter_config.json")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        run_dir = parent if os.path.isfile(os.path.join(parent, "summary.json")) else path
        return Run(path, None, _read_json(os.path.join(run_dir, "summary.json")))
    if os.path.isfile(os.path.join(path, "adapter", ADAPTER_CONFIG)):
        return Run(os.path.join(path, "adapter"), None, _read_json(os.path.join(path, "summary.json")))
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        return Run(None, os.path.join(path, "model"), _read_json(os.path.join(path, "summary.json")))
    if os.path.isfile(os.path.join(path, "config.json")):
        run_dir = parent if os.path.isfile(os.path.join(parent, "summary.json")) else path
        return Run(None, path, _read_json(os.path.join(run_dir, "summary.json")))
    raise CliError(f"--adapter {path!r} holds no {ADAPTER_CONFIG} (and no adapter/ or model/ inside); pass the output "
                   "directory of `peftkit train` or an adapter directory")


def base_model_name(run: Run, model: Optional[str]) -> str:
    """The base model: --model, else the run's job, else the adapter config's base_model_name_or_path."""
    if model:
        return model
    job = run.job_dict() or {}
    if job.get("model"):
        return job["model"]
    if run.adapter_dir:
        base = _read_json(os.path.join(run.adapter_dir, ADAPTER_CONFIG)).get("base_model_name_or_path")
        if base:
            return base
    raise CliError("cannot tell which base model this adapter belongs to (no summary.json / job in the run and no "
                   "base_model_name_or_path in adapter_config.json); pass --model")


def run_labels(run: Run) -> Optional[list[str]]:
    """The label set the run trained on, when it recorded one."""
    for key in ("labels", "label_set"):
        value = run.summary.get(key)
        if isinstance(value, list) and value:
            return [str(v) for v in value]
    return None


def data_labels(data) -> Optional[list[str]]:
    """The label set of a DataConfig's training split, for tasks with a classifier head or label words."""
    from ..train import load_splits
    from ..train.data import LABEL_TASKS, label_set

    if data.task not in LABEL_TASKS and data.task != "token-cls":
        return None
    return label_set(load_splits(data)["train"], data)


def job_labels(job: dict) -> Optional[list[str]]:
    """data_labels for a job dict."""
    from ..train import DataConfig

    return data_labels(DataConfig.from_dict(job["data"]))


def load_run_model(run: Run, model_name: Optional[str], task: str, labels: Optional[list[str]]):
    """(model in eval mode, tokenizer) for a run: the full model, or the base model with the adapter loaded."""
    from ..model import PeftModel
    from ..train import load_model

    if run.model_dir is not None:  # full fine-tuning saved the model with its tokenizer
        model, tokenizer = load_model(run.model_dir, task, labels=labels)
        return model.eval(), tokenizer
    base, tokenizer = load_model(base_model_name(run, model_name), task, labels=labels)
    return PeftModel.from_pretrained(base, run.adapter_dir).eval(), tokenizer


OUTPUT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")


def check_output_path(path: str) -> None:
    """Refuse an output file name write_rows cannot write (before any work is done)."""
    if os.path.splitext(path)[1].lower() not in OUTPUT_EXTENSIONS:
        raise CliError(f"--output {path!r}: use a .csv, .tsv, .jsonl or .json file name")


def write_rows(rows: list[dict], path: str) -> None:
    """Rows to .csv / .tsv / .jsonl / .json by the extension; atomic."""
    from ..checkpoint import atomic_write_text

    check_output_path(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        lines = [json.dumps(_plain(r), ensure_ascii=False) for r in rows]
        text = "\n".join(lines) + "\n" if ext == ".jsonl" else json.dumps([_plain(r) for r in rows], indent=1) + "\n"
    elif ext in (".csv", ".tsv"):
        buffer = io.StringIO()
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buffer, columns, delimiter="\t" if ext == ".tsv" else ",", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in _plain(r).items()} for r in rows)
        text = buffer.getvalue()
    atomic_write_text(path, text)


def _plain(row: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)) for k, v in row.items()}


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value
