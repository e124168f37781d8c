"""`--help` for every entry point: each config key with its type, default and meaning, from the tree."""
from __future__ import annotations

import argparse
import dataclasses
import json

from fastpipe.config.load import _describe, walk
from fastpipe.config.tree import _plain


def key_help() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every config key, from the dataclasses' annotations and knobs."""
    rows = []
    for key, f, kind in walk():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "the backend's" if default is None else json.dumps(_plain(default)).replace(": ", " = ")
        rows.append((key, _describe(kind), shown, f.metadata.get("help", "")))
    return rows


def help_text() -> str:
    """Every key as `--section.key=VALUE`, for --help."""
    lines = ["config keys (set any as --section.key=VALUE; defaults before config files):"]
    for key, kind, default, meaning in key_help():
        lines.append(f"  {key:<28} {kind:<36} default {default}")
        if meaning:
            lines.append(f"  {'':<28} {meaning}")
    return "\n".join(lines)


def argument_parser(prog: str, description: str, example: str):
    """An argparse parser whose --help ends with every config key (all entry points take overrides)."""
    return argparse.ArgumentParser(prog=prog, description=f"{description} Any config key can be set as "
                                   f"--section.key=value.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=f"{help_text()}\n\nexample: {example}")
