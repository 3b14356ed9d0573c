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
