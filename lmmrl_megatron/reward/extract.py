"""Finding the parts of a model response that rewards look at: the `<answer>` tag, `\\boxed{...}`, the tags' layout."""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_ANSWER_TAG = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_THINK_THEN_ANSWER = re.compile(
    re.escape(THINK_OPEN) + r".*" + re.escape(THINK_CLOSE) + re.escape(ANSWER_OPEN) + r"(.*)" + re.escape(ANSWER_CLOSE),
    re.DOTALL,
)
_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _boxes(text: str) -> list[tuple[int, int, int]]:
    """(start of the command, start of the contents, end of the box) of every closed box, braces balanced."""
    found: list[tuple[int, int, int]] = []
    for match in _BOXED_COMMAND.finditer(text):
        depth = 1
        position = match.end()
        while position < len(text) and depth > 0:
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
            position += 1
        if depth == 0:
            found.append((match.start(), match.end(), position))
    return found


def find_boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; unclosed ones are dropped."""
    return [text[contents:end - 1] for _, contents, end in _boxes(text)]


def open_boxes(text: str) -> str:
    """`text` with every closed `\\boxed{X}` replaced by X (outermost boxes; nested ones stay inside X)."""
    pieces: list[str] = []
    done = 0
    for start, contents, end in _boxes(text):
        if start < done:
            continue  # a box inside a box already opened
        pieces += [text[done:start], text[contents : end - 1]]
        done = end
    return "".join(pieces) + text[done:]


def answer_tag_content(response: str) -> str | None:
    """The content of the response's one closed `<answer>...</answer>`; None without one, or with several."""
    tagged = _ANSWER_TAG.findall(response)
    return tagged[0] if len(tagged) == 1 else None


def extract_final_answer(response: str) -> str | None:
    """The answer a response commits to, or None when there is none or it is ambiguous.

    An `<answer>...</answer>` tag wins; inside it, or in a response without one, a `\\boxed{...}` narrows the answer.
    Two answer tags, or boxes with different contents, are ambiguous: hedging must not be rewarded.
    """
    tagged = _ANSWER_TAG.findall(response)
    if len(tagged) > 1:
        return None
    if len(tagged) == 1:
        region = tagged[0]
    elif ANSWER_OPEN in response:
        return None  # an opened but never closed answer tag: the response was cut off or malformed
    else:
        region = response
    boxed = {content.strip() for content in find_boxed_contents(region)}
    if len(boxed) > 1:
        return None
    if len(boxed) == 1:
        answer = boxed.pop()
    elif tagged:
        answer = region.strip()
    else:
        return None
    return answer or None


def is_think_answer_format(response: str) -> bool:
    """Exactly one `<think>...</think>` immediately followed by exactly one non-empty `<answer>...</answer>`.

    As in LMM-R1, surrounding whitespace is ignored, nothing may come before `<think>`, between `</think>` and
    `<answer>`, or after `</answer>`. Unlike LMM-R1, a blank answer is not well formed.
    """
    text = response.strip()
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if text.count(tag) != 1:
            return False
    match = _THINK_THEN_ANSWER.fullmatch(text)
    return match is not None and bool(match.group(1).strip())


def is_boxed_format(response: str) -> bool:
    """Exactly one `\\boxed{...}` with a non-blank answer (and no unclosed box)."""
    boxed = find_boxed_contents(response)
    return len(_BOXED_COMMAND.findall(response)) == 1 and len(boxed) == 1 and bool(boxed[0].strip())
