"""Argument checks shared by the Python layers: each names the argument, what was expected
and what it got."""
from __future__ import annotations

import argparse
import numbers
from typing import Any, NoReturn

import numpy as np


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr, ``rnnfuse <command>: error: ...``, exit status 2,
    like every other input error of the commands (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_int(name: str, value: Any, minimum: int) -> int:
    """value as an int >= minimum (bools are refused: True is not a size)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_nonlinearity(value: Any) -> str:
    """An Elman RNN's activation: "tanh" or "relu" (nothing else, not even another case)."""
    if not isinstance(value, str) or value not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {value!r}")
    return value


def make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from None (fresh entropy), an int >= 0 or a Generator (used as is)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError("seed must be None, an int or a numpy.random.Generator, "
                        f"got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def first_line(error: BaseException) -> str:
    """An exception's message, first line only, for a one-line error (its type if empty)."""
    return (str(error).splitlines() or [type(error).__name__])[0]
