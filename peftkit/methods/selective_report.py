"""Where a selective adapter's budget went: ``selection.md`` (counts per layer x module type and per module) and
``selection.png`` (heat map of the fraction selected, layer x module type), written beside the adapter.

save_pretrained writes both for every selective adapter (the PNG only where matplotlib is installed; the
public ``write_selection_report`` insists on it).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

from torch import nn

from ..checkpoint import atomic_write_text
from ..inject import adapter_layers

logger = logging.getLogger("peftkit")
NO_LAYER = "-"  # modules outside the repeated blocks (e.g. a pooler)


def selection_counts(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, int]]:
    """(selected values, weight entries) per module path of the base model, for one selective adapter."""
    from .selective import SelectiveLayer

    model = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    return {path: (layer.selective_values[adapter_name].numel(), layer.base_layer.weight.numel())
            for path, layer in adapter_layers(model)
            if isinstance(layer, SelectiveLayer) and adapter_name in layer.selective_values}


_BLOCK = re.compile(r"(.*?[^.]+)\.(\d+)\.")  # the first numbered segment: "<stack>.<n>." (model.layers.3.)


def split_name(path: str, stacks: int = 1) -> tuple[str, str]:
    """(layer, module type) at the first numbered segment: "model.layers.3.self_attn.q_proj" -> ("3",
    "self_attn.q_proj"); "-" for modules outside the repeated blocks. Where the model has ``stacks`` > 1 stacks of
    blocks (T5's encoder.block and decoder.block), the layer names its stack: "decoder.block 3"."""
    found = _BLOCK.match(path)
    if found is None:
        return NO_LAYER, path
    index = found.group(2)
    return (index if stacks <= 1 else f"{found.group(1)} {index}"), path[found.end():]


def _grid(counts: dict[str, tuple[int, int]]) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[int, int]]]:
    # layers (by stack in first-seen order, then numerically; "-" last), module types (first-seen order),
    # (layer, type) -> (selected, entries)
    found = {path: _BLOCK.match(path) for path in counts}
    stacks = list(dict.fromkeys(m.group(1) for m in found.values() if m is not None))
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    order: dict[str, tuple] = {NO_LAYER: (len(stacks), 0)}
    for path, (chosen, total) in counts.items():
        key = split_name(path, len(stacks))
        if found[path] is not None:
            order[key[0]] = (stacks.index(found[path].group(1)), int(found[path].group(2)))
        old = cells.get(key, (0, 0))
        cells[key] = (old[0] + chosen, old[1] + total)
    layers = sorted({k[0] for k in cells}, key=lambda layer: order[layer])
    types = list(dict.fromkeys(k[1] for k in cells))
    return layers, types, cells


def selection_markdown(counts: dict[str, tuple[int, int]], title: str) -> str:
    """The markdown report: a layer x module-type table of counts, then one row per module."""
    layers, types, cells = _grid(counts)
    total = sum(c for c, _ in counts.values())
    lines = [f"# Selection of adapter {title}", "", f"{total:,} values selected in {len(counts)} modules.", "",
             "## Selected values per layer and module type", "", "| layer | " + " | ".join(types) + " | total |",
             "|---" * (len(types) + 2) + "|"]
    for layer in layers:
        row = [cells.get((layer, t), (0, 0))[0] for t in types]
        lines.append(f"| {layer} | " + " | ".join(str(c) for c in row) + f" | {sum(row)} |")
    lines += ["", "## Per module", "", "| module | selected | entries | fraction |", "|---|---|---|---|"]
    for path, (chosen, entries) in counts.items():
        lines.append(f"| {path} | {chosen} | {entries} | {chosen / entries:.4%} |")
    return "\n".join(lines) + "\n"


def draw_heat_map(counts: dict[str, tuple[int, int]], path: str, title: str) -> None:
    """A PNG heat map of the fraction selected, layers down, module types across (matplotlib, Agg canvas)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the selection heat map needs matplotlib: pip install matplotlib "
                          "(selection.md is written without it)") from err
    layers, types, cells = _grid(counts)
    grid = [[_fraction(cells.get((layer, t), (0, 0))) for t in types] for layer in layers]  # (layers, types)
    figure = Figure(figsize=(1.2 + 0.9 * len(types), 1.2 + 0.35 * len(layers)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(layers)), layers, fontsize=7)
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title(f"fraction selected: {title}", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _fraction(cell: tuple[int, int]) -> float:
    return cell[0] / cell[1] if cell[1] else 0.0


def write_selection_report(model: nn.Module, adapter_name: str, directory: str,
                           draw: Optional[bool] = True) -> list[str]:
    """Write ``selection.md`` and ``selection.png`` for ``adapter_name`` into ``directory``; the paths written.

    ``draw=None`` skips the PNG with a warning when matplotlib is missing (what save_pretrained does).
    """
    counts = selection_counts(model, adapter_name)
    if not counts:
        raise ValueError(f"no selective adapter named {adapter_name!r} in this model")
    os.makedirs(directory, exist_ok=True)
    written = [os.path.join(directory, "selection.md")]
    atomic_write_text(written[0], selection_markdown(counts, adapter_name))
    try:
        draw_heat_map(counts, os.path.join(directory, "selection.png"), adapter_name)
        written.append(os.path.join(directory, "selection.png"))
    except ImportError:
        if draw:
            raise
        logger.warning("matplotlib is not installed: wrote selection.md but not selection.png")
    return written
