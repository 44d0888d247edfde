"""ListOps (Nangia & Bowman, 2018; the Long Range Arena's long-range task, here shorter by default): nested MAX, MIN,
MED (lower median) and SM (sum mod 10) over the digits 0-9, written as text; the answer is a digit (10 classes).

    "[MAX 2 9 [MIN 4 7 ] 0 ]"  ->  9

`make_expression(rng, depth, max_length)` draws one expression from a numpy Generator and fits it in `max_length`
characters by construction (each argument gets the room the remaining arguments leave), so no sample is redrawn
and the same generator state gives the same expression. `bixt.data` serves them as the `listops` data set.
"""
from __future__ import annotations

import numpy as np

OPS = {"MAX": max, "MIN": min, "MED": lambda v: sorted(v)[(len(v) - 1) // 2], "SM": lambda v: sum(v) % 10}
MIN_LENGTH = 10  # the shortest expression: "[MAX 1 2 ]"
MAX_ARGS = 5
LEAF = 0.3  # below the top level, the chance that an argument is a digit rather than an expression


def make_expression(rng: np.random.Generator, depth: int, max_length: int) -> tuple[str, int]:
    """A random expression with at most `depth` nested operators and `max_length` characters, and its value."""
    if depth < 1 or max_length < MIN_LENGTH:
        raise ValueError(f"a ListOps expression needs depth >= 1 and max_length >= {MIN_LENGTH}, "
                         f"got depth {depth}, max_length {max_length}")
    return _expression(rng, depth, max_length, top=True)


def _expression(rng: np.random.Generator, depth: int, budget: int, top: bool = False) -> tuple[str, int]:
    if not top and (depth == 0 or budget < MIN_LENGTH or rng.random() < LEAF):
        value = int(rng.integers(10))
        return str(value), value
    op = list(OPS)[int(rng.integers(len(OPS)))]
    room = budget - len(op) - 3  # "[" + op ... + " ]"
    n = min(int(rng.integers(2, MAX_ARGS + 1)), room // 2)  # each argument takes at least " d"
    texts, values = [], []
    for k in range(n):
        text, value = _expression(rng, depth - 1, room - 1 - 2 * (n - k - 1))  # leave " d" for each one after
        texts.append(text)
        values.append(value)
        room -= 1 + len(text)
    return f"[{op} {' '.join(texts)} ]", OPS[op](values)


def solve(text: str) -> int:
    """The value of an expression (an independent reading of the text, used to check the generator)."""
    stack: list[list] = [[]]
    for word in text.split():
        if word.startswith("["):
            stack.append([word[1:]])
        elif word == "]":
            op, *args = stack.pop()
            stack[-1].append(OPS[op](args))
        else:
            stack[-1].append(int(word))
    (value,) = stack[0]
    return value
