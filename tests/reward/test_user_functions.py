"""Loading user reward functions from `path/to/file.py:function_name`, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmmrl_megatron.reward.user_functions import BadRewardValue, as_reward_value, load_reward_function

USER_FILE = Path(__file__).with_name("user_reward_functions.py")


def test_loads_a_function_by_path_and_name() -> None:
    length_bonus = load_reward_function(f"{USER_FILE}:length_bonus")
    assert length_bonus("0123456789" * 3, "label", "prompt") == 3.0
    # The same file loads once: both functions come from the same module object.
    mentions_prompt = load_reward_function(f"{USER_FILE}:mentions_prompt")
    assert mentions_prompt.__module__ == length_bonus.__module__


def test_relative_paths_resolve_from_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(USER_FILE.parent)
    assert load_reward_function("user_reward_functions.py:mentions_prompt")("say hi", "", "hi") == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon.py", "must be written 'path/to/file.py:function_name'"),
        (f"{USER_FILE}:", "must be written"),
        (f"{USER_FILE.with_suffix('.txt')}:length_bonus", "is not a .py file"),
        (f"{USER_FILE}:not-an-identifier", "is not a Python identifier"),
        ("/nonexistent/dir/rewards.py:score", "does not exist"),
        (f"{USER_FILE}:missing_function", "defines no 'missing_function'.*length_bonus"),
        (f"{USER_FILE}:NOT_A_FUNCTION", "is a int, not a function"),
        (f"{USER_FILE}:takes_two_arguments", r"must accept \(response: str, label: str, prompt: str\)"),
    ],
)
def test_bad_specs_raise_value_errors_naming_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


def test_a_file_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import a_module_that_does_not_exist\n\ndef score(response, label, prompt):\n    return 1.0\n")
    with pytest.raises(ValueError, match="importing .*broken.py.* failed: ModuleNotFoundError"):
        load_reward_function(f"{broken}:score")


def test_two_files_with_the_same_name_do_not_collide(tmp_path: Path) -> None:
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "rewards.py").write_text(f"def score(response, label, prompt):\n    return {value}\n")
    assert load_reward_function(f"{tmp_path / 'a' / 'rewards.py'}:score")("", "", "") == 1.0
    assert load_reward_function(f"{tmp_path / 'b' / 'rewards.py'}:score")("", "", "") == 2.0


@pytest.mark.parametrize(("value", "expected"), [(1, 1.0), (0.25, 0.25), (True, 1.0), (np.float32(0.5), 0.5)])
def test_real_numbers_are_accepted_as_rewards(value: object, expected: float) -> None:
    assert as_reward_value(value) == expected


@pytest.mark.parametrize("value", ["1.0", None, [1.0], float("nan"), float("inf")])
def test_other_return_values_are_rejected(value: object) -> None:
    with pytest.raises(BadRewardValue):
        as_reward_value(value)
