"""Batch reward functions in OpenRLHF's `reward_func(queries, prompts, labels)` convention, for the tests
(`reward_func.py` beside this file is the plain one, with torch, as OpenRLHF's example)."""

from __future__ import annotations

import time

import numpy as np


def returns_dict(queries, prompts, labels, **kwargs):
    rewards = np.array([0.5, 0.25][: len(queries)])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"dummy": rewards}}


def returns_nested_list(queries, prompts, labels):
    return [np.array([0.5]), [0.25]][: len(queries)]


def returns_too_few(queries, prompts, labels):
    return [1.0]


def raises(queries, prompts, labels):
    raise RuntimeError("no reward today")


def hangs(queries, prompts, labels):
    time.sleep(600)
