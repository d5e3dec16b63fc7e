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
    answer_tag_content,
    extract_final_answer,
    find_boxed_contents,
    is_boxed_format,
    is_think_answer_format,
    open_boxes,
)
from lmmrl_megatron.reward.precheck import expression_problem
from lmmrl_megatron.reward.timelimits import cpu_time_limit

RewardFn = Callable[[str, str, str], float]

# math-verify's own timeouts (signal.alarm, whole seconds of real time) would cancel the worker's timers; they are
# switched off, their "timeout disabled" warning muted, and `cpu_time_limit` bounds each parse and verify instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_MATH_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
# A multiple-choice label: "A", "(B)", "C." or "D:".
_CHOICE_LABEL = re.compile(r"\(?([A-Z])\)?[.:]?")
# Words that may introduce the letter: "The answer is", "Answer:", "the correct option is", "Option", "I choose".
_CHOICE_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\s*,?\s+)?(?:(?:the|my)\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?"
    r"(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*"
    r"|^i\s+(?:would\s+)?(?:choose|pick|select|go\s+with)\s+",
    re.IGNORECASE,
)
# The letter alone: "B", "(B)", "[b]", "{B}"; a lower-case letter only here ("a cat" is not A).
_CHOICE_ALONE = re.compile(r"[(\[{]?\s*([A-Za-z])\s*[)\]}]?")
# The letter, then the option's text: "(B) blue", "[b] blue", "B. 12 apples", "b) x = 3", "B: red", "B is right"
# (a lower-case letter needs its bracket or its ".", ")", ":": "a cat" is not A).
_CHOICE_LEADING = re.compile(
    r"(?:[(\[{]\s*([A-Za-z])\s*[)\]}]|([A-Za-z])[.):]|([A-Z])(?=\s))(.*)", re.DOTALL
)
# A letter standing alone in the option's text: any capital, and the lower-case letters that options use (a-j;
# x, y, n and the like are variables). A letter before "(" is a function (f(x)); see `_is_article` for "A", "I".
_CHOICE_MENTION = re.compile(r"(?<![A-Za-z0-9\\])(?:(?P<capital>[A-Z])|(?P<small>[a-j]))(?![A-Za-z0-9(])")
_NEXT_WORD = re.compile(r"\s+([a-z][a-z']*)")
_JOINER_BEFORE = re.compile(r"(?:\b(?:or|and|nor|either|vs|versus)|[/,;&|+])\s*$")
# Words after which "A" is a letter, not an article: "A is right", "A or C", "A might be".
_LETTER_WORDS = frozenset(
    "is are was were be being has have or and nor also too might may could would should can must will seems seem "
    "looks look".split()
)
_CHOICE_NOISE = re.compile(r"[*`$'\"“”‘’]")
# A word answer ("red", "two circles"): letters and spaces only, so it must be compared as text, not as a product
# of symbols (math-verify would read "red" as r*e*d).
_WORD_LABEL = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")


class LabelParseError(ValueError):
    """The reference answer could not be read as math: a data problem, counted as an error."""


class AnswerRejected(ValueError):
    """The pre-check refused to hand the answer to math-verify (see `precheck.py`): reward 0, counted as rejected."""


def format_reward(response: str, kind: FormatKind) -> float:
    """1.0 when the response has the layout `kind` asks for (see `RewardConfig.format_kind`), else 0.0."""
    if kind == "think_answer":
        return float(is_think_answer_format(response))
    if kind == "boxed":
        return float(is_boxed_format(response))
    raise ValueError(f"unknown format kind {kind!r}; expected 'think_answer' or 'boxed'")


def accuracy_reward(response: str, label: str, math_timeout_s: float | None = None) -> float:
    """1.0 when the response's final answer (see `extract_final_answer`) equals the label, else 0.0.

    Multiple-choice letters and word answers are compared as text; everything else (numbers, LaTeX, fractions,
    intervals, sets, percentages, equations) with math-verify, each parse and the comparison limited to
    `math_timeout_s` seconds of CPU time (None: unlimited; the limit works on the main thread only).

    Raises LabelParseError for an unreadable label, AnswerRejected for an answer too absurd to evaluate, and
    `timelimits.TimeLimitExceeded` when math-verify runs out of time.
    """
    if not isinstance(label, str) or not label.strip():
        raise LabelParseError(f"the label is empty or not a string: {label!r}")
    answer = extract_final_answer(response)
    if answer is None:
        return 0.0
    choice = _CHOICE_LABEL.fullmatch(_strip_math_wrapping(label))
    if choice is not None:
        # A letter is judged on the whole answer tag with its boxes opened, not only on a box inside it, so that
        # "\boxed{A} or B" names two letters as plainly as "A or B" does.
        tagged = answer_tag_content(response)
        return float(choice_letter(open_boxes(tagged) if tagged is not None else answer) == choice.group(1))
    return float(answers_match(answer, label, math_timeout_s))


def answers_match(answer: str, label: str, math_timeout_s: float | None = None) -> bool:
    """Whether an extracted answer and a reference label mean the same thing."""
    gold = _strip_math_wrapping(label)
    predicted = _strip_math_wrapping(answer)
    if _squash(gold) == _squash(predicted):
        return True
    choice = _CHOICE_LABEL.fullmatch(gold)
    if choice is not None:
        return choice_letter(predicted) == choice.group(1)
    if _WORD_LABEL.fullmatch(_unwrap_text(gold)):
        return _normalize_words(_unwrap_text(gold)) == _normalize_words(_unwrap_text(predicted))
    return _math_equal(predicted, gold, math_timeout_s)


def choice_letter(answer: str) -> str | None:
    """The one option letter an answer names, upper-cased; None when it names none, or more than one.

    "B", "(b)", "Answer: B", "The answer is (B).", "B. 12 apples", "\\text{(B)}" name B. "A or B", "A/B", "AB",
    "(A) (B)", "either A or B", "A, B", "Option A or option B" name several; "a cat" names none.
    """
    text = _CHOICE_NOISE.sub("", _unwrap_text(answer)).strip()
    for _ in range(2):  # "Answer: option B"
        text = _CHOICE_PREFIX.sub("", text, count=1).strip()
    text = text.rstrip(" .!;")
    alone = _CHOICE_ALONE.fullmatch(text)
    if alone is not None:
        return alone.group(1).upper()
    leading = _CHOICE_LEADING.match(text)
    if leading is None:
        return None
    letter = (leading.group(1) or leading.group(2) or leading.group(3)).upper()
    rest = leading.group(4)
    for mention in _CHOICE_MENTION.finditer(rest):
        if mention.group().upper() != letter and not _is_article(rest, mention):
            return None
    return letter


def _is_article(text: str, mention: re.Match[str]) -> bool:
    """Whether an "A", "a" or "I" in an option's text is the article or the pronoun before a word ("B. A
    triangle", "B. a cat", "B. I think so"), rather than a letter ("B. A is wrong", "B or A is right")."""
    if mention.group() not in ("A", "a", "I"):
        return False
    following = _NEXT_WORD.match(text, mention.end())
    if following is None or following.group(1) in _LETTER_WORDS:
        return False
    return _JOINER_BEFORE.search(text, 0, mention.start()) is None


def _math_equal(predicted: str, gold: str, math_timeout_s: float | None) -> bool:
    problem = expression_problem(gold)
    if problem is not None:
        raise LabelParseError(f"the label is not checked: {problem}")
    with cpu_time_limit(math_timeout_s, "parsing the label"):
        gold_parsed = parse(f"${gold}$", _MATH_EXTRACTION, parsing_timeout=None, raise_on_error=True)
    if not gold_parsed:
        raise LabelParseError(f"math-verify could not parse the label {gold!r}")
    problem = expression_problem(predicted)
    if problem is not None:
        raise AnswerRejected(f"the answer is not checked: {problem}")
    with cpu_time_limit(math_timeout_s, "parsing the answer"):
        predicted_parsed = parse(f"${predicted}$", _MATH_EXTRACTION, parsing_timeout=None, raise_on_error=True)
    if not predicted_parsed:
        return False
    with cpu_time_limit(math_timeout_s, "comparing the answer with the label"):
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


def builtin_reward_functions(format_kind: FormatKind, math_timeout_s: float | None = None) -> dict[str, RewardFn]:
    """The built-in reward functions under their config names, bound to the configured format kind and the
    CPU-time limit of each math-verify step."""

    def accuracy(response: str, label: str, prompt: str) -> float:
        return accuracy_reward(response, label, math_timeout_s)

    def format_(response: str, label: str, prompt: str) -> float:
        return format_reward(response, format_kind)

    return {"accuracy": accuracy, "format": format_}
