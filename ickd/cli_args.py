"""Small argparse helpers shared by the ``ickd`` command groups (no platform imports here).

Global options (``--root``, ``--studies-root``, ``--profile`` ...) must work before *or* after the verb:
``ickd jobs --root X status L`` and ``ickd jobs status L --root X``. argparse only knows an option in
the parser that defines it, so :func:`add_global` adds it to the group's parser (with the real default)
and to every subcommand's parser with ``default=argparse.SUPPRESS``: a subparser then sets the value
only when the option was given after the verb, and never overwrites one given before it.
"""
from __future__ import annotations

import argparse
from typing import Any


def add_global(parser: argparse.ArgumentParser, subparsers: Any, *names: str, only: tuple[str, ...] | None = None, **kwargs: Any) -> None:
    """Add option ``names`` to ``parser`` and to each parser of the ``subparsers`` action (``only``: to
    those verbs). ``required=True`` is checked by :func:`require`, since either place may give it."""
    kwargs.pop("required", None)
    parser.add_argument(*names, **kwargs)
    sub_kwargs = {**kwargs, "default": argparse.SUPPRESS}
    for verb, sub in subparsers.choices.items():
        if only is None or verb in only:
            sub.add_argument(*names, **sub_kwargs)


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, flag: str) -> None:
    """argparse's 'the following arguments are required' for a global option (exit 2)."""
    if getattr(args, dest, None) is None:
        parser.error(f"the following arguments are required: {flag}")


def walk_parsers(parser: argparse.ArgumentParser, name: str | None = None):
    """``(name, parser)`` for ``parser`` and every subcommand parser below it (for help checks)."""
    yield name or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from walk_parsers(sub, f"{name or parser.prog} {verb}")
