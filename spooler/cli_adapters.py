"""``loraspool`` subcommands for adapters (registered by ``spooler.cli``). Imports stay lazy: no torch at import."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]


def add_parsers(sub: argparse._SubParsersAction, share_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this group's subcommands to ``sub``; ``share_arg`` adds the usual --share option."""


COMMANDS: dict[str, Command] = {}
