"""A rollout engine on vLLM: the same `RolloutEngine` interface as the Hugging Face engine, fed by the same export.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the Ray actor that holds it is the engine, so
weight buckets reach vLLM's workers as Python objects (CPU tensors, or CUDA IPC handles that each worker opens on
its own GPU) without vLLM's msgpack serialisation. With `tensor_parallel_size > 1` vLLM starts its TP workers as
Ray actors on the placement-group bundles given in `bundle_indices`.

Prompts arrive with the trainer's token ids, whose image placeholders are already expanded (one `<|image_pad|>`
per merged patch). vLLM expands placeholders itself from the image grid, so each run is collapsed back to one
token, and the prompt vLLM ends up with is checked against the trainer's: a different image resize would make the
two sides train and sample on different sequences.

Log-probs are vLLM's `processed_logprobs` (after temperature and the vision-token ban, before top-k/top-p), the
quantity the trainer computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch

from lmmrl_megatron.rollout.engine import GenerationOutput, MultimodalPrompt, SamplingParams
from lmmrl_megatron.rollout.broadcast import GroupAddress
from lmmrl_megatron.rollout.ipc import BucketMetadata

WORKER_EXTENSION = "lmmrl_megatron.rollout.vllm_worker.WeightReceiver"


@dataclass
class VLLMEngineOptions:
    """What the trainer tells vLLM; everything else is vLLM's default."""

    model_dir: str
    dtype: str = "bfloat16"  # vLLM's spelling
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    enable_sleep: bool = False  # vLLM's sleep mode (GPU only)
    sleep_level: Literal[1, 2] = 2
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    max_images_per_prompt: int = 8
    bundle_indices: list[int] | None = None  # placement-group bundles of the TP workers (TP > 1)


def _set_process_env(options: VLLMEngineOptions) -> None:
    """Environment vLLM reads at import and start-up; set before the first `import vllm` of this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        # CPU: the KV cache is sized in GiB by an env var, not by gpu_memory_utilization; the default (4 GiB) is
        # more than tiny test models need. The torch inductor ISA probe compiles a test program; skip it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
    if options.tensor_parallel_size > 1:
        assert options.bundle_indices and len(options.bundle_indices) == options.tensor_parallel_size
        os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, options.bundle_indices))


def collapse_image_placeholders(prompt_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Token ids with every run of `<|image_pad|>` reduced to one: the form vLLM expands from the image grid."""
    ids = prompt_ids.tolist()
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


class VLLMRolloutEngine:
    """One vLLM engine (one model replica over `tensor_parallel_size` devices)."""

    def __init__(self, options: VLLMEngineOptions) -> None:
        _set_process_env(options)
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        self.options = options
        self.on_gpu = torch.cuda.is_available()
        hf_config = AutoConfig.from_pretrained(options.model_dir)
        self.image_token_id: int = hf_config.image_token_id
        # Vision placeholders must never be sampled: the trainer would take them for image positions.
        self.banned_token_ids = [
            hf_config.image_token_id, hf_config.video_token_id, hf_config.vision_start_token_id, hf_config.vision_end_token_id
        ]
        eos = GenerationConfig.from_pretrained(options.model_dir).eos_token_id
        self.eos_token_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        kwargs: dict[str, Any] = dict(
            model=options.model_dir,
            dtype=options.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            enable_prefix_caching=options.enable_prefix_caching,
            enforce_eager=options.enforce_eager,
            seed=options.seed,
            max_num_seqs=options.max_num_seqs,
            limit_mm_per_prompt={"image": options.max_images_per_prompt, "video": 0},
            mm_processor_kwargs=options.mm_processor_kwargs or None,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            enable_sleep_mode=options.enable_sleep and self.on_gpu,  # vLLM refuses sleep mode on CPU
            distributed_executor_backend="ray" if options.tensor_parallel_size > 1 else None,
        )
        if options.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        if not self.on_gpu:
            kwargs["skip_mm_profiling"] = True  # the encoder-cache profile run costs minutes on CPU
        self.llm = LLM(**kwargs)
        self._weights_asleep = self._kv_cache_asleep = False

    # -- generation -------------------------------------------------------------------------------------------
    def _vllm_prompt(self, prompt: MultimodalPrompt) -> dict[str, Any]:
        if prompt.image_grid_thw is None:
            return {"prompt_token_ids": prompt.prompt_ids.tolist()}
        if prompt.images is None or len(prompt.images) != prompt.image_grid_thw.shape[0]:
            raise ValueError("the vLLM backend needs each prompt's images (MultimodalPrompt.images), one per grid row")
        return {
            "prompt_token_ids": collapse_image_placeholders(prompt.prompt_ids, self.image_token_id),
            "multi_modal_data": {"image": list(prompt.images)},
        }

    def _sampling_params(self, params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = params.temperature == 0
        return VLLMSamplingParams(
            n=params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=-1 if greedy or params.top_k < 0 else params.top_k,
            max_tokens=params.max_new_tokens,
            seed=seed,
            stop_token_ids=sorted(set(self.eos_token_ids) | set(params.stop_token_ids)),
            logit_bias={token: -100.0 for token in self.banned_token_ids},
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            skip_special_tokens=False,
        )

    def generate(self, prompts: Sequence[MultimodalPrompt], params: SamplingParams) -> list[list[GenerationOutput]]:
        assert not (self._weights_asleep or self._kv_cache_asleep), "wake_up() the engine before generate()"
        if not prompts:
            return []
        requests = [self._vllm_prompt(p) for p in prompts]
        # A seed per request, distinct across requests (vLLM seeds a request's n samples seed, seed + 1, ...): a
        # prompt that appears twice must not get the same samples. Not on CPU: vLLM 0.26 rewinds a request's
        # generator when a chunked prefill discards its token, which CPU generators refuse ("CPU Generator does
        # not use offset"); there the engine's own seeded generator draws every sample.
        seeded = params.seed is not None and self.on_gpu
        seeds = [(params.seed << 24) + i * params.n if seeded else None for i in range(len(prompts))]
        sampling = [self._sampling_params(params, seed) for seed in seeds]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        results = []
        for prompt, request_output in zip(prompts, outputs, strict=True):
            self._check_prompt(prompt, request_output.prompt_token_ids)
            group = []
            for completion in request_output.outputs:
                token_ids = torch.tensor(completion.token_ids, dtype=torch.long)
                logprobs = torch.tensor(
                    [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                    dtype=torch.float32,
                )
                finish = "stop" if completion.finish_reason == "stop" else "length"
                group.append(GenerationOutput(token_ids, logprobs, finish))
            results.append(group)
        return results

    @staticmethod
    def _check_prompt(prompt: MultimodalPrompt, vllm_ids: Sequence[int]) -> None:
        ours = prompt.prompt_ids.tolist()
        if list(vllm_ids) != ours:
            raise ValueError(
                f"vLLM expanded the prompt to {len(vllm_ids)} tokens where the trainer has {len(ours)}: the two image "
                "processors resized differently (check data.min_pixels/max_pixels against the model's processor)"
            )

    # -- weights and memory ------------------------------------------------------------------------------------
    def begin_weight_update(self, manifest: list[str]) -> None:
        """Start a sync; `manifest` names every tensor the sync will carry (checked at `finish_weight_update`)."""
        assert not self._weights_asleep, "wake_up() (or wake_up_weights()) the engine before a weight update"
        self.llm.collective_rpc("lmmrl_begin_update", args=(manifest,))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of CPU tensors (or tensors of this process's device) into every TP worker."""
        bucket = list(named_tensors)
        return self.llm.collective_rpc("lmmrl_load_tensors", args=(bucket,))[0]

    def update_weights_ipc(self, handles: dict[str, Any], metadata: BucketMetadata, slot: int | None = None) -> int:
        """Load one bucket shared by CUDA IPC: `handles` maps a GPU's UUID to the handle of the bucket's byte
        buffer on that GPU; `metadata` gives (name, dtype, shape, byte offset) of each tensor in it. A `slot`
        names a buffer the sender reuses across buckets and syncs: the workers keep it open."""
        return self.llm.collective_rpc("lmmrl_load_ipc_bucket", args=(handles, metadata, slot))[0]

    def join_broadcast_group(self, address: GroupAddress, first_rank: int) -> None:
        """Every TP worker joins the trainer's broadcast group (engines on GPUs of their own)."""
        self.llm.collective_rpc("lmmrl_join_group", args=(address, first_rank))

    def update_weights_broadcast(self, metadata: BucketMetadata, num_bytes: int) -> int:
        """Receive the bucket the trainer broadcasts next over that group, and load it."""
        return self.llm.collective_rpc("lmmrl_receive_bucket", args=(metadata, num_bytes))[0]

    def finish_weight_update(self) -> int:
        """End a sync: every manifest name was received, prefix and multimodal caches are dropped."""
        num_loaded = self.llm.collective_rpc("lmmrl_finish_update")[0]
        # KV blocks and vision embeddings computed with the old weights must not be reused; the encoder cache is
        # kept both by the scheduler and by the workers, and reset_encoder_cache clears both.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        return num_loaded

    def sleep(self) -> None:
        if self.options.enable_sleep and self.on_gpu:
            self.llm.sleep(level=self.options.sleep_level)
        self._weights_asleep = self._kv_cache_asleep = True

    def wake_up(self) -> None:
        if self.options.enable_sleep and self.on_gpu:
            self.llm.wake_up()
        self._weights_asleep = self._kv_cache_asleep = False

    def wake_up_weights(self) -> None:
        """First half of a wake-up for a sync: weights only, the KV cache stays free while buckets arrive."""
        if self.options.enable_sleep and self.on_gpu:
            self.llm.wake_up(tags=["weights"])
        self._weights_asleep = False

    def wake_up_kv_cache(self) -> None:
        if self.options.enable_sleep and self.on_gpu:
            self.llm.wake_up(tags=["kv_cache"])
        self._kv_cache_asleep = False

    def device_uuids(self) -> list[str]:
        """The GPU UUID of each TP worker, in worker order (for picking CUDA IPC handles)."""
        return self.llm.collective_rpc("lmmrl_device_uuid")
