"""RewardConfig defaults and validation."""

from __future__ import annotations

import pytest

from lmmrl_megatron.reward.config import RewardConfig, RewardFunctionConfig


def test_defaults_are_lmmr1_scoring() -> None:
    config = RewardConfig()
    assert [(f.name, f.weight) for f in config.functions] == [("format", 0.5), ("accuracy", 1.0)]
    assert config.format_kind == "think_answer"
    assert config.remote_rm_url is None


def test_mappings_become_function_configs() -> None:
    config = RewardConfig(functions=[{"name": "accuracy", "weight": 2}, {"name": "rewards.py:length", "weight": -1}])
    assert config.functions == [RewardFunctionConfig("accuracy", 2.0), RewardFunctionConfig("rewards.py:length", -1.0)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"functions": [{"name": "acuracy", "weight": 1.0}]}, "reward.functions"),
        ({"functions": [{"name": "accuracy", "wieght": 1.0}]}, r"reward.functions\[0\] has unknown keys"),
        ({"functions": [{"name": "accuracy", "weight": float("nan")}]}, r"reward.functions\[accuracy\].weight"),
        ({"functions": [{"name": "accuracy", "weight": "1"}]}, r"reward.functions\[accuracy\].weight"),
        ({"functions": ["accuracy"]}, r"reward.functions\[0\] must be a mapping"),
        ({"functions": [{"name": "format"}, {"name": "format"}]}, "more than once"),
        ({"functions": []}, "at least one reward function"),
        ({"format_kind": "xml"}, "reward.format_kind"),
        ({"remote_rm_url": "localhost:5000"}, "reward.remote_rm_url"),
        ({"remote_rm_url": "http://a:1,,http://b:2"}, "empty entry between commas"),
        ({"remote_rm_url": "http://a:1,ftp://b:2"}, "entry 'ftp://b:2' must start with http"),
        ({"remote_rm_url": "http://a:1,reward_func.py"}, "must be the only entry"),
        ({"remote_rm_url": " "}, "non-empty string"),
        ({"math_timeout_s": 0}, "reward.math_timeout_s"),
        ({"timeout_s": 0}, "reward.timeout_s"),
        ({"num_workers": 0}, "reward.num_workers"),
        ({"client_timeout_s": -1.0}, "reward.client_timeout_s"),
        ({"client_max_retries": -1}, "reward.client_max_retries"),
        ({"client_backoff_s": -0.1}, "reward.client_backoff_s"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RewardConfig(**kwargs)


def test_a_remote_server_needs_no_local_functions() -> None:
    config = RewardConfig(functions=[], remote_rm_url="http://127.0.0.1:5000/get_reward")
    assert config.functions == []


def test_the_section_loads_through_the_project_config_loader() -> None:
    from lmmrl_megatron.config.loader import from_dict

    config = from_dict(
        RewardConfig,
        {"functions": [{"name": "accuracy", "weight": 1}, {"name": "my_rewards.py:brevity", "weight": "1e-1"}],
         "format_kind": "boxed", "timeout_s": 5},
    )
    assert config.functions[1] == RewardFunctionConfig("my_rewards.py:brevity", 0.1)
    assert config.format_kind == "boxed" and config.timeout_s == 5
    with pytest.raises(ValueError, match="'acc' is neither a built-in"):
        from_dict(RewardConfig, {"functions": [{"name": "acc"}]})


@pytest.mark.parametrize(
    ("url", "servers", "function"),
    [
        ("http://127.0.0.1:5000/get_reward", ["http://127.0.0.1:5000/get_reward"], None),
        ("http://a:1/get_reward, http://b:2", ["http://a:1/get_reward", "http://b:2"], None),
        ("/openrlhf/examples/scripts/reward_func.py", [], "/openrlhf/examples/scripts/reward_func.py"),
        ("rewards/mine.py:score", [], "rewards/mine.py:score"),
    ],
)
def test_remote_rm_url_takes_what_openrlhf_takes(url: str, servers: list[str], function: str | None) -> None:
    config = RewardConfig(functions=[], remote_rm_url=url)
    assert config.remote_urls == servers and config.remote_function == function
