"""The built-in reward functions on tables of responses and labels, run directly (no processes)."""

from __future__ import annotations

import itertools

import pytest

from lmmrl_megatron.reward.extract import extract_final_answer, find_boxed_contents, open_boxes
from lmmrl_megatron.reward.functions import (
    AnswerRejected,
    LabelParseError,
    accuracy_reward,
    answers_match,
    choice_letter,
    format_reward,
)
from lmmrl_megatron.reward.precheck import expression_problem
from lmmrl_megatron.reward.query import response_from_query
from lmmrl_megatron.reward.timelimits import TimeLimitExceeded


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


# Answers that name more than one option, in the spellings a policy finds: with label A (and A among the letters
# named), every one must score 0.
HEDGES = [
    # separators
    "A or B", "A, B", "A,B", "A;B", "A/B", "A|B", "A & B", "A+B", "A-B", "A–D", "A\nB", "A\n\nB", "A B", "A:B",
    "A.B", "A>B", "A=B", "A，B", "A、B", "A 或 B", "A, B, C or D", "A/B/C/D", "A or/and B", "A and/or B",
    # letters run together
    "AB", "ABCD", "ACD",
    # words
    "A and C", "either A or B", "Either A or B", "Both A and B", "A and B are correct", "A or maybe B",
    "A (or B)", "A to D", "A through D", "A, not B", "not B, so A", "The answer is A or B.", "Answer: A, B",
    "Option A or option B", "option A or B", "I choose A or B",
    # parentheses and brackets
    "(A) (B)", "(A)(B)", "(A)/(B)", "(A) or (B)", "The answer is (A) or (B)", "[A] [B]", "A (B)", "A) B)",
    "A) or B)", "A. or B.", "{A,B}", "\\{A, B\\}",
    # option texts listed side by side
    "A. 5 B. 6", "(A) 5 (B) 6", "A. blue, B. red", "A.\nB.",
    # lower case
    "a, b", "a or b", "a/b", "ab", "A or b", "A, b", "A/b", "(a) (b)", "(a) or (b)",
    # LaTeX and markdown
    "\\boxed{A} \\boxed{B}", "\\boxed{A}\\boxed{B}", "\\boxed{A} or \\boxed{B}", "\\boxed{A or B}",
    "\\boxed{A,B}", "\\boxed{AB}", "\\boxed{A} or B", "\\boxed{A \\text{ or } B}", "\\boxed{A \\lor B}",
    "A \\vee B", "A \\& B", "A\\quad B", "A \\text{or} B", "\\text{A or B}", "A\\text{ or }B", "$A$ or $B$",
    "$\\boxed{A}$ or $\\boxed{B}$", "\\text{(A)} \\text{(B)}", "**A** or **B**", "`A` or `B`",
]

# One letter, spelled as models spell it: label A, reward 1.
SINGLE_ANSWERS = [
    "A", "a", "(A)", "(a)", "[A]", "A.", "A)", "(A).", "**A**", "`A`", "$A$", "\\text{A}", "\\text{(A)}",
    "\\textbf{(A)}", "\\boxed{A}", "$\\boxed{A}$", "The answer is (A).", "The answer is A", "Answer: A",
    "answer: (A)", "The correct answer is option A", "The correct option is A.", "Option A", "Choice (A)",
    "So the answer is A.", "Therefore, the answer is (A)", "My answer: A", "I choose A", "The answer is $\\boxed{A}$",
    "A is correct.", "(A) is the answer", "A. <text of option A>", "A. 12 apples", "A. A triangle", "(A) blue",
    "A: blue", "A) x = 3", "(A) $\\frac{1}{2}$", "A. 30°", "A. The Eiffel Tower", "A. It is raining",
    "A. I don't know", "A. blue, so the answer is \\boxed{A}", "\\boxed{A}. A is the largest",
]


@pytest.mark.parametrize("hedge", HEDGES)
def test_naming_several_letters_scores_zero(hedge: str) -> None:
    assert accuracy_reward(think_answer(hedge), "A") == 0.0
    assert accuracy_reward(think_answer(hedge), "$\\boxed{A}$") == 0.0  # LMM-R1's labels are boxed
    # The same hedge in a box without answer tags, and with the letters swapped.
    assert accuracy_reward(f"So \\boxed{{{hedge}}}.", "A") == 0.0
    swapped = hedge.replace("A", "#").replace("B", "A").replace("#", "B")
    assert accuracy_reward(think_answer(swapped), "A") == 0.0


@pytest.mark.parametrize("answer", SINGLE_ANSWERS)
def test_one_letter_scores_one_in_every_spelling(answer: str) -> None:
    assert accuracy_reward(think_answer(answer), "A") == 1.0
    assert accuracy_reward(think_answer(answer), "(A)") == 1.0
    assert accuracy_reward(think_answer(answer), "$\\boxed{A}$") == 1.0
    assert accuracy_reward(think_answer(answer), "B") == 0.0


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("B. A triangle", "B", 1.0),  # the article "A" in an option's text is no second letter
        ("B. a cat", "B", 1.0),
        ("(B) I think so", "B", 1.0),
        ("b", "B", 1.0),
        ("a cat", "A", 0.0),  # a lower-case article alone names nothing
        ("A cat", "A", 1.0),
        ("C", "B", 0.0),
        ("B or A", "A", 0.0),
        ("D. f(x) = 2", "D", 1.0),  # a function's argument is not an option
        ("D. point P", "D", 0.0),  # a lone capital in the option's text counts as a letter: the strict side
        # "A" as a letter, not an article, after the letter named first: hedges all the same
        ("B or A is right", "B", 0.0),
        ("B. A is also possible", "B", 0.0),
        ("B, or A", "B", 0.0),
        ("B and A are both fine", "B", 0.0),
        ("B or A triangle", "B", 0.0),
        ("B) A might be", "B", 0.0),
        ("B. I am sure", "B", 1.0),
    ],
)
def test_choice_letters_in_option_texts(answer: str, label: str, expected: float) -> None:
    assert accuracy_reward(think_answer(answer), label) == expected


# Generated hedges: two letters in every pairing of these joiners and spellings (about 50,000 answers).
JOINERS = [
    " or ", " and ", ", ", ",", "/", " / ", "|", ";", " & ", "+", "-", " - ", "–", "\n", " ", "", " or maybe ",
    " and/or ", " vs ", " versus ", " nor ", ", or ", " (or ", ". ", ": ", " then ", " also ", " plus ", " with ",
    " \\lor ", " \\vee ", " \\text{ or } ", " \\& ", "\\quad ", " \\\\ ", "、", "，", " 或 ", "~", "=", " -> ",
    " to ", " through ", " if not ", " rather than ", " instead of ", " > ", " not ",
]
SPELLINGS = [
    "{}", "({})", "[{}]", "{}.", "{})", "**{}**", "$\\boxed{{{}}}$", "\\text{{{}}}", "\\textbf{{({})}}", "Option {}",
    "choice {}", "'{}'", "\"{}\"", "`{}`", "<{}>", "{{{}}}", "{}:",
]


@pytest.mark.parametrize(("gold", "other"), [("A", "B"), ("B", "A"), ("A", "I"), ("D", "E")])
def test_generated_hedges_all_score_zero(gold: str, other: str) -> None:
    scored = []
    for joiner, first, second in itertools.product(JOINERS, SPELLINGS, SPELLINGS[:6]):
        for mine, theirs in ((gold, other), (gold.lower(), other.lower()), (gold, other.lower()), (gold.lower(), other)):
            for answer in (first.format(mine) + joiner + second.format(theirs),
                           first.format(theirs) + joiner + second.format(mine)):
                if accuracy_reward(think_answer(answer), gold) != 0.0:
                    scored.append(answer)
    assert scored == []


def test_generated_single_letters_all_score_one() -> None:
    prefixes = ["", "The answer is ", "Answer: ", "The correct option is ", "Therefore, the answer is ", "I choose "]
    texts = ["", ". 12 apples", ". A triangle", ": blue", ") x = 3", ". $\\frac{1}{2}$", ". 30°", ". The Eiffel Tower",
             ". a cat", ". $y = 2x + 1$", ". I don't know", ". None of the above"]
    missed = []
    for prefix, spelling, text in itertools.product(prefixes, SPELLINGS[:10] + ["({}).", "**({})**"], texts):
        if text and spelling in ("{}.", "{})", "{}:"):
            continue  # "B.. 12 apples"
        for letter in ("B", "b"):
            answer = prefix + spelling.format(letter) + text
            if accuracy_reward(think_answer(answer), "B") != 1.0:
                missed.append(answer)
    assert missed == []


def test_choice_letter_names_one_letter_or_none() -> None:
    assert [choice_letter(text) for text in ("The answer is (B).", "b", "C. 5 cm", "D is right")] == list("BBCD")
    assert [choice_letter(text) for text in ("A or B", "AB", "either C or D", "a cat", "12 apples")] == [None] * 5


def test_open_boxes_keeps_what_is_around_them() -> None:
    assert open_boxes("so \\boxed{A} or \\boxed{\\frac{1}{2}} x") == "so A or \\frac{1}{2} x"
    assert open_boxes("\\boxed{\\boxed{A}} \\boxed{open") == "\\boxed{A} \\boxed{open"


ABSURD = [
    "9^{9^{9^{9}}}", "10^{10^{10}}", "9^9^9", "9**9**9", "2^{2^{2^{2^{2^{2}}}}}", "10^{1000000}", "10^{-10^{10}}",
    "(3/2)^{1000000}", "1.5^{1000000000}", "1000000!", "(10^{10})!", "\\left(10^{10}\\right)!", "((10!)!)!",
    "\\binom{1000000}{500000}", "(x+1)^{1000}", "1" * 3000, "{" * 60 + "1" + "}" * 60,
]
REASONABLE = [
    "3", "\\frac{1}{2}", "(1, 2]", "50\\%", "x^2+2x+1", "2^{10}", "2^{300000}", "10^{100}", "20000!", "(3!)!",
    "\\binom{10}{5}", "(x+1)^{100}", "x^{10^{10}}", "e^{e^{e^{10}}}", "0.5^{10^{10}}", "(2 \\cdot 3)^{1000}",
    "2^{2^{2^{2^{2}}}}", "\\sqrt{2}^{10}", "1,000,000",
]


@pytest.mark.parametrize("answer", ABSURD)
def test_the_precheck_refuses_absurd_expressions(answer: str) -> None:
    assert expression_problem(answer) is not None
    with pytest.raises(AnswerRejected, match="not checked"):
        accuracy_reward(think_answer(answer), "3")
    with pytest.raises(LabelParseError, match="not checked"):
        accuracy_reward(think_answer("3"), answer)


@pytest.mark.parametrize("answer", REASONABLE)
def test_the_precheck_lets_reasonable_answers_through(answer: str) -> None:
    assert expression_problem(answer) is None


def test_math_verify_steps_stop_at_their_cpu_time_limit() -> None:
    # Passes the pre-check, but sympy expands it for seconds: the limit stops it in a fraction of that.
    slow = think_answer("(x+2)^{100}(x-1)^{100}")
    assert expression_problem("(x+2)^{100}(x-1)^{100}") is None
    with pytest.raises(TimeLimitExceeded, match="CPU time"):
        accuracy_reward(slow, "x^2", math_timeout_s=0.2)
    assert accuracy_reward(think_answer("(y+2)^2"), "y^2+4y+4", math_timeout_s=5.0) == 1.0


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
    ("<|user|><|image_1|>How many?<|end|><|assistant|>\\boxed{2}<|end|><|endoftext|>", "phi4", "\\boxed{2}"),
    ("<|user|>\nHow many?<|end|>\n<|assistant|>\n\\boxed{2}<|end|>", "phi3", "\\boxed{2}"),
    ("no template at all <|im_end|>", "chatml", "no template at all"),
]


@pytest.mark.parametrize(("query", "template", "expected"), QUERY_TABLE)
def test_response_from_query(query: str, template: str, expected: str) -> None:
    assert response_from_query(query, template) == expected
