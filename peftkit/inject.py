"""ONE injection mechanism: match target module names, swap wrappers in, freeze the rest."""
from __future__ import annotations

import difflib
import re
from typing import Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

from .layers import AdapterLayer, ModulesToSaveWrapper

# Used when target_modules is None (the same defaults as Hugging Face PEFT for LoRA-like methods).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "vit": ["query", "value", "q_proj", "v_proj"],  # transformers >= 5 names ViT's attention q_proj / v_proj
    "whisper": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
}
# the heads a task trains in full, PEFT's lists (PeftModelForSequenceClassification / ...ForQuestionAnswering)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


class Method:
    """How a method enters a model. The registry maps a peft_type to one of these."""

    mergeable: ClassVar[bool] = True  # False: no weight update equals the adapter (merge is refused)

    def inject(self, model: nn.Module, config, adapter_name: str) -> list[str]:
        """Put ``adapter_name`` into ``model``; return the names of the modules it touched."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, config, batches, loss_fn) -> None:
        """Runs before ``inject``: a method that selects by importance scores ``model`` on ``batches`` here.

        By default a method takes no calibration data.
        """
        if batches is not None or loss_fn is not None:
            raise ValueError(f"{config.peft_type} adapters take no calibration_batches / loss_fn; leave them out "
                             "(they are for importance-based methods such as SelectiveConfig)")

    def extra_tensors(self, model: nn.Module, config, adapter_name: str) -> dict[str, torch.Tensor]:
        """Base tensors trained and saved with the adapter (e.g. LoRA's biases), by path; none by default."""
        return {}

    def check_loaded(self, model: nn.Module, adapter_name: str, directory: str) -> None:
        """Refuse loaded values that fit by shape but not by meaning (e.g. indices out of range); none by default."""

    def pack_tensors(self, model: nn.Module, config, adapter_name: str,
                     tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's tensors as written to disk (a method may compact them); unchanged by default."""
        return tensors

    def unpack_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``pack_tensors``, applied to a loaded file before it is checked; unchanged by default."""
        return tensors

    def write_extras(self, model: nn.Module, config, adapter_name: str, directory: str) -> None:
        """Files written beside a saved adapter (e.g. a report); none by default."""

    # Prompt methods (acts_on_inputs = True) leave the base model's layers alone: they keep a module per
    # adapter outside the base model and rewrite the inputs of forward / generate instead.
    acts_on_inputs: ClassVar[bool] = False

    def input_module(self, model: nn.Module, config, adapter_name: str) -> Optional[nn.Module]:
        """The adapter's module kept outside the base model (trained and saved with it); None by default.

        Such a module provides ``prompt_embeddings()`` (the one tensor saved, as PEFT does) and
        ``use_saved_embeddings()`` (called before a checkpoint is loaded into it).
        """
        return None

    def run(self, model: nn.Module, module: nn.Module, config, inputs: dict, generate: bool):
        """Call ``model`` (``generate`` when asked, else forward) on ``inputs`` rewritten by ``module``."""
        raise NotImplementedError


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_wrappers(model: nn.Module) -> set[str]:
    """Names of the wrappers around whole blocks (bottleneck adapters), whose block sits at ``<name>.base_layer``."""
    return {n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.wraps_block}


def plain_name(name: str, blocks: set[str]) -> str:
    """A module's name as on the model before any adapter wrapped a block above it: a bottleneck adapter around
    ``self_attn`` (one of ``blocks``, see block_wrappers) puts ``q_proj`` at ``self_attn.base_layer.q_proj``;
    configs, patterns and saved adapters name it ``self_attn.q_proj``, so that they fit a plain base too. Only
    those wrappers' ``base_layer`` goes: a model's own module called base_layer keeps its name."""
    if not blocks:
        return name
    real, out = [], []
    for part in name.split("."):
        if not (part == "base_layer" and ".".join(real) in blocks):
            out.append(part)
        real.append(part)
    return ".".join(out)


def is_block_base(name: str, blocks: set[str]) -> bool:
    """Whether ``name`` is the block a wrapper in ``blocks`` wraps (``<wrapper>.base_layer``): the wrapper, under
    the block's plain name, stands for it."""
    return name.endswith(".base_layer") and name[:-len(".base_layer")] in blocks


def real_names(model: nn.Module, blocks: set[str]) -> dict[str, str]:
    """Plain name (see plain_name) -> module path in ``model``, for the modules whose path differs from it (those
    inside a bottleneck adapter's block, ``blocks``); look a name up with ``.get(name, name)``."""
    if not blocks:
        return {}
    table = {}
    for real, _ in model.named_modules():
        plain = plain_name(real, blocks)
        if plain != real and not is_block_base(real, blocks):
            table[plain] = real
    return table


def name_matches(name: str, spec) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact names or dotted suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern) -> Optional[int]:
    """The index of the repeated block ``name`` lives in, as PEFT finds it: the first ``<pattern>.<n>.`` (any
    ``<word>.<n>.`` without a pattern), so T5's ``block.1.layer.0`` is block 1 and an MoE's
    ``layers.1.experts.0`` layer 1. A pattern is a regex fragment, as in PEFT."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [r".*?\.[^.]*\.(\d+)\."] if not patterns else [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns]
    for regex in regexes:
        found = re.match(regex, name)
        if found:
            return int(found.group(1))
    return None


def resolve_target_modules(model: nn.Module, config, defaults: dict, method: str, example: str) -> None:
    """Replace None (the model type's default) or "all-linear" in ``config.target_modules`` by explicit names."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(f"no default {method}target_modules for model type {model_type!r}; set target_modules, "
                             f"e.g. {example}")
        config.target_modules = list(defaults[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = expand_all_linear(model, config.task_type, (nn.Module,))


def _head_names(model: nn.Module, task_type: Optional[str]) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out_emb or (name and saved_name_matches(name, TASK_HEADS.get(task_type, ()))):
            heads.add(name)
    return heads


def expand_all_linear(model: nn.Module, task_type: Optional[str], supported: tuple) -> list[str]:
    """Resolve "all-linear": every linear layer but the output head, as leaf names (full names where needed).

    A layer another adapter already wrapped counts under its own name (the wrapper's), by its base layer.
    """
    heads = _head_names(model, task_type)
    layers = _unwrapped_modules(model)
    # a linear layer that a bottleneck adapter wraps itself (BERT's dense hook points) cannot take another adapter
    blocks = block_wrappers(model)
    chosen = [n for n, m in layers if isinstance(m, supported) and is_linear_like(m) and n not in blocks
              and n not in heads and not any(n.startswith(h + ".") for h in heads)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    linear_names = [n for n, m in layers if is_linear_like(m)]
    if {n for n in linear_names if name_matches(n, leaves)} == set(chosen):
        return leaves
    return sorted(chosen)


def _nearest_error(spec, model: nn.Module, field: str = "target_modules") -> ValueError:
    inside = _wrapper_prefixes(model)  # an adapter's own modules (lora_A, base_layer, ...) are no candidates
    leaves = [n for n, m in model.named_modules() if n and not n.startswith(inside)
              and (isinstance(m, AdapterLayer) or not any(True for _ in m.children()))]
    wanted = [spec] if isinstance(spec, str) else list(spec)
    if field != "target_modules":
        return ValueError(f"{field} {wanted!r} matches no module of the model; name modules it has (its task head, "
                          f"say), or leave {field} out ({len(leaves)} candidates: {', '.join(leaves[:4])}, ...)")
    if not wanted:
        return ValueError("target_modules is an empty list; name the modules to adapt (e.g. ['q_proj', 'v_proj']), "
                          "or leave it unset for the model type's defaults")
    hints = difflib.get_close_matches(str(wanted[0]), sorted({n.rsplit(".", 1)[-1] for n in leaves}), n=1, cutoff=0.7)
    hint = f"did you mean {hints[0]!r}? " if hints else ""
    if isinstance(spec, str) and hints and hints[0] == spec:  # a name, given as a string: read as a full-name regex
        hint = (f"a string is a regular expression matched against full module names (as in PEFT); for the modules "
                f"named {spec!r} pass a list, target_modules=[{spec!r}] ")
    return ValueError(
        f"target module {wanted if len(wanted) > 1 else wanted[0]!r} not found; {hint}"
        f"({len(leaves)} candidates: {', '.join(leaves[:4])}, ...)"
    )


def find_targets(model: nn.Module, config) -> list[str]:
    """Names of the modules ``config`` targets, in model order; an error if none match.

    PEFT's rules: nothing inside a module trained in full (``modules_to_save``, and a SEQ_CLS / TOKEN_CLS
    task's head) is a target; ``layers_to_transform`` narrows the names matched as suffixes of a list, not a
    full name listed as it is (nor a regex, which config validation refuses with it); an empty list narrows
    nothing.
    """
    found, inside = [], _wrapper_prefixes(model)
    in_full = _trained_in_full(config)
    layers = config.layers_to_transform or None
    dropped: dict[str, str] = {}  # why a module that target_modules names is not a target: the first one of each reason
    blocks = block_wrappers(model)
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        # a layer inside a bottleneck adapter's block answers to its plain name too; the block itself (the wrapper's
        # base_layer) does not: under that name the wrapper is the target
        plain = name if is_block_base(name, blocks) else plain_name(name, blocks)
        if not (name_matches(name, config.target_modules) or name_matches(plain, config.target_modules)):
            continue
        if name_matches(name, config.exclude_modules) or name_matches(plain, config.exclude_modules):
            dropped.setdefault("exclude_modules", name)
            continue
        if in_full and within_saved(name, in_full):
            dropped.setdefault("modules_to_save (trained in full)", name)
            continue
        listed = not isinstance(config.target_modules, str) and (name in config.target_modules
                                                                  or plain in config.target_modules)
        if layers is not None and not listed and layer_index(plain, config.layers_pattern) not in layers:
            dropped.setdefault(f"layers_to_transform={layers}", name)
            continue
        found.append(name)
    if not found and dropped:
        reasons = "; ".join(f"{why} leaves out e.g. {name!r}" for why, name in dropped.items())
        raise ValueError(f"target_modules {config.target_modules!r} match modules, but none is left to adapt: {reasons}. "
                         "Loosen those settings or name other targets")
    if not found:
        raise _nearest_error(config.target_modules, model)
    return found


def saved_name_matches(name: str, saved) -> bool:
    """modules_to_save's rule, PEFT's: the module name ends with one of ``saved`` as plain text (not target_modules'
    dotted suffix), so "classifier" also takes DistilBERT's "pre_classifier"."""
    return name.endswith(tuple(saved))


def within_saved(name: str, saved: list[str]) -> bool:
    """Whether module ``name`` is, or lives inside, a module that the modules_to_save names ``saved`` wrap."""
    parts = name.split(".")
    return any(saved_name_matches(".".join(parts[:i]), saved) for i in range(1, len(parts) + 1))


def _trained_in_full(config) -> list[str]:
    """The names of modules a config trains in full: its modules_to_save, plus the head of a classification task."""
    if not hasattr(config, "modules_to_save"):
        return []
    names = list(config.modules_to_save or [])
    names += [h for h in TASK_HEADS.get(getattr(config, "task_type", None), ()) if h not in names]
    return names


def _unwrapped_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model as it was before any adapter: a wrapper stands for its base layer, under
    the wrapper's name; what lives inside wrappers is left out."""
    inside, blocks = _wrapper_prefixes(model), block_wrappers(model)
    out = []
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if is_block_base(name, blocks):
            continue  # the wrapper stands for it already
        out.append((name, module.base_layer if isinstance(module, AdapterLayer) else module))
    return out


def _wrapper_prefixes(model: nn.Module) -> tuple[str, ...]:
    # modules inside a wrapper (its base_layer, per-adapter containers) are never targets themselves; inside a
    # block's wrapper (a bottleneck adapter) only its own containers are out, the block's layers stay targets
    out = []
    for n, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            out += [f"{n}.{attr}." for attr in m.adapter_attrs] if m.wraps_block else [f"{n}."]
    return tuple(out)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module called ``name``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def refuse_held(module: AdapterLayer, name: str, peft_type: str) -> None:
    """Refuse a ``peft_type`` adapter on ``module``, a wrapper that holds another method's adapters."""
    if module.peft_type != peft_type:
        raise ValueError(f"module {name!r} already holds a {module.peft_type or 'modules_to_save'} adapter; one module "
                         f"cannot take a {peft_type} adapter too. Exclude it with exclude_modules.")


def replace_modules(model: nn.Module, config, adapter_name: str,
                    make_layer: Callable[[nn.Module, str], AdapterLayer], targets: Iterable[str],
                    plain: bool = False) -> list[str]:
    """Wrap each target in a layer from ``make_layer`` (or add the adapter to an existing wrapper). With ``plain``,
    each layer's create_adapter gets the target's plain name (see plain_name), which the config's patterns name."""
    replaced, blocks = [], block_wrappers(model) if plain else set()
    for name in targets:
        parent, child = get_submodule_parent(model, name)
        module = getattr(parent, child)
        if isinstance(module, AdapterLayer):
            refuse_held(module, name, config.peft_type)
            module.create_adapter(adapter_name, config, plain_name(name, blocks))
        else:
            layer = make_layer(module, name)
            layer.train(module.training)  # a new wrapper follows the mode of what it wraps
            layer.create_adapter(adapter_name, config, plain_name(name, blocks))
            setattr(parent, child, layer)
        replaced.append(name)
    return replaced


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, required: bool) -> list[str]:
    """Wrap modules whose names end with any of ``names`` (saved_name_matches: an adapter moves between peftkit and
    PEFT only if both wrap the same) so each adapter trains its own copy."""
    hits, inside = [], _wrapper_prefixes(model)
    for name, module in list(model.named_modules()):
        if not name or name.startswith(inside) or not saved_name_matches(name, names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.create_adapter(adapter_name)
        elif isinstance(module, AdapterLayer):
            raise ValueError(f"module {name!r} is both an adapter target and in modules_to_save; pick one")
        else:
            parent, child = get_submodule_parent(model, name)
            wrapper = ModulesToSaveWrapper(module)
            wrapper.train(module.training)
            wrapper.create_adapter(adapter_name)
            setattr(parent, child, wrapper)
        hits.append(name)
    if required and not hits:
        raise _nearest_error(names, model, field="modules_to_save")
    return hits


def unwrap(model: nn.Module, name: str, merge: bool) -> None:
    """Put a wrapper's original module (or, for a trained head, its copy) back in its place."""
    parent, child = get_submodule_parent(model, name)
    layer = getattr(parent, child)
    setattr(parent, child, layer.unwrapped(merge) if isinstance(layer, ModulesToSaveWrapper) else layer.base_layer)


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of the modules holding it, for parameters held by more than one (tied weights, or one
    module registered under two names)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    return {k: v for k, v in holders.items() if len(v) > 1}


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every wrapper in the model with its name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def every_bias(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's bias="all": every state-dict entry named "bias" (LayerNorms and a trained head's original and copy
    included), minus those inside another adapter's trained copy of a head; by path.

    A layer wrapped only by other adapters is named as if unwrapped ("value.bias", not "value.base_layer.bias"):
    the adapter's keys must not depend on what else the model holds, or it would not reload onto a fresh base.
    (PEFT names it with base_layer there, and then drops it silently on such a load.)
    """
    others = {f"{n}.base_layer.": f"{n}." for n, m in model.named_modules()
              if isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSaveWrapper) and adapter_name not in m.adapter_names}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] != "bias" or _in_other_copy(name, adapter_name):
            continue
        for wrapped, plain in others.items():
            if name.startswith(wrapped):
                name = plain + name[len(wrapped):]
                break
        out[name] = tensor
    return out


def _in_other_copy(name: str, adapter_name: str) -> bool:
    # inside another adapter's trained copy of a head: "classifier.modules_to_save.<other>.bias"
    parts = name.split(".")
    return any(p == "modules_to_save" and parts[i + 1] != adapter_name for i, p in enumerate(parts[:-1]))
