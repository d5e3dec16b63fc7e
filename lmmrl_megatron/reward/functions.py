"""The built-in reward functions: answer accuracy (checked with math-verify) and response format.

Every reward function has the signature `fn(response: str, label: str, prompt: str) -> float`. They run inside
verifier processes (see `pool.py`); they may raise, and the pool turns an exception into reward 0 and a count.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from lmmrl_megatron.reward.config import FormatKind
from lmmrl_megatron.reward.extract import (
    extract_final_answer,
    find_boxed_contents,
    is_boxed_format,
    is_think_answer_format,
)

RewardFn = Callable[[str, str, str], float]

# math-verify's own timeouts use SIGALRM, which cannot interrupt a big-integer power running in C; the verifier
# pool kills the whole process instead, so they are switched off and their "timeout disabled" warning muted.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_MATH_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
# A multiple-choice label: "A", "(B)", "C." or "D:".
_CHOICE_LABEL = re.compile(r"\(?([A-Z])\)?[.:]?")
_CHOICE_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*", re.IGNORECASE)
_CHOICE_ALONE = re.compile(r"\(?([A-Za-z])\)?\.?")
_CHOICE_LEADING = re.compile(r"\(?([A-Z])\)?(?:$|[\s.:,)])")
# A word answer ("red", "two circles"): letters and spaces only, so it must be compared as text, not as a product
# of symbols (math-verify would read "red" as r*e*d).
_WORD_LABEL = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


class LabelParseError(ValueError):
    """The reference answer could not be read as math: a data problem, counted as an error."""


def format_reward(response: str, kind: FormatKind) -> float:
    """1.0 when the response has the layout `kind` asks for (see `RewardConfig.format_kind`), else 0.0."""
    if kind == "think_answer":
        return float(is_think_answer_format(response))
    if kind == "boxed":
        return float(is_boxed_format(response))
    raise ValueError(f"unknown format kind {kind!r}; expected 'think_answer' or 'boxed'")


def accuracy_reward(response: str, label: str) -> float:
    """1.0 when the response's final answer (see `extract_final_answer`) equals the label, else 0.0.

    Multiple-choice letters and word answers are compared as text; everything else (numbers, LaTeX, fractions,
    intervals, sets, percentages, equations) with math-verify. Raises LabelParseError for an unreadable label.
    """
    if not isinstance(label, str) or not label.strip():
        raise LabelParseError(f"the label is empty or not a string: {label!r}")
    answer = extract_final_answer(response)
    if answer is None:
        return 0.0
    return float(answers_match(answer, label))


def answers_match(answer: str, label: str) -> bool:
    """Whether an extracted answer and a reference label mean the same thing."""
    gold = _strip_math_wrapping(label)
    predicted = _strip_math_wrapping(answer)
    if _squash(gold) == _squash(predicted):
        return True
    choice = _CHOICE_LABEL.fullmatch(gold)
    if choice is not None:
        return _choice_letter(predicted) == choice.group(1)
    if _WORD_LABEL.fullmatch(_unwrap_text(gold)):
        return _normalize_words(_unwrap_text(gold)) == _normalize_words(_unwrap_text(predicted))
    return _math_equal(predicted, gold)


def _math_equal(predicted: str, gold: str) -> bool:
    gold_parsed = parse(f"${gold}$", _MATH_EXTRACTION, parsing_timeout=None, raise_on_error=True)
    if not gold_parsed:
        raise LabelParseError(f"math-verify could not parse the label {gold!r}")
    predicted_parsed = parse(f"${predicted}$", _MATH_EXTRACTION, parsing_timeout=None, raise_on_error=True)
    if not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=None, raise_on_error=True)


def _strip_math_wrapping(text: str) -> str:
    """Drop `$...$` / `\\(...\\)` / `\\[...\\]` delimiters, a `\\boxed{}` around the whole thing, a final period."""
    text = text.strip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) > len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            text = text[len(opening) : -len(closing)].strip()
            break
    boxed = find_boxed_contents(text)
    if len(boxed) == 1 and text.startswith(("\\boxed", "\\fbox")) and text.endswith("}"):
        text = boxed[0].strip()
    return text.removesuffix(".").strip()


def _unwrap_text(text: str) -> str:
    return _TEXT_COMMAND.sub(lambda match: match.group(1), text).strip()


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _normalize_words(text: str) -> str:
    return " ".join(text.casefold().replace("-", " ").strip(" .!'\"").split())


def _choice_letter(answer: str) -> str | None:
    # "B", "(b)", "Answer: B", "B. 5 cm", "(C) blue"; a lower-case letter only when it stands alone ("a cat" is not A).
    text = _CHOICE_PREFIX.sub("", _unwrap_text(answer))
    alone = _CHOICE_ALONE.fullmatch(text)
    if alone is not None:
        return alone.group(1).upper()
    leading = _CHOICE_LEADING.match(text)
    return leading.group(1) if leading is not None else None


def builtin_reward_functions(format_kind: FormatKind) -> dict[str, RewardFn]:
    """The built-in reward functions under their config names, bound to the configured format kind."""

    def accuracy(response: str, label: str, prompt: str) -> float:
        return accuracy_reward(response, label)

    def format_(response: str, label: str, prompt: str) -> float:
        return format_reward(response, format_kind)

    return {"accuracy": accuracy, "format": format_}
