"""The options engine: config dataclasses -> argparse flags, YAML files and did-you-mean hints.

A command's options are the fields of one dataclass; each field's metadata (``option_help``) carries its
help text and, optionally, its choices and its group in ``--help``. This module walks those fields to
build the argparse parser, to read a YAML mapping into the dataclass (every problem collected, each
unknown key with the option it most likely meant) and to write it back. It knows nothing of any
command's options: the schema and its validation live in ``llm_neo.config`` and in the commands.

Spelling: a top-level field ``kd_ratio`` is the flag ``--kd-ratio`` and the YAML key ``kd_ratio``;
a nested field ``lora.r`` is the flag ``--lora.r`` and the YAML key ``r`` under ``lora:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from llm_neo.errors import ConfigError

# The groups of --help, in the order a run needs them (and of config.yaml).
MODELS, DATA, OPTIMISATION, LOSS, LORA, RUN = "models", "data", "optimisation", "loss", "LoRA", "run"
QUANT, LOADING = "quantization", "model loading"
GROUPS = (MODELS, DATA, OPTIMISATION, LOSS, LORA, QUANT, RUN, LOADING)
# No names from other tools: an unknown option is only matched by spelling.
NO_VOCABULARY: Mapping[str, str] = types.MappingProxyType({})


class Effect(enum.Enum):
    """What a change of an option changes, declared where the option is (``option_help(effect=...)``).

    The rules that compare two configs are derived from it: which options may differ when a run is
    resumed (distill), when a comparison is continued (compare), which a sweep sets itself."""

    RESULTS = "results"  # what the run computes: its weights, metrics and scores (the default)
    COST = "cost"  # only the run's time and memory and the by-products it writes (checkpoints, trackers,
    # an export): a resumed run may change them; a comparison, which measures cost, may not
    RUNTIME = "runtime"  # only how the run is carried out: the device, worker processes, logging
    EXISTING = "existing"  # only what becomes of the outputs an earlier run left in the same place
    PLACE = "place"  # where the outputs go: another place is another run
    REPORT = "report"  # only what the report shows (projections, the probes, how memory is measured)
    SCORING = "scoring"  # only the scores, recomputed from the runs' outputs (compare's scoring)


def option_help(
    text: str, *, effect: Effect = Effect.RESULTS, aliases: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    """Field metadata: the help text, what a change of the option changes (``Effect``; by default the
    results), its ``aliases`` (old names a flag and a YAML key still accept: ``--temperature`` for
    ``--kd-temperature``) and optionally ``choices`` (a tuple) and ``group`` (a --help group)."""
    return {"help": text, "effect": effect, "aliases": aliases, **extra}


def option_effect(f: dataclasses.Field[Any]) -> Effect:
    """The declared ``Effect`` of a field (``RESULTS`` where its metadata names none)."""
    effect = f.metadata.get("effect", Effect.RESULTS)
    if not isinstance(effect, Effect):
        raise TypeError(f"{f.name}: effect {effect!r} is not an Effect")
    return effect


def option_aliases(cls: Any, prefix: str = "") -> dict[str, str]:
    """Every alias of the options of ``cls``, dotted, with the option it names: ``{"temperature":
    "kd_temperature"}``."""
    aliases: dict[str, str] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            aliases |= option_aliases(tp, f"{prefix}{f.name}.")
        aliases |= {f"{prefix}{alias}": f"{prefix}{f.name}" for alias in f.metadata.get("aliases", ())}
    return aliases


def canonical_keys(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """A (YAML) mapping of ``cls``'s options with each alias key renamed to its option (``temperature:``
    of a config.yaml written before the rename -> ``kd_temperature:``), to compare it with ``to_dict``."""
    aliases = {alias: option for alias, option in option_aliases(cls).items() if "." not in alias}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(str(key), str(key))
        found = find_option(cls, name)
        inner = unwrap_optional(found[1])[0] if found is not None else None
        nested = dataclasses.is_dataclass(inner) and isinstance(value, dict)
        out[name] = canonical_keys(inner, value) if nested else value
    return out


def options_with(cls: Any, *effects: Effect) -> frozenset[str]:
    """The dotted names of the options of ``cls`` whose declared effect is one of ``effects``."""
    found = ((name, find_option(cls, name)) for name in option_names(cls))
    return frozenset(
        name for name, option in found if option is not None and option_effect(option[0]) in effects
    )


# ------------------------------------------------------------------------------------------------
# The suggestion an unknown option gets.


def suggest_option(cls: Any, name: str, vocabulary: Mapping[str, str]) -> str | None:
    """The option of ``cls`` a user most likely meant by the unknown dotted ``name`` (``lora.rank``,
    ``learning_rate``): its entry in ``vocabulary`` (other tools' names for the options, dotted with "_":
    ``config.ALIASES``), else the closest spelling."""
    key = name.replace("-", "_")
    known = option_names(cls)
    for candidate in (key, key.split(".")[-1]):
        target = vocabulary.get(candidate)
        if target is not None and target in known:
            return target
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return close[0]
    leaf = key.split(".")[-1]  # a nested option given without its section (r for lora.r)
    nested = [o for o in known if o.split(".")[-1] == leaf]
    return nested[0] if len(nested) == 1 else None


def flag_name(option: str) -> str:
    """The flag of a dotted option name: ``lora.lora_alpha`` -> ``--lora.lora-alpha``."""
    return "--" + option.replace("_", "-")


# ------------------------------------------------------------------------------------------------
# The generic machinery: dataclass fields <-> flags <-> YAML.


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def ordered_fields(cls: Any) -> list[dataclasses.Field[Any]]:
    """The fields of a config class in the order of --help, config.yaml and summary.json: by group
    (``GROUPS``; fields without one last), in declaration order within a group."""
    rank = {g: i for i, g in enumerate(GROUPS)}
    return sorted(dataclasses.fields(cls), key=lambda f: rank.get(str(f.metadata.get("group")), len(GROUPS)))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of ``cls`` (recursing into nested dataclasses as ``--section.name``), in the
    argparse group its metadata names.

    Defaults are suppressed so that only flags the user typed override the YAML file.
    """
    hints = get_type_hints(cls)
    groups: dict[str, Any] = {}
    nested_group = parser.add_argument_group(f"{prefix.rstrip('.')} options") if prefix else None
    for f in ordered_fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix=f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        title = f.metadata.get("group")
        group = nested_group or (
            groups.setdefault(title, parser.add_argument_group(f"{title} options")) if title else parser
        )
        default = f.default if f.default is not dataclasses.MISSING else None
        aliases = f.metadata.get("aliases", ())
        help_text = f.metadata.get("help", "")
        if aliases:
            help_text += f" (alias: {', '.join(flag_name(prefix + a) for a in aliases)})"
        if default not in (None, "", False):
            help_text += f" [default: {default}]"
        flag = flag_name(prefix + f.name)
        choices = _choices(f, tp)
        if f.metadata.get("positional"):  # also accepted in order, without its flag: convert IN OUT
            parser.add_argument(
                f"{prefix}{f.name}", nargs="?", default=argparse.SUPPRESS, metavar=f.name.upper(),
                help=f"the same as {flag}",
            )  # fmt: skip
        if tp is bool:
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif choices is not None:
            kind = {"choices": list(choices), "metavar": "{" + ",".join(choices) + "}"}
        elif get_origin(tp) is list:
            kind = {"nargs": "+", "metavar": f.name.upper().removesuffix("S")}
        else:
            kind = {"type": tp, "metavar": f.name.upper()}
        group.add_argument(flag, dest=f"{prefix}{f.name}", default=argparse.SUPPRESS, help=help_text, **kind)
        for alias in aliases:  # its own dest, so that build_config sees both spellings given
            group.add_argument(
                flag_name(prefix + alias),
                dest=prefix + alias,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
                **kind,
            )


def _choices(f: dataclasses.Field[Any], tp: Any) -> tuple[str, ...] | None:
    """A field's choices: declared in its metadata, or the values of a ``Literal`` type."""
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    return tuple(get_args(tp)) if get_origin(tp) is Literal else None


def _coerce(value: Any, tp: Any, choices: tuple[str, ...] | None, where: str, problems: list[str]) -> Any:
    tp, optional = unwrap_optional(tp)
    if value is None:
        if not optional:
            problems.append(f"{where}: null is not allowed here")
        return value
    if choices is not None:
        if value in choices:
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads "2e-4" as a string; accept it the way a user meant it.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    problems.append(f"{where}: {value!r} is not a valid {getattr(tp, '__name__', tp)}")
    return value


def from_dict(
    cls: type,
    data: dict[str, Any],
    *,
    source: str,
    problems: list[str],
    vocabulary: Mapping[str, str] = NO_VOCABULARY,
    prefix: str = "",
    root: Any = None,
) -> Any:
    """Build ``cls`` from a (YAML) mapping; unknown keys and wrong types are appended to ``problems``
    (an unknown key with the option it most likely meant: ``suggest_option`` of the ``root`` config, with
    ``vocabulary``)."""
    hints = get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {alias: f.name for f in names.values() for alias in f.metadata.get("aliases", ())}
    root = root or cls
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}  # option -> the key that gave it
    for key, value in data.items():
        key_norm = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        where = f"{source}: {prefix}{key}"
        if key_norm in given:
            first = given[key_norm]
            problems.append(
                f"{source}: {prefix}{first} and {prefix}{key} are one option ({prefix}{key_norm}); "
                "give it once"
            )
            continue
        given[key_norm] = str(key)
        if key_norm not in names:
            meant = suggest_option(root, f"{prefix}{key_norm}", vocabulary)
            hint = f" (did you mean {meant}?)" if meant else ""
            problems.append(f"{where}: unknown option{hint}")
            continue
        tp, _ = unwrap_optional(hints[key_norm])
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {key_norm} options")
                continue
            kwargs[key_norm] = from_dict(
                tp,  # type: ignore[arg-type]
                value,
                source=source,
                problems=problems,
                vocabulary=vocabulary,
                prefix=f"{prefix}{key_norm}.",
                root=root,
            )
        else:
            kwargs[key_norm] = coerce_option(value, (names[key_norm], hints[key_norm]), where, problems)
    return cls(**kwargs)


Option = tuple[dataclasses.Field[Any], Any]  # a field and its declared type


def find_option(cls: Any, option: str) -> Option | None:
    """The field and declared type of a dotted option of ``cls`` (``lora.r``), or None if it has none."""
    *parents, leaf = option.split(".")
    for part in parents:
        found = find_option(cls, part)
        if found is None or not dataclasses.is_dataclass(inner := unwrap_optional(found[1])[0]):
            return None
        cls = inner
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if leaf not in fields:
        return None
    return fields[leaf], get_type_hints(cls)[leaf]


def option_names(cls: Any, prefix: str = "") -> list[str]:
    """Every leaf option of ``cls`` as a dotted name (``kd_ratio``, ``lora.r``)."""
    names = []
    hints = get_type_hints(cls)
    for f in ordered_fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        names += (
            option_names(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
        )
    return names


def coerce_option(value: Any, option: Option, where: str, problems: list[str]) -> Any:
    """``value`` as the option's type (a problem appended, naming ``where``, when it is not one)."""
    f, tp = option
    return _coerce(value, tp, _choices(f, unwrap_optional(tp)[0]), where, problems)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (what config.yaml and summary.json hold), in the order of
    ``ordered_fields``."""
    return {
        f.name: to_dict(value) if dataclasses.is_dataclass(value := getattr(config, f.name)) else value
        for f in ordered_fields(config)
    }


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice, at any nesting level: PyYAML's own loader
    keeps the last one silently (a second ``teacher:`` line once distilled the student into itself)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *anchor`` merges keys that the mapping's own keys may override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise ConfigError(
                    [
                        f"{self.name} line {line}: duplicate key {key!r} (first given on line "
                        f"{seen[key]}); YAML would keep only the last one: delete one of them"
                    ]
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; ConfigError naming the file (and line) when it is missing, is
    not YAML, is not a mapping, or gives a key twice in one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--config: {str(path)!r} does not exist"])
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            [f"{path}{where}: invalid YAML ({err.__class__.__name__}); fix the syntax"]
        ) from err
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of option: value"])
    return data


def build_config(
    cls: type,
    args: argparse.Namespace,
    config_file: str | None = None,
    *,
    vocabulary: Mapping[str, str] = NO_VOCABULARY,
) -> Any:
    """Merge a YAML file (if any) with the flags the user typed (flags win) into ``cls`` (an unknown YAML
    key named with the option ``vocabulary`` says it most likely meant, as in ``from_dict``)."""
    problems: list[str] = []
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    aliases = option_aliases(cls)
    flags: dict[str, str] = {}  # option -> the dest of the flag that gave it
    for dest, value in vars(args).items():
        if dest in ("command", "config", "func", "quiet", "debug"):
            continue
        option = aliases.get(dest, dest)
        if option in flags:
            problems.append(
                f"{flag_name(flags[option])} and {flag_name(dest)} are one option ({flag_name(option)}); "
                "give it once"
            )
            continue
        flags[option] = dest
        node = data
        *parents, leaf = option.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
            for alias in (a for a, o in aliases.items() if o == option):
                node.pop(alias.split(".")[-1], None)  # a flag wins over the YAML file in either spelling
    source = str(config_file or "command line")
    config = from_dict(cls, data, source=source, problems=problems, vocabulary=vocabulary)
    if problems:
        raise ConfigError(problems)
    return config


def yaml_text(config: Any) -> str:
    """``config`` as YAML text that ``--config`` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
