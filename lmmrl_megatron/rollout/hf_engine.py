"""A rollout engine on Hugging Face transformers: works on CPU and on one GPU, fed by the same weight export as vLLM."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Sequence

import torch

from lmmrl_megatron.rollout.engine import GenerationOutput, MultimodalPrompt, SamplingParams
from lmmrl_megatron.rollout.broadcast import GroupAddress, join_group, receive_bucket
from lmmrl_megatron.rollout.ipc import BucketMetadata, IpcBuffers, device_uuid, open_ipc_bucket


def _params_by_checkpoint_name(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by the names they have on disk (`model.layers.*`, `visual.*`, `lm_head.*`), which is
    what the weight export yields, and also by their module names.

    transformers 5 renames checkpoint keys when it loads (`model.layers` -> `model.language_model.layers`) and
    reverts the renaming when it saves; its own revert function gives the on-disk name of each parameter.
    """
    params = dict(model.named_parameters())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers load checkpoints without renaming
        return params
    by_id = {id(p): p for p in params.values()}
    on_disk = revert_weight_conversion(model, dict(params))
    return {**params, **{name: by_id[id(t)] for name, t in on_disk.items() if id(t) in by_id}}


class HFRolloutEngine:
    """Batched sampling with `model.generate` over left-padded multimodal prompts."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForImageTextToText, GenerationConfig

        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        config = self.model.config
        self.image_token_id: int = config.image_token_id
        self.video_token_id: int = config.video_token_id
        # A response must never contain vision placeholders: the trainer would take them for image positions.
        self.suppressed_token_ids = [
            config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id
        ]
        generation = GenerationConfig.from_pretrained(model_dir)
        eos = generation.eos_token_id
        self.eos_token_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.pad_token_id: int = generation.pad_token_id if generation.pad_token_id is not None else self.eos_token_ids[0]
        # transformers >= 5.2x derives multimodal rotary positions only when told which tokens are image tokens.
        self._takes_mm_token_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self._params = _params_by_checkpoint_name(self.model)
        self._asleep = False
        self._manifest: set[str] | None = None  # names the sync in progress must deliver
        self._received: set[str] = set()
        self._ipc_buffers = IpcBuffers()  # the trainer's reused bucket buffers, opened once

    # -- generation -------------------------------------------------------------------------------------------
    def _collate(self, prompts: Sequence[MultimodalPrompt], n: int) -> dict[str, torch.Tensor]:
        """Left-pad every prompt repeated `n` times, and concatenate their images in the same row order."""
        rows = [p for p in prompts for _ in range(n)]
        max_len = max(p.prompt_ids.numel() for p in rows)
        input_ids = torch.full((len(rows), max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), max_len), dtype=torch.long)
        for i, p in enumerate(rows):
            input_ids[i, max_len - p.prompt_ids.numel() :] = p.prompt_ids
            attention_mask[i, max_len - p.prompt_ids.numel() :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_images = [p for p in rows if p.pixel_values is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
            batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
        if self._takes_mm_token_types:
            types = torch.zeros_like(input_ids)
            types[input_ids == self.image_token_id] = 1
            types[input_ids == self.video_token_id] = 2
            batch["mm_token_type_ids"] = types
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, prompts: Sequence[MultimodalPrompt], params: SamplingParams) -> list[list[GenerationOutput]]:
        assert not self._asleep, "wake_up() the engine before generate()"
        if not prompts:
            return []
        batch = self._collate(prompts, params.n)
        stop_ids = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        greedy = params.temperature == 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = self.model.generate(
            **batch,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy or params.top_k < 0 else params.top_k,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppressed_token_ids,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, batch["input_ids"].shape[1] :].cpu()
        # Raw logits of every step, tempered as the trainer tempers them (greedy is scored at temperature 1), with
        # the suppressed tokens out of the distribution as they were when sampling.
        logits = torch.stack(out.logits, dim=1).float().cpu() / (params.temperature if not greedy else 1.0)
        logits[..., self.suppressed_token_ids] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results: list[list[GenerationOutput]] = []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row]
            is_stop = torch.isin(tokens, torch.tensor(stop_ids))
            length = int(is_stop.nonzero()[0]) + 1 if is_stop.any() else tokens.numel()
            finish = "stop" if is_stop.any() else "length"
            output = GenerationOutput(tokens[:length].clone(), logprobs[row, :length].clone(), finish)
            if row % params.n == 0:
                results.append([])
            results[-1].append(output)
        return results

    # -- weights and memory ------------------------------------------------------------------------------------
    def begin_weight_update(self, manifest: list[str]) -> None:
        assert not self._asleep, "wake_up() the engine before a weight update"
        self._manifest, self._received = set(manifest), set()

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        assert not self._asleep, "wake_up() the engine before update_weights()"
        num_loaded = 0
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise ValueError(f"update_weights: {name!r} is not a parameter of the rollout model")
            if param.shape != tensor.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            if self._manifest is not None:
                if name not in self._manifest or name in self._received:
                    raise ValueError(f"update_weights: {name!r} is not in this sync's manifest, or came twice")
                self._received.add(name)
            num_loaded += 1
        return num_loaded

    def update_weights_ipc(self, handles: dict[str, Any], metadata: BucketMetadata, slot: int | None = None) -> int:
        """One bucket shared by CUDA IPC (engines colocated with the trainer); see `rollout/ipc.py`."""
        num_loaded = self.update_weights(open_ipc_bucket(handles, metadata, self.device, slot, self._ipc_buffers))
        torch.cuda.current_stream().synchronize()
        return num_loaded

    def join_broadcast_group(self, address: GroupAddress, first_rank: int) -> None:
        self._group = join_group(address, first_rank)

    def update_weights_broadcast(self, metadata: BucketMetadata, num_bytes: int) -> int:
        return self.update_weights(receive_bucket(self._group, metadata, num_bytes, self.device))

    def finish_weight_update(self) -> int:
        assert self._manifest is not None, "begin_weight_update must start a weight sync"
        missing = self._manifest - self._received
        if missing:
            raise ValueError(f"weight sync ended without {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        num_received, self._manifest = len(self._received), None
        return num_received

    def sleep(self) -> None:
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake_up(self) -> None:
        if self.device.type != "cpu":
            self.model.to(self.device)
        self._asleep = False

    def wake_up_weights(self) -> None:
        """The weights come back for a sync; this engine has no KV cache to hold back."""
        self.wake_up()

    def wake_up_kv_cache(self) -> None:
        pass

    def device_uuids(self) -> list[str]:
        return [device_uuid(self.device)]
