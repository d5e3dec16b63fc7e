"""The built-in reward functions on tables of responses and labels, run directly (no processes)."""

from __future__ import annotations

import pytest

from lmmrl_megatron.reward.extract import extract_final_answer, find_boxed_contents
from lmmrl_megatron.reward.functions import LabelParseError, accuracy_reward, answers_match, format_reward
from lmmrl_megatron.reward.query import response_from_query


def think_answer(answer: str) -> str:
    return f"<think>Let me look at the image.</think><answer>{answer}</answer>"


# (response, label, expected accuracy)
ACCURACY_TABLE = [
    # numbers
    (think_answer("3"), "3", 1.0),
    (think_answer("3.0"), "3", 1.0),
    (think_answer(" 3 "), "3", 1.0),
    (think_answer("1,000"), "1000", 1.0),
    (think_answer("4"), "3", 0.0),
    (think_answer("-3"), "3", 0.0),
    (think_answer("30"), "3", 0.0),
    # LaTeX, fractions, roots
    (think_answer("\\frac{1}{2}"), "0.5", 1.0),
    (think_answer("0.5"), "\\frac{1}{2}", 1.0),
    (think_answer("1/2"), "$\\frac{1}{2}$", 1.0),
    (think_answer("\\dfrac{3}{4}"), "3/4", 1.0),
    (think_answer("\\frac{1}{3}"), "\\frac{1}{2}", 0.0),
    (think_answer("2^{1/2}"), "\\sqrt{2}", 1.0),
    (think_answer("(x+1)^2"), "x^2+2x+1", 1.0),
    (think_answer("x = 3"), "3", 1.0),
    (think_answer("\\pi"), "\\pi", 1.0),
    (think_answer("-\\infty"), "\\infty", 0.0),
    # \boxed, inside the answer tag or alone
    (think_answer("The count is \\boxed{7}"), "7", 1.0),
    ("I count them one by one, so the answer is \\boxed{7}.", "7", 1.0),
    ("First \\boxed{7}, checking again: \\boxed{7}", "7", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\boxed{8}", "7", 0.0),
    # intervals and sets
    (think_answer("(1, 2]"), "(1,2]", 1.0),
    (think_answer("\\left(1,2\\right]"), "(1,2]", 1.0),
    (think_answer("(1,2)"), "(1,2]", 0.0),
    (think_answer("[1,2)"), "[1,2]", 0.0),
    (think_answer("\\{2, 1\\}"), "\\{1,2\\}", 1.0),
    # percentages
    (think_answer("50\\%"), "50\\%", 1.0),
    (think_answer("50%"), "50\\%", 1.0),
    (think_answer("0.5"), "50%", 1.0),
    (think_answer("40%"), "50%", 0.0),
    # multiple-choice letters
    (think_answer("B"), "B", 1.0),
    (think_answer("(B)"), "B", 1.0),
    (think_answer("b"), "(B)", 1.0),
    (think_answer("B. 12 apples"), "B", 1.0),
    (think_answer("The answer is (C)"), "C", 1.0),
    (think_answer("\\boxed{D}"), "D.", 1.0),
    (think_answer("\\text{(A)}"), "A", 1.0),
    (think_answer("C"), "B", 0.0),
    (think_answer("a cat"), "A", 0.0),
    # word answers are text, not products of symbols
    (think_answer("Red"), "red", 1.0),
    (think_answer("red."), "red", 1.0),
    (think_answer("\\text{blue}"), "blue", 1.0),
    (think_answer("der"), "red", 0.0),
    (think_answer("dark red"), "red", 0.0),
    # no answer, ambiguous answers, hedging: all 0
    ("<think>it is 3</think>", "3", 0.0),
    ("3", "3", 0.0),
    ("<think>x</think><answer>3", "3", 0.0),
    ("<think>x</think><answer>3</answer><answer>4</answer>", "3", 0.0),
    ("<think>x</think><answer>3</answer><answer>3</answer>", "3", 0.0),
    (think_answer("\\boxed{3} or \\boxed{4}"), "3", 0.0),
    ("\\boxed{3} \\boxed{4}", "3", 0.0),
    (think_answer(""), "3", 0.0),
    (think_answer("3 or 4"), "3", 0.0),
]


@pytest.mark.parametrize(("response", "label", "expected"), ACCURACY_TABLE)
def test_accuracy_table(response: str, label: str, expected: float) -> None:
    assert accuracy_reward(response, label) == expected


def test_accuracy_raises_on_an_unusable_label() -> None:
    with pytest.raises(LabelParseError, match="empty"):
        accuracy_reward(think_answer("3"), "  ")
    with pytest.raises(LabelParseError, match="could not parse"):
        answers_match("3", "$$")


# (response, expected for think_answer, expected for boxed)
FORMAT_TABLE = [
    ("<think>count: 3</think><answer>3</answer>", 1.0, 0.0),
    ("  \n<think>a\nb</think><answer>3</answer>\n", 1.0, 0.0),
    ("<think>x</think><answer>\\boxed{3}</answer>", 1.0, 1.0),
    ("<think>x</think> <answer>3</answer>", 0.0, 0.0),  # LMM-R1: nothing between </think> and <answer>
    ("<think>x</think><answer>3</answer> and more", 0.0, 0.0),
    ("Sure! <think>x</think><answer>3</answer>", 0.0, 0.0),
    ("<answer>3</answer><think>x</think>", 0.0, 0.0),
    ("<think>x</think><answer>3</answer><answer>4</answer>", 0.0, 0.0),
    ("<think>x</think><think>y</think><answer>3</answer>", 0.0, 0.0),
    ("<think>x<answer>3</answer></think>", 0.0, 0.0),
    ("<think>x</think><answer>  </answer>", 0.0, 0.0),
    ("<think>x</think><answer>3", 0.0, 0.0),
    ("The answer is \\boxed{3}.", 0.0, 1.0),
    ("\\boxed{3} and \\boxed{3}", 0.0, 0.0),
    ("\\boxed{}", 0.0, 0.0),
    ("\\boxed{3", 0.0, 0.0),
    ("3", 0.0, 0.0),
]


@pytest.mark.parametrize(("response", "think_answer_score", "boxed_score"), FORMAT_TABLE)
def test_format_table(response: str, think_answer_score: float, boxed_score: float) -> None:
    assert format_reward(response, "think_answer") == think_answer_score
    assert format_reward(response, "boxed") == boxed_score


def test_boxed_contents_balance_nested_braces() -> None:
    assert find_boxed_contents("x \\boxed{\\frac{1}{2}} y \\fbox{a{b}c} \\boxed{open") == ["\\frac{1}{2}", "a{b}c"]
    assert extract_final_answer("<answer>The value is \\boxed{\\frac{1}{2}}</answer>") == "\\frac{1}{2}"


QUERY_TABLE = [
    (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
        "<|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n<think>x</think><answer>3</answer>"
        "<|im_end|><|endoftext|><|endoftext|>",
        "chatml",
        "<think>x</think><answer>3</answer>",
    ),
    (
        # several turns: the response follows the last assistant opener
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n"
        "2+2?<|im_end|>\n<|im_start|>assistant\n\\boxed{4}<|im_end|>",
        "chatml",
        "\\boxed{4}",
    ),
    ("<start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\nA<end_of_turn><pad><pad>", "gemma3", "A"),
    ("User: what?\nAssistant: 42</s>", "base", "42"),
    ("no template at all <|im_end|>", "chatml", "no template at all"),
]


@pytest.mark.parametrize(("query", "template", "expected"), QUERY_TABLE)
def test_response_from_query(query: str, template: str, expected: str) -> None:
    assert response_from_query(query, template) == expected
