"""Run reports: loss / metric curves (PNG) and a readable ``report.md`` from a run's summary dict.

matplotlib is imported lazily (it lives in the ``demo`` and ``test`` extras), with the Agg backend so
plots render without a display.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from .checkpoint import atomic_file, atomic_write_text

NA = "n/a"
CURVES_NAME = "curves.png"
# metric keys on an eval row that are bookkeeping, not metrics
_ROW_KEYS = {"event", "split", "step", "epoch", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "n"}


def import_pyplot():
    """matplotlib.pyplot with the Agg backend; a clear error naming the pip command when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'peftkit[demo]' (or pip install matplotlib)") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure as PNG atomically (temp file in the same directory, then rename)."""
    atomic_file(os.path.abspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _x(row: dict) -> Optional[float]:
    # x position of a row: its optimizer step, else its epoch
    for key in ("step", "epoch"):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def _numeric_metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in _ROW_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a metrics.jsonl; training rows carry a loss and no split."""
    train = [r for r in rows if r.get("event", "train") == "train" and r.get("split") in (None, "train") and "loss" in r]
    valid = [r for r in rows if r.get("split") in ("validation", "valid")]
    return train, valid


def write_curves_png(rows: list[dict], path) -> None:
    """Plot training loss (left) and validation metrics (right) against the step; write ``path`` atomically."""
    plt = import_pyplot()
    train, valid = split_rows(rows)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    points = [(_x(r), float(r["loss"])) for r in train if _x(r) is not None]
    if points:
        ax_loss.plot([p[0] for p in points], [p[1] for p in points], label="train loss", linewidth=1)
    val_loss = [(_x(r), float(r["loss"])) for r in valid if _x(r) is not None and "loss" in r]
    if val_loss:
        ax_loss.plot([p[0] for p in val_loss], [p[1] for p in val_loss], "o-", label="validation loss")
    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    _plot_metrics(ax_metric, valid)
    for ax in (ax_loss, ax_metric):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:
        save_figure(fig, os.fspath(path))
    finally:
        plt.close(fig)


def _plot_metrics(ax, valid: list[dict]) -> None:
    # one line per validation metric other than the loss (that one sits on the loss axes)
    names = sorted({k for r in valid for k in _numeric_metrics(r)} - {"loss"})
    for name in names:
        points = [(_x(r), r[name]) for r in valid if name in r and _x(r) is not None]
        if points:
            ax.plot([p[0] for p in points], [float(p[1]) for p in points], "o-", label=name)
    values = [float(r[n]) for r in valid for n in names if n in r]
    if values and all(0 <= v <= 1 for v in values):  # accuracy / F1: the whole scale, so a flat line reads as flat
        ax.set_ylim(0, 1.02)
    ax.set(title="validation metrics", xlabel="step")


# --- report.md ---------------------------------------------------------------------------------
def _get(summary: dict, *keys: str) -> Any:
    # the first present key; dotted keys reach into nested dicts ("data.n_train")
    for key in keys:
        value: Any = summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def fmt(value: Any, unit: str = "") -> str:
    """A value for a table cell: numbers rounded, None as n/a."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,d}{unit}"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def fmt_bytes(n: Any) -> str:
    """Bytes as KiB / MiB / GiB; n/a for None."""
    if not isinstance(n, (int, float)):
        return NA
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return NA


def _metrics_table(before: Any, after: Any) -> list[str]:
    before = before if isinstance(before, dict) else {}
    after = after if isinstance(after, dict) else {}
    names = [k for k in after if k not in _ROW_KEYS] + [k for k in before if k not in after and k not in _ROW_KEYS]
    if not names:
        return ["No test metrics recorded."]
    lines = ["| metric | zero-shot (before) | fine-tuned (after) |", "|---|---|---|"]
    lines += [f"| {n} | {fmt(before.get(n))} | {fmt(after.get(n))} |" for n in names]
    return lines


def _dump_yaml(data: Any) -> str:
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2, sort_keys=True, default=str)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _sizes(summary: dict) -> str:
    sizes = _get(summary, "data_sizes", "sizes", "data.sizes")
    if isinstance(sizes, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in sizes.items())
    parts = [(s, _get(summary, f"n_{s}", f"num_{s}", f"{s}_size")) for s in ("train", "validation", "test")]
    return ", ".join(f"{s} {fmt(v)}" for s, v in parts)


def report_markdown(summary: dict) -> str:
    """The text of report.md for a run summary; missing entries print as n/a."""
    trainable = _get(summary, "trainable_params", "trainable_parameters")
    total = _get(summary, "total_params", "all_params", "total_parameters")
    pct = _get(summary, "trainable_pct", "trainable_percent")
    if pct is None and isinstance(trainable, int) and isinstance(total, int) and total:
        pct = 100.0 * trainable / total
    job = _get(summary, "job", "config", "job_config")
    rows = [
        ("model", fmt(_get(summary, "model", "job.model"))),
        ("method", fmt(_get(summary, "method", "job.method"))),
        ("task", fmt(_get(summary, "task", "job.data.task"))),
        ("trainable parameters", f"{fmt(trainable)} of {fmt(total)} ({fmt(pct)} %)"),
        ("data sizes", _sizes(summary)),
        ("steps", _steps(summary)),
        ("wall time", fmt(_get(summary, "wall_time_s", "train_time_s", "wall_time"), " s")),
        ("peak memory", fmt_bytes(_get(summary, "peak_memory_bytes", "peak_rss_bytes", "peak_memory"))),
        ("model size" if summary.get("saved") == "model" else "adapter size",
         fmt_bytes(_get(summary, "checkpoint_bytes", "adapter_bytes", "adapter_size_bytes"))),
    ]
    lines = [f"# peftkit run: {fmt(_get(summary, 'method', 'job.method'))} on {fmt(_get(summary, 'model', 'job.model'))}",
             "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Test metrics", ""]
    lines += _metrics_table(_get(summary, "zero_shot", "test_before", "zero_shot_metrics"),
                            _get(summary, "test", "test_after", "test_metrics"))
    lines += ["", "## Curves", "", f"![loss and validation metrics]({CURVES_NAME})", ""]
    if job is not None:
        lines += ["## Job configuration", "", "```yaml", _dump_yaml(job).rstrip(), "```", ""]
    return "\n".join(lines)


def _steps(summary: dict) -> str:
    """The steps trained, and the step whose weights were saved where that is the best validation's, not the last
    (keep_best): "steps 100" read as the adapter after 100 steps."""
    steps, best = _get(summary, "steps", "global_step", "train_steps"), summary.get("best_step")
    keep_best = _get(summary, "job.train.keep_best")
    if keep_best is not False and best is not None and best != steps:
        return f"{fmt(steps)} (the saved weights are step {fmt(best)}'s, the best validation)"
    return fmt(steps)


def write_report_md(summary: dict, path) -> None:
    """Write a readable report.md for a run (curves.png linked relatively); atomic."""
    atomic_write_text(os.fspath(path), report_markdown(summary))


# --- compare ---------------------------------------------------------------------------------------
FORGETTING_LABELS = {"lm_loss_delta": "forgetting (general-text LM loss after - before)",
                     "representation_drift": "forgetting (representation drift: 1 - cos, general text)"}
# the bar charts of compare.png: (row key, title, scale to display units, log axis)
COMPARE_BARS = (("trainable_params", "trainable parameters", 1.0, True), ("wall_time_s", "wall time (s)", 1.0, False),
                ("peak_rss_bytes", "peak memory (MiB)", 2.0 ** -20, False),
                ("checkpoint_bytes", "checkpoint size (MiB)", 2.0 ** -20, True),
                ("test_value", "test metric", 1.0, False), ("forgetting", "forgetting", 1.0, False))


def _pct(row: dict) -> Optional[float]:
    trainable, total = row.get("trainable_params"), row.get("total_params")
    return 100.0 * trainable / total if isinstance(trainable, int) and isinstance(total, int) and total else None


def compare_table(result: dict) -> list[str]:
    """The measured table: one line per variant."""
    metric = next((r["test_metric"] for r in result["rows"] if r.get("test_metric")), "metric")
    head = ["variant", "method", "train examples", "trainable params", "trainable %", "wall time", "peak memory",
            "checkpoint size", f"test {metric}", FORGETTING_LABELS.get(result.get("forgetting_kind"), "forgetting")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["variant"], r["method"], fmt(r.get("n_train") or r.get("max_train_samples") or "all"),
                 fmt(r.get("trainable_params")), fmt(_pct(r)), fmt(r.get("wall_time_s"), " s"),
                 fmt_bytes(r.get("peak_rss_bytes")), fmt_bytes(r.get("checkpoint_bytes")), fmt(r.get("test_value")),
                 fmt(r.get("forgetting")) if "error" not in r else r["error"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _ratio(row: dict, full: Optional[dict], key: str) -> str:
    # " (0.42x full)" for a PEFT variant's measurement; "" for full itself or when unmeasured
    if row["method"] == "full" or not full or not full.get(key) or not isinstance(row.get(key), (int, float)):
        return ""
    ratio = row[key] / full[key]
    return f" ({ratio:.2f}x full)" if ratio >= 0.1 or ratio == 0 else f" (1/{round(1 / ratio):,d} of full)"


def _aspects(row: dict, full: Optional[dict], low: Optional[dict]) -> list[str]:
    # one column of the classic table, filled from one variant's measurements (vs full fine-tuning)
    is_full = row["method"] == "full"
    delta = "" if is_full or not full or full.get("test_value") is None or row.get("test_value") is None \
        else f" ({row['test_value'] - full['test_value']:+.3f} vs full)"
    low_text = f"; with {fmt(low.get('n_train') or low.get('max_train_samples'))} examples: " \
        f"{fmt(low.get('test_value'))}" if low else ""
    return [
        "update every weight of the model for the task" if is_full
        else f"train a small set of {row['method']} parameters; the base model stays frozen",
        f"{fmt(row.get('n_train'))} training examples -> test {fmt(row.get('test_value'))}{low_text}",
        f"{fmt(row.get('wall_time_s'), ' s')}{_ratio(row, full, 'wall_time_s')}",
        f"peak memory {fmt_bytes(row.get('peak_rss_bytes'))}{_ratio(row, full, 'peak_rss_bytes')}, "
        f"checkpoint {fmt_bytes(row.get('checkpoint_bytes'))}{_ratio(row, full, 'checkpoint_bytes')}",
        f"{fmt(row.get('trainable_params'))} ({fmt(_pct(row))} %)",
        f"test {row.get('test_metric') or 'metric'} {fmt(row.get('test_value'))}{delta}; "
        f"forgetting {fmt(row.get('forgetting'))}",
    ]


def classic_table(result: dict) -> list[str]:
    """The "PEFT vs conventional fine-tuning" table (objective, data, time, resources, parameters, outcome)."""
    main = [r for r in result["rows"] if not r.get("low_data") and "error" not in r]
    if not main:
        return ["No successful full-data variant to tabulate."]
    full = next((r for r in main if r["method"] == "full"), None)
    lows = {r["method"]: r for r in result["rows"] if r.get("low_data") and "error" not in r}
    columns = [_aspects(r, full, lows.get(r["method"])) for r in main]
    head = ["aspect"] + ["conventional fine-tuning (full)" if r["method"] == "full" else f"PEFT: {r['method']}"
                         for r in main]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, aspect in enumerate(("objective", "data", "time", "resources", "parameters changed", "outcome")):
        lines.append(f"| {aspect} | " + " | ".join(col[i] for col in columns) + " |")
    return lines


def _variant_lrs(result: dict) -> dict:
    # per-method learning rates of a comparison (older results hold only full_lr)
    lrs = dict(result.get("method_lr") or {})
    if result.get("full_lr") and "full" not in lrs:
        lrs["full"] = result["full_lr"]
    return lrs


def compare_markdown(result: dict) -> str:
    """compare.md: the measured table, then the classic table filled from it, and the chart."""
    lines = [f"# PEFT vs full fine-tuning: {result.get('model')} on {result.get('dataset')} ({result.get('task')})",
             "", "## Measured", ""] + compare_table(result)
    lines += ["", "## PEFT vs conventional fine-tuning", ""] + classic_table(result)
    train = (result.get("job") or {}).get("train") or {}
    if train:
        lines += ["", "## Settings", "", ", ".join(f"{k} {fmt(train.get(k))}" for k in
                                                   ("epochs", "max_steps", "batch_size", "lr") if k in train)
                  + "".join(f", {'full fine-tuning' if method == 'full' else method} lr {fmt(lr)}"
                            for method, lr in sorted(_variant_lrs(result).items()))]
    lines += ["", "![comparison](compare.png)", "", "Forgetting is measured on peftkit's bundled general text: "
              + ("the change of the language-model loss (positive = forgot)." if result.get("forgetting_kind")
                 == "lm_loss_delta" else "1 - mean cosine similarity of mean-pooled last hidden states, "
                 "fine-tuned vs base model (0 = unchanged)."), ""]
    return "\n".join(lines)


def write_compare_png(result: dict, path) -> None:
    """Bar charts of the measured columns, one panel each; atomic."""
    plt = import_pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    names = [r["variant"] for r in rows]
    for ax, (key, title, scale, log) in zip(axes.flat, COMPARE_BARS):
        values = [r.get(key) * scale if isinstance(r.get(key), (int, float)) else 0.0 for r in rows]
        ax.bar(range(len(rows)), values, color=["tab:red" if r["method"] == "full" else "tab:blue" for r in rows])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        if key == "forgetting":
            title = FORGETTING_LABELS.get(result.get("forgetting_kind"), title)
        elif key == "test_value":
            title = f"test {next((r['test_metric'] for r in rows if r.get('test_metric')), 'metric')}"
        ax.set_title(title, fontsize=9)
        if log and any(v > 0 for v in values):
            ax.set_yscale("log")
    fig.tight_layout()
    try:
        save_figure(fig, os.fspath(path))
    finally:
        plt.close(fig)


def write_compare(result: dict, directory: str) -> None:
    """compare.json, compare.md and compare.png in ``directory``."""
    atomic_write_text(os.path.join(directory, "compare.json"), json.dumps(result, indent=2, default=str))
    atomic_write_text(os.path.join(directory, "compare.md"), compare_markdown(result))
    try:
        write_compare_png(result, os.path.join(directory, "compare.png"))
    except ImportError as err:  # matplotlib missing: the measured tables are written, the chart is not
        print(f"warning: no compare.png ({err})", file=sys.stderr)
