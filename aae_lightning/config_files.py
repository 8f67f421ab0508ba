"""Experiment configs that build on another config: a top-level ``extends: BASE.yaml`` key.

jsonargparse applies several ``--config`` files in order, a later one overriding the earlier ones
(a dict key by key; a list of the same length entry by entry, else as a whole; ``callbacks+``
appends), but one config file cannot name another. So before parsing, ``--config EXPERIMENT``
whose file extends ``BASE`` (a path relative to the file; a list for several) becomes
``--config BASE --config <EXPERIMENT without the key>``, through any chain of bases. An experiment
config then says only what makes the experiment.

The model's named collections (``codes``, ``terms``) merge by name across the configs, whether
chained by ``extends`` or given as several ``--config``: jsonargparse would take a later config's
mapping whole, so a config that changes one code would silently drop the others. A later config
changes the entries it names (jsonargparse merges each with the earlier one), keeps the others in
their order, adds new ones at the end and drops those it sets to null; an empty mapping empties
the collection. On the command line ``--model.terms.NAME=null`` drops one the same way (jsonargparse
alone reads the null as a class path).
"""

import re
from pathlib import Path

import yaml

EXTENDS = "extends"
CONFIG_FLAGS = ("--config", "-c")
NAMED_COLLECTIONS = ("codes", "terms")
DROP_FLAG = re.compile(r"--model\.(init_args\.)?(codes|terms)\.(\w+)")


def expand_extends(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` that extends another config replaced by the chain, the
    named collections of each config merged by name with the earlier configs', and each
    ``--model.terms.NAME=null`` (or a code's) made a config that drops the entry."""
    out: list[str] = []
    named: dict[str, dict] = {}  # each collection's entries as the configs so far leave them
    # where in ``out`` the last config that set each collection ends: a drop goes there, so the
    # flags after that config still apply
    ends: dict[str, int] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else None
        drop = DROP_FLAG.fullmatch(flag)
        if drop and value == "null":
            key = drop.group(2)
            at = ends.get(key, 0)
            out[at:at] = ["--config", _merge_named("", _dropping(drop, named, f"{flag}={value}"), named)]
            ends = {k: end + 2 if end > at else end for k, end in ends.items()} | {key: at + 2}
        elif flag in CONFIG_FLAGS and value is not None:
            for config_value, config in _config_chain(value):
                before = dict(named)
                out += ["--config", _merge_named(config_value, config, named)]
                ends |= {key: len(out) for key in named if named[key] is not before.get(key)}
        else:
            out.append(argv[i])
            i += 1
            continue
        i += 1 if eq else 2
    return out


def _dropping(drop: re.Match, named: dict[str, dict], given: str) -> dict:
    """The config that drops the code or term ``--model.{codes,terms}.NAME=null`` names."""
    init_args, key, name = drop.groups()
    if name not in named.get(key, {}):
        have = ", ".join(named.get(key, {})) or "none"
        raise ValueError(f"{given} drops a {key[:-1]} the configs do not have (their {key}: {have})")
    entries = {key: {name: None}}
    return {"model": {"init_args": entries} if init_args else entries}


def _read(value: str):
    """The config a ``--config`` value holds (a file or a YAML string), or None where it holds none:
    a missing or unreadable file, bad YAML: the parser itself says what is wrong with it."""
    try:
        return yaml.safe_load(Path(value).read_text() if _is_file(value) else value)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a YAML string too long for a file name
        return False


def _merge_named(value: str, config, named: dict[str, dict]) -> str:
    """``value`` (holding ``config``) with each named collection it sets completed by the earlier
    configs' entries."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return value
    changed = False
    for holder in (model, model.get("init_args")):
        for key in NAMED_COLLECTIONS:
            entries = holder.get(key) if isinstance(holder, dict) else None
            if not isinstance(entries, dict):
                continue
            earlier = named.get(key, {}) if entries else {}
            # the earlier entries keep their places (the codes' order is the decoder's input order)
            merged = {name: entry for name, entry in (earlier | entries).items() if entry is not None}
            named[key] = merged
            if list(merged.items()) != list(entries.items()):
                holder[key] = merged
                changed = True
    return yaml.safe_dump(config, sort_keys=False) if changed else value


def _config_chain(value: str, extended_by: tuple[Path, ...] = ()) -> list[tuple[str, object]]:
    """The ``--config`` values ``value`` stands for, each with the config it holds (read once):
    itself, or the chain of configs its file extends."""
    path = Path(value)
    config = _read(value)
    if not isinstance(config, dict) or EXTENDS not in config or not _is_file(value):
        return [(value, config)]
    bases = config.pop(EXTENDS)
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{path}: '{EXTENDS}' takes a config file's path (relative to {path.name}) or a list of them, "
                         f"got {bases!r}")
    here = path.resolve()
    if here in extended_by:
        loop = " -> ".join(p.name for p in (*extended_by, here))
        raise ValueError(f"{path}: the configs extend each other in a loop ({loop})")
    chain: list[tuple[str, object]] = []
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ValueError(f"{path} extends {base}, which is not a file (looked for {base_path})")
        chain += _config_chain(str(base_path), (*extended_by, here))
    return chain + ([(yaml.safe_dump(config, sort_keys=False), config)] if config else [])
