"""A cheap look at an answer before math-verify gets it: refuse the ones whose evaluation would not end.

sympy evaluates integer arithmetic eagerly, so `9^{9^{9^{9}}}`, `(10^{10})!` or `\\binom{10^{6}}{5 \\cdot 10^{5}}` make
it compute numbers with billions of digits. `expression_problem` scans the text once, estimates the size (log10) of
every numeric power, factorial and binomial, and names the first absurd one; it also refuses over-long and deeply
nested inputs. It errs on the side of letting answers through: what it misses, the CPU-time limit still stops.
"""

from __future__ import annotations

import math
import re

MAX_MATH_CHARS = 2000
MAX_NESTING = 50
# Refuse results with more digits than this: sympy builds a 10^5-digit integer in well under a second.
MAX_RESULT_DIGITS = 100_000
# A power of a parenthesised expression with symbols, e.g. (x+1)^{1000}: sympy expands it while comparing.
MAX_SYMBOLIC_GROUP_EXPONENT = 200.0

_TOKEN = re.compile(r"\d+(?:\.\d*)?|\\[A-Za-z]+|\*\*|\S")
_OPENERS = {"{": "}", "(": ")", "[": "]"}
_BINOMIALS = ("\\binom", "\\dbinom", "\\tbinom")
_IGNORED = ("\\left", "\\right", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", ",", "\\,", "\\!", "\\;")


class _Absurd(Exception):
    pass


def expression_problem(text: str) -> str | None:
    """Why `text` must not be handed to math-verify, or None when it may be."""
    if len(text) > MAX_MATH_CHARS:
        return f"the answer has {len(text)} characters (more than {MAX_MATH_CHARS})"
    depth = deepest = 0
    for character in text:
        if character in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif character in "})]":
            depth = max(0, depth - 1)
    if deepest > MAX_NESTING:
        return f"the answer nests brackets {deepest} deep (more than {MAX_NESTING})"
    tokens = [token for token in _TOKEN.findall(text) if token not in _IGNORED]
    try:
        _Scanner(tokens).sequence(0, None)
    except _Absurd as error:
        return str(error)
    return None


class _Atom:
    """What the scanner knows of one operand: log10 of its magnitude when numeric, and whether it has symbols."""

    __slots__ = ("log10", "symbolic", "group")

    def __init__(self, log10: float | None, symbolic: bool, group: bool = False) -> None:
        self.log10, self.symbolic, self.group = log10, symbolic, group


class _Scanner:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def sequence(self, position: int, closer: str | None) -> tuple[_Atom, int]:
        """Operands up to `closer`, with `^` and `!` applied; the result stands for the largest of them."""
        tokens = self.tokens
        largest: float | None = None
        symbolic = False
        current: _Atom | None = None
        while position < len(tokens) and tokens[position] != closer:
            token = tokens[position]
            if token in ("^", "**") and current is not None:
                # A chain a^b^c is read as a^(b^c), the larger reading (and Python's, for `**`).
                chain = []
                while position < len(tokens) and tokens[position] in ("^", "**"):
                    operand, position = self.operand(position + 1)
                    chain.append(operand)
                exponent = chain.pop()
                while chain:
                    exponent = _power(chain.pop(), exponent)
                current = _power(current, exponent)
            elif token == "!" and current is not None:
                current = _factorial(current)
                position += 1
            else:
                largest, symbolic = _merge(largest, symbolic, current)
                current, position = self.operand(position)
        largest, symbolic = _merge(largest, symbolic, current)
        return _Atom(largest, symbolic, group=True), position + 1

    def operand(self, position: int) -> tuple[_Atom, int]:
        if position >= len(self.tokens):
            return _Atom(None, False), position
        token = self.tokens[position]
        if token[0].isdigit():
            return _Atom(_literal_log10(token), False), position + 1
        if token in _OPENERS:
            return self.sequence(position + 1, _OPENERS[token])
        if token in _BINOMIALS:
            top, position = self.operand(position + 1)
            bottom, position = self.operand(position)
            if top.log10 is not None and top.log10 > math.log10(MAX_RESULT_DIGITS / math.log10(2)):
                raise _Absurd(f"a binomial coefficient of about 10^{top.log10:.0f} would have too many digits")
            merged, symbolic = _merge(top.log10, top.symbolic, bottom)
            return _Atom(None if merged is None else 10**merged * math.log10(2), symbolic), position
        # A letter is a symbol; a command (\frac, \cdot, \sqrt, \pi) or an operator is read past.
        return _Atom(None, token[0].isalpha()), position + 1


def _merge(largest: float | None, symbolic: bool, atom: _Atom | None) -> tuple[float | None, bool]:
    if atom is None:
        return largest, symbolic
    if atom.log10 is not None:
        largest = atom.log10 if largest is None else max(largest, atom.log10)
    return largest, symbolic or atom.symbolic


def _literal_log10(token: str) -> float:
    digits = token.split(".")[0].lstrip("0")
    if len(digits) <= 15:
        value = float(token)
        return math.log10(value) if value > 1 else 0.0
    return len(digits) - 1 + math.log10(float(digits[:15]) / 1e14)


def _value(log10: float) -> float:
    return math.inf if log10 > 300 else 10.0**log10


def _power(base: _Atom, exponent: _Atom) -> _Atom:
    if exponent.log10 is None:
        return _Atom(None, True)
    exponent_value = _value(exponent.log10)
    if base.symbolic:
        if base.group and exponent_value > MAX_SYMBOLIC_GROUP_EXPONENT:
            raise _Absurd(f"a bracketed expression with symbols raised to about 10^{exponent.log10:.0f}")
        return _Atom(None, True)
    if base.log10 is None or base.log10 <= 0:
        return _Atom(0.0, False)  # 0, 1 or a fraction below 1: the power stays small
    digits = exponent_value * base.log10
    if digits > MAX_RESULT_DIGITS:
        if math.isinf(digits):
            raise _Absurd("a power tower whose value has more digits than can be written")
        raise _Absurd(f"a power whose value would have about 10^{math.log10(digits):.0f} digits")
    return _Atom(digits, False)


def _factorial(operand: _Atom) -> _Atom:
    if operand.log10 is None:
        return _Atom(None, True)
    n = _value(operand.log10)
    digits = math.lgamma(n + 1) / math.log(10) if n < math.inf else math.inf
    if digits > MAX_RESULT_DIGITS:
        raise _Absurd(f"a factorial of about 10^{operand.log10:.0f} would have too many digits")
    return _Atom(digits, False)
