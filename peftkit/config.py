"""Adapter configurations: one dataclass per method, JSON I/O in Hugging Face PEFT's format.

The registry maps a ``peft_type`` string to its config class and its method object. Method files
register themselves; the core never imports a method.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from .fieldtypes import check_types

logger = logging.getLogger("peftkit")

CONFIG_NAME = "adapter_config.json"
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Keys other PEFT versions write that carry no meaning for us: dropped on read. PEFT writes
# megatron_core and qalora_group_size always; they only matter with megatron_config / use_qalora.
# ensure_weight_tying only matters for adapters on tied embeddings, which then fail to load with an error naming it
_INFORMATIONAL_KEYS = {"peft_version", "auto_mapping", "revision", "megatron_core", "qalora_group_size",
                       "ensure_weight_tying"}
# Keys of features we do not implement, with the value that means "feature off". An adapter that
# turns one on is refused rather than silently loaded wrong.
_UNSUPPORTED_FEATURES = {
    "lora_bias": False, "use_qalora": False, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "megatron_config": None,
    "use_bdlora": None, "arrow_config": None,
    # LoRA variants PEFT switches on with a config object (even an empty one, {}: its defaults)
    "kasa_config": None, "velora_config": None, "monteclora_config": None,
}

_REGISTRY: dict[str, tuple[type, Any]] = {}


def register(peft_type: str, config_cls: type, method: Any) -> None:
    """Register a method: ``peft_type`` -> (config class, method object)."""
    config_cls.peft_type = peft_type
    _guard_init(config_cls)
    _REGISTRY[peft_type] = (config_cls, method)


def _guard_init(config_cls: type) -> None:
    """Make ``config_cls(...)`` read PEFT-only keyword arguments as its adapter_config.json would be read: a PEFT
    feature left off (``lora_bias=False``, ``revision=None``) is dropped, one switched on is refused naming it, and any
    other unknown name is a TypeError naming the nearest field (a typo), where the dataclass's own error names
    neither the cause nor the fix. Keyword arguments the config has go through untouched."""
    init = config_cls.__init__  # its own, or (a subclass without one) the guarded one it inherits
    if getattr(init, "_peftkit_guarded", False):
        return
    names = frozenset(f.name for f in dataclasses.fields(config_cls) if f.init)

    @functools.wraps(init)
    def guarded(self, *args, **kwargs):
        foreign = {key: kwargs.pop(key) for key in [key for key in kwargs if key not in names]}
        for key, value in foreign.items():
            _check_foreign_field(type(self), key, value, names)
        init(self, *args, **kwargs)

    guarded._peftkit_guarded = True
    config_cls.__init__ = guarded


def peft_only_field(key: str) -> bool:
    """Whether ``key`` is a field of PEFT's configs that peftkit's lack (read past when off, refused when on)."""
    return key in _UNSUPPORTED_FEATURES or key in _INIT_METHOD_FIELDS or key in _INFORMATIONAL_KEYS or key in (
        "peft_type", "revision")


def _check_foreign_field(config_cls: type, key: str, value: Any, names: frozenset) -> None:
    """Accept (drop) or refuse the keyword argument ``key`` that ``config_cls`` has no field for (_guard_init)."""
    where = f"{config_cls.__name__}({key}={value!r})"
    if key == "peft_type":  # PEFT's configs take it and then overwrite it with their own
        if str(getattr(value, "value", value)) != config_cls.peft_type:
            raise ValueError(f"{where}: a {config_cls.__name__} is peft_type {config_cls.peft_type!r}; drop the "
                             "argument, or use the config class of the method you mean")
    elif key == "revision":
        _unused_revision(value)
    elif key in _UNSUPPORTED_FEATURES or key in _INIT_METHOD_FIELDS:
        if key in _UNSUPPORTED_FEATURES:
            off = not _switched_on(key, value)
        else:  # PEFT's default runtime_config is an object with its one switch off (a dict in its to_dict())
            switch = value.get("ephemeral_gpu_offload", False) if isinstance(value, dict) else getattr(
                value, "ephemeral_gpu_offload", True)
            off = value in (None, {}) or (key == "runtime_config" and not switch)
        if not off:
            raise ValueError(f"{where} turns on a Hugging Face PEFT feature that peftkit does not support; remove "
                             "the argument (peftkit trains the adapter without it), or use PEFT for this adapter")
    elif key == "ensure_weight_tying" and value:  # a loaded config with it loads, unless it matters (persist._fill)
        raise ValueError(f"{where}: peftkit does not tie the adapters of tied weights; remove the argument (adapters on "
                         "a tied embedding and output head then train separately, as in PEFT by default)")
    elif key not in _INFORMATIONAL_KEYS:
        near = difflib.get_close_matches(key, sorted(names), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise TypeError(f"{config_cls.__name__} has no field {key!r}; {hint}its fields are {sorted(names)}")


def registered_types() -> list[str]:
    """The peft_type of every registered method."""
    return sorted(_REGISTRY)


def lookup(peft_type: str) -> tuple[type, Any]:
    """(config class, method) for ``peft_type``; a clear error for an unknown one."""
    if peft_type not in _REGISTRY:
        raise ValueError(
            f"unknown peft_type {peft_type!r}; peftkit supports {registered_types()}. "
            "Check the 'peft_type' field of adapter_config.json."
        )
    return _REGISTRY[peft_type]


# PEFT's LoRA fields for initialisations peftkit lacks (its init_lora_weights refuses "loftq", "eva", "corda", ...):
# read past in an adapter_config.json, where PEFT writes their off values; refused when set in Python (_guard_init)
_INIT_METHOD_FIELDS = {"loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config"}


def _switched_on(key: str, value: Any) -> bool:
    """Whether ``value`` turns on the unsupported PEFT feature ``key`` (a key of _UNSUPPORTED_FEATURES)."""
    if key.endswith("_config"):
        return value is not None
    return value not in (_UNSUPPORTED_FEATURES[key], None, {}, [], False)


def _unused_revision(value: Any) -> None:
    """PEFT loads the base model at a config's ``revision`` of a hub repository; peftkit loads bases from local
    paths only, so a revision set is said to be unused (an adapter_config.json may record one: it still loads)."""
    if value is not None:
        logger.warning("the adapter config's revision=%r is not used: peftkit loads the base model from a local path "
                       "(load it at that revision yourself)", value)


def _drop_unknown(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    kept, ignored = {}, []
    for key, value in data.items():
        if key in names:
            kept[key] = value
        elif key == "revision":
            _unused_revision(value)
        elif key in _UNSUPPORTED_FEATURES and _switched_on(key, value):
            raise ValueError(
                f"this adapter sets {key}={value!r}, a feature peftkit does not support; "
                "retrain the adapter without it or load it with the library that wrote it"
            )
        elif key not in _INFORMATIONAL_KEYS and key not in _UNSUPPORTED_FEATURES and value not in (None, {}, [], False):
            ignored.append(key)
    if ignored:
        logger.warning("ignoring adapter config fields peftkit does not know: %s", sorted(ignored))
    return kept


def saved_module_names(names) -> Optional[list[str]]:
    """modules_to_save as a list, refusing an empty name: names match as plain suffixes, so "" would take every module."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"modules_to_save {names!r} holds an empty name (or one that is not text); name modules like "
                         "'classifier' or 'model.norm'")
    return names


@dataclass
class PeftConfig:
    """Fields every method shares."""

    peft_type: ClassVar[str] = ""
    task_type: Optional[str] = None  # one of TASK_TYPES; decides e.g. which head is saved
    base_model_name_or_path: Optional[str] = None  # where AutoPeftModel* loads the base from
    inference_mode: bool = False  # True: adapter weights load frozen

    def __post_init__(self) -> None:
        check_types(self)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type {self.task_type!r} is not one of {TASK_TYPES}")

    def to_dict(self) -> dict:
        """JSON-ready dict in PEFT's field names, including ``peft_type``."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PeftConfig":
        """Build the right subclass from a dict holding ``peft_type``."""
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.peft_type
        if not peft_type:
            raise ValueError("adapter config has no 'peft_type'; cannot tell which method wrote it")
        config_cls, _ = lookup(peft_type)
        config = config_cls(**_drop_unknown(config_cls, data))
        if data.get("ensure_weight_tying"):  # dropped (not implemented): marked for a clearer load error (persist._fill)
            config._ensure_weight_tying = True
        return config

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], subfolder: Optional[str] = None) -> "PeftConfig":
        """Read ``adapter_config.json`` from a local adapter directory."""
        directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
        file = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(file):
            hint = "the directory does not exist" if not os.path.isdir(directory) else f"it has no {CONFIG_NAME}"
            inside = sorted(e for e in os.listdir(directory) if os.path.isfile(os.path.join(directory, e, CONFIG_NAME))
                            ) if os.path.isdir(directory) else []
            if inside:  # adapters other than "default" are saved in a subfolder of their name
                hint += (f", but its subfolders {inside} hold adapters (save_pretrained puts an adapter not named "
                         f"'default' in a subfolder of its name): pass subfolder={inside[0]!r}")
            raise FileNotFoundError(
                f"cannot load an adapter from {directory!r}: {hint}." + ("" if inside else " Pass the directory that "
                "save_pretrained wrote (peftkit reads local directories only, never a hub).")
            )
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupt, re-save the adapter") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object of config fields; the file is "
                             "corrupt, re-save the adapter")
        config = cls.from_dict(data)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise TypeError(f"{file} holds a {type(config).__name__}, not a {cls.__name__}")
        return config

    def to_json(self, extra: Optional[dict] = None) -> str:
        """The text of ``adapter_config.json``; ``extra``: fields written beside the config's own (PEFT's
        auto_mapping), which loading reads past."""
        return json.dumps({**self.to_dict(), **(extra or {})}, indent=2, sort_keys=True)

    def save_pretrained(self, directory: str) -> None:
        """Write ``adapter_config.json`` atomically."""
        from .checkpoint import atomic_write_text

        atomic_write_text(os.path.join(directory, CONFIG_NAME), self.to_json())


def as_config(config: Any) -> PeftConfig:
    """``config`` as peftkit's config: itself, or, for a Hugging Face PEFT config object (imports mixed: peft's
    LoraConfig given to peftkit), the config its ``to_dict()`` describes, read as an adapter_config.json is (fields
    peftkit does not support refused). Anything else is refused."""
    if isinstance(config, PeftConfig):
        return config
    if callable(getattr(config, "to_dict", None)) and getattr(config, "peft_type", None) is not None:
        return PeftConfig.from_dict(config.to_dict())
    raise TypeError(f"the adapter config must be a peftkit config such as peftkit.LoraConfig(r=8, ...), not a "
                    f"{type(config).__name__}; a dict of adapter_config.json fields goes through "
                    "peftkit.PeftConfig.from_dict(d)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


TargetSpec = Optional[Union[str, list[str]]]
AUTO_CRITERIA = ("fisher", "grad", "sensitivity", "magnitude")  # importance scores for target_modules="auto"
AUTO_DEFAULTS = {"auto_criterion": "fisher", "auto_budget": 0.5}


@dataclass
class TargetedConfig(PeftConfig):
    """Fields of the methods that swap modules in by name (LoRA, IA3, bottleneck adapters)."""

    target_modules: TargetSpec = None  # names / dotted suffixes, a full-match regex, or "all-linear"
    exclude_modules: TargetSpec = None  # same syntax; wins over target_modules
    layers_to_transform: Optional[Union[int, list[int]]] = None  # only these layer indices
    layers_pattern: Optional[Union[str, list[str]]] = None  # name of the layer list, e.g. "layers"
    modules_to_save: Optional[list[str]] = None  # modules trained in full and saved, e.g. a new head
    # target_modules="auto": rank the linear layers by mean importance on calibration_batches and keep the top
    # auto_budget (a fraction of them, or an int count); the chosen full names then replace "auto"
    auto_criterion: Optional[str] = None  # one of AUTO_CRITERIA; "fisher" when "auto" leaves it unset
    auto_budget: Optional[Union[float, int]] = None  # fraction in (0, 1] or count >= 1; 0.5 when unset

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_auto()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be a list of names or a regex string, got {type(value).__name__}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern == "":  # PEFT reads an empty pattern as none given: any "<name>.<n>." block
            self.layers_pattern = None
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only takes effect with layers_to_transform; set both or neither")
        self.modules_to_save = saved_module_names(self.modules_to_save)

    def _check_auto(self) -> None:
        if self.target_modules == "auto":
            for name, default in AUTO_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        if self.auto_criterion is not None and self.auto_criterion not in AUTO_CRITERIA:
            raise ValueError(f"auto_criterion must be one of {AUTO_CRITERIA}, got {self.auto_criterion!r}")
        budget = self.auto_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or (isinstance(budget, float) and not 0 < budget <= 1)
                                   or (isinstance(budget, int) and budget < 1)):
            raise ValueError(f"auto_budget must be a fraction in (0, 1] of the candidate modules or an integer "
                             f"count >= 1, got {budget!r}")

    def to_dict(self) -> dict:
        """As PeftConfig.to_dict, with the auto_* fields only while target_modules is still "auto".

        Resolved, the chosen names are the whole record: the adapter reloads without data, and PEFT (which has
        no auto_* fields and warns about unknown ones) loads it silently.
        """
        data = super().to_dict()
        for name in AUTO_DEFAULTS:
            if data[name] is None or data.get("target_modules") != "auto":
                del data[name]
        return data
