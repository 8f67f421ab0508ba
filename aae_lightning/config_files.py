"""Experiment configs that build on another config: a top-level ``extends: BASE.yaml`` key.

jsonargparse applies several ``--config`` files in order, a later one overriding the earlier ones
(a dict key by key; a list of the same length entry by entry, else as a whole; ``callbacks+``
appends), but one config file cannot name another. So before parsing, ``--config EXPERIMENT``
whose file extends ``BASE`` (a path relative to the file; a list for several) becomes
``--config BASE --config <EXPERIMENT without the key>``, through any chain of bases. An experiment
config then says only what makes the experiment.
"""

from pathlib import Path

import yaml

EXTENDS = "extends"
CONFIG_FLAGS = ("--config", "-c")


def expand_extends(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` that extends another config replaced by the chain."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_FLAGS and eq:
            out += _config_chain(value)
        elif arg in CONFIG_FLAGS:
            value = next(args, None)
            out += [arg] if value is None else _config_chain(value)
        else:
            out.append(arg)
    return out


def _config_chain(value: str, extended_by: tuple[Path, ...] = ()) -> list[str]:
    path = Path(value)
    # a YAML string, a missing or unreadable file: the parser itself says what is wrong with it
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict) or EXTENDS not in config:
        return ["--config", value]
    bases = config.pop(EXTENDS)
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{path}: '{EXTENDS}' takes a config file's path (relative to {path.name}) or a list of them, "
                         f"got {bases!r}")
    here = path.resolve()
    if here in extended_by:
        loop = " -> ".join(p.name for p in (*extended_by, here))
        raise ValueError(f"{path}: the configs extend each other in a loop ({loop})")
    chain: list[str] = []
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ValueError(f"{path} extends {base}, which is not a file (looked for {base_path})")
        chain += _config_chain(str(base_path), (*extended_by, here))
    return chain + (["--config", yaml.safe_dump(config, sort_keys=False)] if config else [])
