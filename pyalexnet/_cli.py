"""What every pyalexnet command line shares: a parser whose errors are one line naming the flag, help that shows
the defaults, and argument types that refuse bad numbers before any work starts."""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where X says nothing: None (the help says
    what happens then), a switch's False, or a help text that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr ("PROG: error: argument --flag: why"), exit code 2,
    with the defaults in --help. Sub-commands get the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in [low, high] (an end excluded where it is open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}"
                                             f"{')' if high_open else ']'}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT, NONNEGATIVE_INT = integer(1), integer(0)
POSITIVE = number(0.0, low_open=True)
NONNEGATIVE = number(0.0)
