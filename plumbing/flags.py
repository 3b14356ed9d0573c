"""The command lines' parser: flags spelled with underscores, hyphenated aliases, and a bad flag
raised as ConfigError (one ``error: ...`` line, exit status 2) instead of argparse's exit."""
from __future__ import annotations

import argparse


class ConfigError(Exception):
    """A bad flag or setting; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser that raises ConfigError instead of printing its usage and exiting."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ConfigError(message)

    def add_flag(self, name: str, *aliases: str, **kwargs):
        """``--name`` (underscores) with its hyphenated alias, ``--na-me``."""
        return self.add_argument(*dict.fromkeys([name, name.replace("_", "-"), *aliases]), **kwargs)

    def add_switch(self, name: str, **kwargs):
        """An on/off flag: ``--name`` and ``--no_name``, each also hyphenated."""
        off = f"--no_{name[2:]}"
        spellings = [name, name.replace("_", "-"), off, off.replace("_", "-"), f"--no-{name[2:]}"]
        return self.add_argument(*dict.fromkeys(spellings), action=_Switch, **kwargs)


class _Switch(argparse.Action):
    """Sets True for a flag's plain spellings and False for its --no_ ones."""

    def __init__(self, option_strings, dest, default=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith(("--no_", "--no-")))


def folder(text: str) -> str:
    """The type of a folder flag: an empty value would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder")
    return text
