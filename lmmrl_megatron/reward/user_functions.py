"""User reward functions, loaded from a Python file named in the config as `path/to/file.py:function_name`.

The function must accept three positional arguments and return a real number::

    def my_reward(response: str, label: str, prompt: str) -> float:
        ...

- `response`: the model's generated text (special tokens removed, no prompt).
- `label`: the reference answer from the dataset (the record's answer field), as a string.
- `prompt`: the prompt as the dataset stores it (LMM-R1 style: the JSON string of the chat messages).

It runs in a verifier process with the per-sample timeout of `reward.timeout_s`: raising, hanging, or returning
something other than a finite real number (int, float, bool, numpy scalar) gives reward 0 and is counted.

A batch function, named by `reward.remote_rm_url` as OpenRLHF names it (`path/to/reward_func.py`, or
`path/to/file.py:function_name`), scores a whole batch: `reward_func(queries, prompts, labels)` gets lists of the
decoded prompt + response texts (special tokens kept), the prompts and the labels, and returns one number per
query (a list, a tensor, an array) or a dict whose "rewards" holds them (OpenRLHF's newer convention).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path

from lmmrl_megatron.reward.functions import RewardFn

USER_FUNCTION_ARGUMENTS = ("response", "label", "prompt")
BATCH_FUNCTION_ARGUMENTS = ("queries", "prompts", "labels")
BATCH_FUNCTION_DEFAULT_NAME = "reward_func"


class BadRewardValue(TypeError):
    """A reward function returned something that is not a finite real number."""


def split_function_spec(spec: str, default_name: str | None = None) -> tuple[Path, str]:
    """`path/to/file.py:function_name` -> (path, function name), with a ValueError naming what is wrong.
    With a `default_name`, a bare `path/to/file.py` names that function."""
    if default_name is not None and spec.endswith(".py"):
        return Path(spec), default_name
    path_text, separator, function_name = spec.rpartition(":")
    if not separator or not path_text or not function_name:
        raise ValueError(f"reward function {spec!r} must be written 'path/to/file.py:function_name'")
    if not path_text.endswith(".py"):
        raise ValueError(f"reward function {spec!r}: {path_text!r} is not a .py file")
    if not function_name.isidentifier():
        raise ValueError(f"reward function {spec!r}: {function_name!r} is not a Python identifier")
    return Path(path_text), function_name


def load_reward_function(
    spec: str, arguments: tuple[str, ...] = USER_FUNCTION_ARGUMENTS, default_name: str | None = None
) -> RewardFn:
    """Import `path/to/file.py` and return its `function_name`, checked to be callable with `arguments`."""
    path, function_name = split_function_spec(spec, default_name)
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"reward function {spec!r}: file {str(resolved)!r} does not exist")
    # A name unique to the file, so two user files that are both called rewards.py do not collide in sys.modules.
    module_name = f"lmmrl_user_reward_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(module_name, resolved)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[module_name]
            raise ValueError(f"reward function {spec!r}: importing {str(resolved)!r} failed: {error!r}") from error
    function = vars(module).get(function_name)
    if function is None:
        available = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise ValueError(
            f"reward function {spec!r}: {str(resolved)!r} defines no {function_name!r}; callables there: {available}"
        )
    if not callable(function):
        raise ValueError(f"reward function {spec!r}: {function_name!r} is a {type(function).__name__}, not a function")
    _check_signature(spec, function, arguments)
    return function


def load_batch_reward_function(spec: str) -> RewardFn:
    """OpenRLHF's `reward_func(queries, prompts, labels)` from `path/to/file.py` (or `path/to/file.py:name`)."""
    return load_reward_function(spec, BATCH_FUNCTION_ARGUMENTS, BATCH_FUNCTION_DEFAULT_NAME)


def _check_signature(spec: str, function: RewardFn, arguments: tuple[str, ...]) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # some builtins and C callables have no signature to check; calling them will tell
    try:
        signature.bind(*arguments)
    except TypeError as error:
        raise ValueError(
            f"reward function {spec!r} has signature {signature}; it must accept ({_describe(arguments)}): {error}"
        ) from error


def _describe(arguments: tuple[str, ...]) -> str:
    kind = "list[str]" if arguments == BATCH_FUNCTION_ARGUMENTS else "str"
    return ", ".join(f"{name}: {kind}" for name in arguments)


def as_reward_value(value: object) -> float:
    """The float of a reward function's return value; BadRewardValue for non-numbers, NaN or infinity."""
    if not isinstance(value, numbers.Real):
        raise BadRewardValue(f"a reward function returned {type(value).__name__} {value!r:.80}, not a real number")
    result = float(value)
    if not math.isfinite(result):
        raise BadRewardValue(f"a reward function returned {result}, not a finite number")
    return result


def as_reward_values(value: object, count: int) -> tuple[float, ...]:
    """The floats of a batch function's return value: `count` numbers as a list, tuple, tensor or array (items may
    be one-element tensors or lists), or a dict holding them under "rewards"; BadRewardValue otherwise."""
    if isinstance(value, dict):
        if "rewards" not in value:
            raise BadRewardValue(f"a batch reward function returned a dict without 'rewards': keys {sorted(value)}")
        value = value["rewards"]
    items = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(items, (list, tuple)):
        raise BadRewardValue(f"a batch reward function returned {type(value).__name__}, not one number per query")
    if len(items) != count:
        raise BadRewardValue(f"a batch reward function returned {len(items)} values for {count} queries")
    return tuple(as_reward_value(_single(item)) for item in items)


def _single(item: object) -> object:
    if hasattr(item, "tolist"):
        item = item.tolist()
    while isinstance(item, (list, tuple)) and len(item) == 1:
        item = item[0]
    return item
