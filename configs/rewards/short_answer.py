"""A reward for the synthetic image tasks of the embedded default (a user reward function, as users write them).

    reward.functions: [{name: configs/rewards/short_answer.py:commits_to_label, weight: 1.0}]

The synthetic tasks have a tiny answer space (1-4, three colours, three shapes). A freshly initialised tiny model
never writes `\\boxed{3}`, so the strict math-verify reward would stay at 0 and nothing could be learned in a few
minutes; this one pays 1 when the response names exactly one candidate answer and it is the label, so hedging
("1 2 3 4") earns nothing and a model that does not look at the image is held to chance.
"""

from __future__ import annotations

import re

CANDIDATES = ("1", "2", "3", "4", "red", "green", "blue", "circle", "square", "triangle")
_WORD = re.compile(r"[A-Za-z]+|\d")


def commits_to_label(response: str, label: str, prompt: str) -> float:
    named = {word.lower() for word in _WORD.findall(response) if word.lower() in CANDIDATES}
    return 1.0 if named == {label.strip().lower()} else 0.0
