"""An OpenRLHF-style `--remote_rm_url reward_func.py` file, as users write them (torch imported at the top)."""

import torch


def reward_func(queries, prompts, labels):
    """1 when the query ends with its label, as a tensor (OpenRLHF's example returns a tensor too)."""
    return torch.tensor([float(query.endswith(label)) for query, label in zip(queries, labels)])
