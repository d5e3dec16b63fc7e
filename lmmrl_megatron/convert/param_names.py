"""Stage-local parameter names of a pipeline-parallel model chunk, turned into global (whole-model) names.

On pipeline stage 1 of 2 of an 8-layer decoder, `decoder.layers.0.mlp.linear_fc1.weight` is global layer 4. The
mapping to Hugging Face names works on global names, so every consumer of a live model's parameters (the weight
export, the checkpoint tools) renames them first. The global index is read from the layer module itself
(Megatron's 1-based `layer_number`), which is right for uneven first/last stages and virtual pipeline chunks.
"""

from __future__ import annotations

import re

import torch

_LAYER_INDEX = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)(?P<rest>\..*)$")


def _layer_offsets(model: torch.nn.Module) -> dict[str, int]:
    """For each `...layers.<i>` module path with a `layer_number`, the global 0-based index of that layer."""
    offsets = {}
    for path, module in model.named_modules():
        match = re.fullmatch(r"(.*\.)?layers\.\d+", path)
        layer_number = getattr(module, "layer_number", None)
        if match and isinstance(layer_number, int):
            offsets[path] = layer_number - 1
    return offsets


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Map every local parameter name of `model` (one pipeline chunk) to its global name."""
    offsets = _layer_offsets(model)
    names = {}
    for local_name, _ in model.named_parameters():
        names[local_name] = to_global_name(local_name, offsets)
    return names


def to_global_name(local_name: str, layer_offsets: dict[str, int]) -> str:
    """Rewrite the layer index of `local_name` with the global index its layer module carries."""
    match = _LAYER_INDEX.match(local_name)
    if match is None:
        return local_name
    # The innermost `layers.<i>` is the transformer layer; a name never nests two layer lists.
    layer_path = f"{match['prefix']}.{match['index']}"
    if layer_path not in layer_offsets:
        return local_name
    return f"{match['prefix']}.{layer_offsets[layer_path]}{match['rest']}"
