"""A whole run: plan, zero-shot test, training, final test, and the run directory (adapter, metrics, summary, report)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint import atomic_write_text
from ..fieldtypes import check_types
from . import checkpoints
from .data import DataConfig, LABEL_TASKS, collate, encode, known_fields, label_set, load_splits
from .metrics import DEFAULT_METRIC, TASK_METRICS, evaluate
from .models import hf_progress_off, load_model, method_config, method_type, needs_calibration, wrap_model
from .trainer import TrainConfig, Trainer, TrainingInterrupted, seed_everything

# what a run writes at the top of its output_dir (adapter/ or model/ for full fine-tuning; *.tmp while saving); a
# directory holding any of them holds (part of) a run. --overwrite replaces these and nothing else in the directory
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "checkpoints", "adapter", "model", "adapter.tmp", "model.tmp",
               "report.md", "curves.png", "job.json")  # job.json last: set aside last, the run stays a run till then
JOB_FILE = "job.json"  # the run's JobConfig, written when the run starts
REPLACED_FILE = ".replaced-runs.json"  # the set-aside runs (--overwrite) to delete once this run finishes


@dataclass
class JobConfig:
    """One training run: model, method and its settings, data, training. The defaults are the tuned default run."""

    model: str = "smollm2-135m"  # embedded name (smollm2-135m, minilm-l6), local path, or Hub id
    method: str = "lora"  # a registered peft_type (any case) or "full" for full fine-tuning
    # fields of the method's config class; they override peftkit's defaults for the method (models.METHOD_DEFAULTS:
    # LoRA r=8, alpha=16, dropout 0.05 on the model type's default targets), which are themselves over the config class's defaults
    peft: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.peft is None or isinstance(self.peft, dict):  # anything else: check_types names it
            self.peft = dict(self.peft or {})
        check_types(self)  # e.g. a YAML "data:" that holds a list
        method_type(self.method)  # refuses an unknown method now, not after the model has loaded
        metric, task = self.train.metric, self.data.task
        if metric is not None and task in TASK_METRICS and metric not in TASK_METRICS[task]:  # (it failed after epoch 1)
            raise ValueError(f"metric {metric!r} is not computed for task {task!r}; choose one of "
                             f"{list(TASK_METRICS[task])} (or leave it out: {DEFAULT_METRIC[task]!r})")

    def to_dict(self) -> dict:
        """Plain nested dict (JSON / YAML ready)."""
        return {"model": self.model, "method": self.method, "peft": dict(self.peft),
                "data": self.data.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "JobConfig":
        """Build from a (possibly partial) nested dict; unknown keys are refused."""
        return cls(**known_fields(cls, data))

    @classmethod
    def load(cls, path: str) -> "JobConfig":
        """Read a job from a YAML (.yaml / .yml) or JSON file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"job config {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as err:
            raise ValueError(f"cannot parse {path}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of job fields, not {type(data).__name__}")
        return cls.from_dict(data)


def run_entries(output_dir: str) -> list[str]:
    """The entries of RUN_OUTPUTS that ``output_dir`` holds (none where it is not a directory)."""
    if not os.path.isdir(output_dir):
        return []
    return [m for m in RUN_OUTPUTS if os.path.lexists(os.path.join(output_dir, m))]


def holds_run(output_dir: str) -> bool:
    """True when ``output_dir`` is a directory that already holds (part of) a run."""
    return bool(run_entries(output_dir))


def run_exists_message(output_dir: str) -> str:
    """Why a run into ``output_dir`` needs --resume or --overwrite, naming what --overwrite would replace."""
    return (f"{output_dir!r} already holds a run ({', '.join(run_entries(output_dir))}); pass --overwrite to replace "
            "those (other files there stay), --resume to continue it, or choose another --output-dir")


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to write over a run unless asked; refuse to resume without a checkpoint."""
    if resume and overwrite:
        raise ValueError("choose one of --resume (continue the run) and --overwrite (replace it)")
    if os.path.isfile(output_dir):
        raise ValueError(f"output directory {output_dir!r} is a file; pass a directory")
    _check_writable(output_dir)
    if resume and checkpoints.latest(output_dir) is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.directory(output_dir)} to resume from; "
                                "run without --resume (add --overwrite to replace what is there)")
    if holds_run(output_dir) and not (resume or overwrite):
        raise FileExistsError(run_exists_message(output_dir))


def _check_writable(output_dir: str) -> None:
    """Refuse, before the slow load, an output directory that cannot be made or written (a file on its path, a
    read-only file system or folder): found at the first write, after the load and the zero-shot test, these gave
    bare OS errors."""
    existing = output_dir
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        raise ValueError(f"output directory {output_dir!r} cannot be made: {existing!r} is a symbolic link to "
                         f"{os.readlink(existing)!r}, which does not exist; create that, or choose another --output-dir")
    if not os.path.isdir(existing):
        raise ValueError(f"output directory {output_dir!r} cannot be made: {existing!r} is a file; choose another "
                         "--output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {output_dir!r} cannot be written ({existing!r} is read-only, or "
                              "not writable by this user); choose another --output-dir")


def _set_aside(output_dir: str) -> str:
    """Move the run's own entries (RUN_OUTPUTS) out of ``output_dir`` into a new sibling directory, returned; it is
    deleted only once the new run has finished. The user's other files in ``output_dir`` are not touched."""
    stem = f"{output_dir.rstrip(os.sep)}.replaced-{int(time.time())}"
    aside, n = stem, 1
    while os.path.lexists(aside):  # one left by a run that crashed in this same second
        aside, n = f"{stem}-{n}", n + 1
    os.makedirs(aside)
    moved = []
    try:
        for name in run_entries(output_dir):  # one rename each, job.json last
            os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
            moved.append(name)
    except BaseException:  # Ctrl-C or an error part-way: the old run goes back whole, not split in two
        for name in reversed(moved):
            os.replace(os.path.join(aside, name), os.path.join(output_dir, name))
        os.rmdir(aside)
        raise
    marker = os.path.join(output_dir, REPLACED_FILE)  # which set-asides this run (and its resumes) may delete
    atomic_write_text(marker, json.dumps(_replaced_runs(output_dir) + [os.path.basename(aside)]))
    return aside


def _replaced_runs(output_dir: str) -> list[str]:
    """The set-aside directories (names beside ``output_dir``) of runs that --overwrite replaced with the run in
    ``output_dir``, as _set_aside recorded them; deleted when that run finishes, also after a kill and --resume.
    Only recorded ones: a user's own directory named like one, or one an earlier run left, is not touched."""
    try:
        with open(os.path.join(output_dir, REPLACED_FILE), encoding="utf-8") as fh:
            names = json.load(fh)
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and os.sep not in n and n not in (".", "..")] if isinstance(
        names, list) else []


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program: Linux's VmHWM. (ru_maxrss also counts the
    memory of the process it was forked from, up to the exec, so a child of a big parent reports the parent's.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def save_model(model, tokenizer, output_dir: str, full: bool) -> str:
    """adapter/ (PEFT format) or, for full fine-tuning, model/ (with the tokenizer); written then renamed."""
    final = os.path.join(output_dir, "model" if full else "adapter")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with hf_progress_off():  # a full model's "Writing model shards" bar showed under --quiet too
        model.save_pretrained(tmp)
    if full:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _plan(job: JobConfig, model, splits: dict, log: Callable[[str], None]) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sizes = {k: len(v) for k, v in splits.items()}
    log(f"model {job.model} | method {job.method} | task {job.data.task}")
    log(f"trainable parameters {trainable:,d} of {total:,d} ({100 * trainable / total:.4f} %)")
    log(f"data: train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}")
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total,
            "data_sizes": sizes}


def build(job: JobConfig, splits: dict):
    """(model wrapped for training, tokenizer, labels) for ``job`` on ``splits``."""
    labels = label_set(splits["train"], job.data) if job.data.task in LABEL_TASKS + ("token-cls",) else None
    seed_everything(job.train.seed)  # a new head (seq-cls, token-cls) is initialised as the model loads
    model, tokenizer = load_model(job.model, job.data.task, labels=labels)
    seed_everything(job.train.seed)  # adapter initialisation is part of the seeded run
    config = method_config(job.method, job.peft, job.data.task)
    calibration = calibration_batches(job, splits, tokenizer, model) if needs_calibration(config) else None
    return wrap_model(model, job.method, job.peft, job.data.task, calibration), tokenizer, labels


def calibration_batches(job: JobConfig, splits: dict, tokenizer, model, count: int = 8) -> list[dict]:
    """Up to ``count`` training batches with labels, for methods that select what to train from data."""
    label2id = getattr(model.config, "label2id", None) if job.data.task in ("seq-cls", "token-cls") else None
    rows = random.Random(job.train.seed).sample(splits["train"], min(len(splits["train"]), count * job.train.batch_size))
    examples = [encode(r, tokenizer, job.data, label2id) for r in rows]
    size = job.train.batch_size
    return [collate(examples[i:i + size], tokenizer.pad_token_id, job.data.task) for i in range(0, len(examples), size)]


def run_job(job: JobConfig, output_dir: str, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run ``job`` into ``output_dir``; the summary dict (also saved as summary.json)."""
    started = time.time()
    output_dir = os.path.abspath(output_dir)
    job = with_absolute_paths(job)
    check_output_dir(output_dir, resume, overwrite)
    peft_config = checked_method_config(job)  # bad settings fail before the slow load
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # every core (restored on return)
    try:
        return _run(job, output_dir, peft_config, resume, overwrite, progress, log, started)
    finally:
        torch.set_num_threads(threads)


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """``job`` with a model and dataset that name local paths made absolute: recorded as given (relative), they
    sent eval / predict / --resume run from another directory to the Hugging Face Hub."""
    model, dataset = _absolute(job.model), _absolute(job.data.dataset)
    if (model, dataset) == (job.model, job.data.dataset):
        return job
    return dataclasses.replace(job, model=model, data=dataclasses.replace(job.data, dataset=dataset))


def _absolute(path):
    return os.path.abspath(path) if isinstance(path, str) and os.path.exists(path) else path


def checked_method_config(job: JobConfig):
    """The job's method config (None for full fine-tuning), with the settings that cannot train together refused."""
    peft_config = method_config(job.method, job.peft, job.data.task)
    if getattr(peft_config, "peft_type", None) == "PREFIX_TUNING" and job.train.gradient_checkpointing:
        from ..methods.prefix import NO_CHECKPOINTING

        raise ValueError(NO_CHECKPOINTING)
    return peft_config


def _run(job: JobConfig, output_dir: str, peft_config, resume: bool, overwrite: bool, progress: bool,
         log: Callable[[str], None], started: float) -> dict:
    if resume:
        check_same_job(job, output_dir)
    splits = load_splits(job.data)
    model, tokenizer, labels = build(job, splits)
    plan = _plan(job, model, splits, log)
    trainer = Trainer(model, tokenizer, job.data, job.train, splits, output_dir, log, progress, started=started)
    zero_shot = _zero_shot(job, model, tokenizer, splits, trainer, labels, resume, log)
    # the first write: only now does an old run (--overwrite) move aside, in one rename
    aside = _set_aside(output_dir) if overwrite and holds_run(output_dir) else None
    if aside is not None:
        log(f"the previous run in {output_dir} moved to {aside}; it is deleted when this run finishes")
    elif not resume:  # a marker left in a directory cleared by hand names set-asides this run did not make
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, REPLACED_FILE))
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, JOB_FILE), json.dumps(job.to_dict(), indent=2))
    if not resume and zero_shot is not None:
        trainer.add_row({"event": "eval", "split": "test", "phase": "zero-shot", "step": 0, **zero_shot})
    try:
        trainer.train(resume=resume)
    except TrainingInterrupted as err:
        log(f"interrupted at step {err.step}; resume with: peftkit train ... --resume --output-dir {output_dir}")
        raise
    try:
        test = evaluate(model, tokenizer, splits["test"], job.data, job.train.eval_batch_size, labels)
    except KeyboardInterrupt:  # training is done and its end checkpointed: a resume only evaluates and saves
        raise KeyboardInterrupt(f"interrupted in the final test evaluation, after training finished (checkpointed); "
                                f"finish with: peftkit train ... --resume --output-dir {output_dir}") from None
    trainer.add_row({"event": "eval", "split": "test", "phase": "fine-tuned", "step": trainer.state["global_step"], **test})
    log(f"test: zero-shot {_fmt(zero_shot)} -> fine-tuned {_fmt(test)}")
    saved = save_model(model, tokenizer, output_dir, method_type(job.method) == "full")
    summary = {**plan, "model": job.model, "method": job.method, "task": job.data.task, "labels": labels,
               "zero_shot": zero_shot,
               "test": test, "steps": trainer.state["global_step"], "best_step": trainer.state["best_step"],
               "best_validation": trainer.state["best_metric"], "stopped_early": trainer.state["early_stopped"],
               "wall_time_s": round(trainer.wall_time(), 2), "peak_memory_mb": round(_peak_memory_mb(trainer.device), 1),
               "checkpoint_bytes": _tree_bytes(saved), "saved": os.path.basename(saved), "job": job.to_dict(),
               "peft_config": peft_config.to_dict() if peft_config is not None else None}
    summary["peak_memory_bytes"] = int(summary["peak_memory_mb"] * 2**20)
    summary["adapter_bytes"] = summary["checkpoint_bytes"]
    _write_outputs(summary, trainer.rows, output_dir, log)
    for replaced in _replaced_runs(output_dir):  # this run's set-aside, and one a killed run left for its resume
        shutil.rmtree(os.path.join(os.path.dirname(output_dir), replaced), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, REPLACED_FILE))
    return summary


def _fmt(metrics) -> str:
    if not isinstance(metrics, dict):
        return "n/a"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n" and isinstance(v, float))


def _zero_shot(job: JobConfig, model, tokenizer, splits: dict, trainer: Trainer, labels, resume: bool, log):
    # the test metric before training; n/a for a classification head that has never been trained
    if resume:
        found = [r for r in trainer_rows_on_disk(trainer) if r.get("phase") == "zero-shot"]
        return {k: v for k, v in found[-1].items() if k not in ("event", "split", "phase", "step")} if found else None
    if job.data.task in ("seq-cls", "token-cls"):
        log("zero-shot: n/a (the classification head is new)")
        return None
    result = evaluate(model, tokenizer, splits["test"], job.data, job.train.eval_batch_size, labels)
    log(f"zero-shot test: {_fmt(result)}")
    return result


def check_same_job(job: JobConfig, output_dir: str) -> None:
    """Refuse to resume a run with a different model, method, method settings or data, or one whose recorded job
    is gone (every run writes it before its first checkpoint, so nothing could be checked)."""
    path = os.path.join(output_dir, JOB_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} is missing, so the run's model, method and data cannot be "
                                "checked against this job; put the file back, or start over with --overwrite")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    now = job.to_dict()
    if isinstance(saved.get("data"), dict):  # a run recorded before paths were made absolute: as run from here
        saved["data"] = {**saved["data"], "dataset": _absolute(saved["data"].get("dataset"))}
    saved["model"] = _absolute(saved.get("model"))
    changed = [k for k in ("model", "data") if saved.get(k) != now[k]]
    (saved_method, saved_settings), (method, settings) = _resolved_method(saved), _resolved_method(now)
    # compared resolved: a setting that restates a default, or the method name in another case, is no change
    changed += ["method"] * (saved_method != method) + ["peft"] * (saved_method == method and saved_settings != settings)
    changed = sorted(changed)
    if changed:
        raise ValueError(f"cannot resume: {changed} differ from the run in {output_dir} (its settings are in {path}); "
                         "resume with the same settings, or start over with --overwrite")
    # checked here too, before the load and before job.json is rewritten: a refused resume left the refused
    # settings recorded, and the plain --resume after it was then refused in turn
    checkpoints.check_training_settings(saved.get("train") or {}, now["train"], f"the run's in {path}")


def _resolved_method(job: dict) -> tuple:
    """The method and every one of its settings (defaults included) of a job dict, to compare two jobs by; the
    recorded values themselves where they no longer resolve (a job.json from another version)."""
    try:
        config = method_config(job.get("method", "lora"), dict(job.get("peft") or {}),
                               (job.get("data") or {}).get("task", DataConfig().task))
    except (ValueError, TypeError):
        return (job.get("method"), job.get("peft"))
    return (method_type(job.get("method", "lora")), config.to_dict() if config is not None else None)


def trainer_rows_on_disk(trainer: Trainer) -> list[dict]:
    """Rows of the latest checkpoint (what a resume continues from)."""
    path = checkpoints.latest(trainer.output_dir)
    if path is None:
        return []
    return torch.load(os.path.join(path, checkpoints.STATE_FILE), map_location="cpu", weights_only=True)["rows"]


def _write_outputs(summary: dict, rows: list[dict], output_dir: str, log: Callable[[str], None]) -> None:
    from .. import report

    atomic_write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2, default=str))
    try:
        report.write_curves_png(rows, os.path.join(output_dir, "curves.png"))
    except ImportError as err:  # matplotlib missing: the run itself is fine
        print(f"warning: no curves.png ({err})", file=sys.stderr)
    report.write_report_md(summary, os.path.join(output_dir, "report.md"))
    log(f"saved {summary['saved']}/, metrics.jsonl, summary.json, curves.png, report.md in {output_dir}")
