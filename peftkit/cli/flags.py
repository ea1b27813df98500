"""Command-line flags generated from the config dataclasses: one source of truth for names, types and help.

Every field of DataConfig and TrainConfig becomes ``--field-name``; every field of every registered
method config becomes one too (a method field whose name another flag already uses gets a ``--peft-``
prefix). Parsed values land in the namespace under ``"<group>.<field>"`` and only when given
(``argparse.SUPPRESS``), so a config file's values survive unless a flag overrides them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import typing
from typing import Any, Callable, Union

from .errors import CliError

# PeftConfig fields the job decides (task type from the data, base path from the model, training mode):
# not flags.
METHOD_FIELDS_SKIPPED = {"task_type", "base_model_name_or_path", "inference_mode"}
METHOD_PREFIX = "peft-"


class FlagCollision(RuntimeError):
    """Two config fields would make the same command-line flag."""


@dataclasses.dataclass
class Flag:
    """One generated flag: where its value goes (group, field) and how it parses."""

    group: str  # "data", "train" or "peft"
    field: str  # the dataclass field name
    option: str  # "--field-name"
    hint: Any  # the resolved annotation
    owners: list[str]  # method names that own it (peft group only)

    @property
    def dest(self) -> str:
        """The namespace key: ``"<group>.<field>"``."""
        return f"{self.group}.{self.field}"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (argparse reports the message as a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give {minimum} or more")
        return value

    return parse


def option_name(field_name: str) -> str:
    """``lora_alpha`` -> ``--lora-alpha``."""
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return hint, False


def parse_bool(text: str) -> bool:
    """'true'/'false' (yes/no, 1/0) as a bool."""
    low = text.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_or_str(text: str) -> Union[bool, str]:
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        return text


def _number(text: str) -> Union[int, float]:
    # "3" -> 3 (a count), "0.5" -> 0.5 (a fraction)
    try:
        return int(text)
    except ValueError:
        return float(text)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"q_proj\": 4}}', got {text!r} ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _nullable(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    # Optional fields accept "none" to reset a config-file value to None
    def parse_or_none(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


def arg_options(hint: Any) -> dict:
    """argparse keyword options (type / nargs / choices / action) for a field annotation."""
    inner, optional = _unwrap_optional(hint)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if inner in (int, float, str):
        return {"type": _nullable(inner) if optional else inner, "metavar": inner.__name__.upper()}
    if origin in (list, tuple, set) or inner in (list, tuple):
        item = args[0] if args and args[0] in (int, float, str) else str
        return {"nargs": "+", "type": item, "metavar": item.__name__.upper()}
    if origin is Union:  # e.g. Union[str, list[str]], Union[int, list[int]], Union[bool, str]
        scalars = [a for a in args if a in (int, float, str, bool)]
        lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if lists:
            item = typing.get_args(lists[0])[0] if typing.get_args(lists[0]) else str
            item = item if item in (int, float, str) else str
            return {"nargs": "+", "type": item, "metavar": item.__name__.upper()}
        if int in scalars and float in scalars:
            return {"type": _number, "metavar": "NUMBER"}
        if bool in scalars and str in scalars:
            return {"type": _bool_or_str, "metavar": "BOOL|STR"}
        if scalars:
            return {"type": scalars[0], "metavar": scalars[0].__name__.upper()}
    if inner is dict or origin is dict:
        return {"type": _json_dict, "metavar": "JSON"}
    return {"type": str, "metavar": "STR"}


REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def to_field_value(hint: Any, value: Any) -> Any:
    """Fit a parsed value to its annotation. For a ``str | list[str]`` field (target_modules) one value stays a
    string only when it is "all-linear" or a regex (the config's str meaning); a plain name becomes a list."""
    inner, _ = _unwrap_optional(hint)
    if typing.get_origin(inner) is Union and str in typing.get_args(inner) and isinstance(value, list) \
            and len(value) == 1 and (value[0] == "all-linear" or REGEX_CHARS.search(value[0])):
        return value[0]
    return value


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (and its bases): trailing ``# ...``, else the comment lines above."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            comment = re.match(r"^\s+#\s?(.*)$", line)
            field = re.match(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$", line)
            if comment:
                above.append(comment.group(1).strip())
            elif field:
                text = field.group(2) or " ".join(above)
                if text:
                    found[field.group(1)] = text.strip()
                above = []
            else:
                above = []
    return found


def field_help(cls: type, field: dataclasses.Field, comments: dict[str, str]) -> str:
    """Help text: the field's metadata["help"], else its source comment; plus the default."""
    text = field.metadata.get("help") or comments.get(field.name, "")
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
    else:
        return text
    return f"{text} (default: {default!r})".strip().replace("%", "%%")


def config_flags(data_cls: type, train_cls: type, method_classes: dict[str, type],
                 reserved: tuple[str, ...] = ()) -> list[Flag]:
    """Every generated flag. A clash is resolved by prefixing the lower-priority field (train > data > method):
    a DataConfig field sharing a TrainConfig name becomes ``--data-<name>``, a method field taken by either
    becomes ``--peft-<name>``; FlagCollision when even the prefixed name is taken (or a reserved option)."""
    flags: dict[str, Flag] = {}
    taken = {opt: "the command's own option" for opt in reserved}
    for group, cls in (("train", train_cls), ("data", data_cls)):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            option = _free_option(taken, field.name, group, cls)
            taken[option] = f"{cls.__name__}.{field.name}"
            flags[option] = Flag(group, field.name, option, hints[field.name], [])
    for method, cls in sorted(method_classes.items()):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in METHOD_FIELDS_SKIPPED:
                continue
            _add_method_flag(flags, taken, method, cls, field.name, hints[field.name])
    return list(flags.values())


def _free_option(taken: dict[str, str], name: str, group: str, cls: type) -> str:
    # --name, else (for a data field clashing with a train field) --data-name; never a reserved option
    option = option_name(name)
    if option not in taken:
        return option
    prefixed = option_name(f"{group}_{name}")
    if group == "data" and not taken[option].startswith("the command") and prefixed not in taken:
        return prefixed
    raise FlagCollision(f"{cls.__name__}.{name} wants {option}, already used by {taken[option]}; rename the field")


def _add_method_flag(flags: dict[str, Flag], taken: dict[str, str], method: str, cls: type,
                     name: str, hint: Any) -> None:
    option = option_name(name)
    shared = flags.get(option) or flags.get(option_name(METHOD_PREFIX + name))
    if shared is not None and shared.group == "peft" and shared.field == name:
        if shared.hint != hint:  # same field name, different meaning: one flag cannot parse both
            raise FlagCollision(f"method field {name!r} is {hint} in {cls.__name__} but {shared.hint} in "
                                f"{shared.owners[0]}'s config; give one a different name")
        shared.owners.append(method)
        return
    if option in taken:
        option = option_name(METHOD_PREFIX + name)
        if option in taken:
            raise FlagCollision(f"{cls.__name__}.{name} collides with {taken[option]} even as {option}; rename one")
    taken[option] = f"{cls.__name__}.{name}"
    flags[option] = Flag("peft", name, option, hint, [method])


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], classes: dict[str, type],
              method_classes: dict[str, type]) -> None:
    """Add the flags to ``parser`` in one argument group per source class, values only when given."""
    groups = {g: parser.add_argument_group(f"{c.__name__} fields ({g})") for g, c in classes.items()}
    groups["peft"] = parser.add_argument_group("method fields (valid only for the methods named in brackets)")
    comments = {name: field_comments(cls) for name, cls in {**classes, **method_classes}.items()}
    for flag in flags:
        cls = classes.get(flag.group) or method_classes[flag.owners[0]]
        field = {f.name: f for f in dataclasses.fields(cls)}[flag.field]
        text = field_help(cls, field, comments[flag.group if flag.group in classes else flag.owners[0]])
        if flag.owners:
            text = f"[{', '.join(o.lower() for o in flag.owners)}] {text}"
        groups[flag.group].add_argument(flag.option, dest=flag.dest, default=argparse.SUPPRESS, help=text,
                                        **arg_options(flag.hint))


def given_values(args: argparse.Namespace, flags: list[Flag]) -> dict[str, dict[str, Any]]:
    """``{"data": {...}, "train": {...}, "peft": {...}}`` of the flags actually given."""
    out: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "peft": {}}
    by_dest = {f.dest: f for f in flags}
    for dest, value in vars(args).items():
        if dest in by_dest:
            flag = by_dest[dest]
            out[flag.group][flag.field] = to_field_value(flag.hint, value)
    return out


def check_method_flags(method: str, peft_values: dict[str, Any], flags: list[Flag],
                       method_classes: dict[str, type]) -> None:
    """Refuse method flags that the chosen method does not have, listing the ones it does."""
    key = method.upper()
    own = [f for f in flags if f.group == "peft" and key in f.owners]
    wrong = sorted(name for name in peft_values if name not in {f.field for f in own})
    if not wrong:
        return
    by_field = {f.field: f.option for f in flags if f.group == "peft"}
    if key not in method_classes:
        raise CliError(f"{', '.join(by_field[w] for w in wrong)} set a PEFT method field, but --method is "
                         f"{method!r}, which has none; choose a method from {sorted(m.lower() for m in method_classes)}")
    raise CliError(f"{', '.join(by_field[w] for w in wrong)} {'is' if len(wrong) == 1 else 'are'} not a field of "
                     f"method {method!r}; its fields are: {' '.join(f.option for f in own)}")


def method_classes_from_registry() -> dict[str, type]:
    """``{peft_type: config class}`` of every registered method."""
    import importlib

    importlib.import_module("peftkit.methods")  # registers every method
    from ..config import lookup, registered_types

    return {name: lookup(name)[0] for name in registered_types()}

