"""The parallel layout a model is cut into, and the pipeline arithmetic on it: pure integers, no process groups.

    layout = ShardLayout(tp=8, pp=4, vpp=2, num_layers_in_first_pipeline_stage=18)
    layout.decoder_layer_range(80, pp_rank=1, vp_stage=0)   # the global decoder layers of that model chunk

The one layout type: the run config's `parallel` section gives it (`ParallelConfig.layout`), the model is built at
it (`QwenVLBuildOptions.layout`), the mapping places parameters by it (`convert/mapping.chunk_params`), the
converters check a family against it and the planner counts each stage's parameters with it. Its checks are the
only ones of TP/PP/VPP/sequence parallelism; `parallel/` imports no other subpackage, so all of those can use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    """TP x PP (x virtual PP) with Megatron's rules: uneven first/last stages, interleaved virtual chunks."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual chunks per pipeline stage (the interleaved schedule); None: one
    sequence_parallel: bool = False
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Megatron refuses a single virtual chunk, and virtual chunks without pipeline stages to interleave.
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(f"vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp})")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def data_parallel_size(self, world_size: int) -> int:
        """What `world_size` ranks leave for data parallelism at this layout."""
        if world_size % self.model_parallel_size:
            raise ValueError(f"world_size={world_size} is not a multiple of tp*pp={self.model_parallel_size}")
        return world_size // self.model_parallel_size

    @property
    def num_chunks_per_stage(self) -> int:
        return self.vpp or 1

    @property
    def vp_stages(self) -> list[int | None]:
        """The virtual stage of each chunk of a pipeline rank, in order ([None]: no virtual pipeline)."""
        return list(range(self.vpp)) if self.vpp else [None]

    def is_first_chunk(self, pp_rank: int, vp_stage: int | None = None) -> bool:
        return pp_rank == 0 and (vp_stage or 0) == 0

    def is_last_chunk(self, pp_rank: int, vp_stage: int | None = None) -> bool:
        return pp_rank == self.pp - 1 and (vp_stage or 0) == self.num_chunks_per_stage - 1

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Decoder layers on each pipeline stage (all its virtual chunks together)."""
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if self.pp == 1:
            if first is not None or last is not None:
                raise ValueError("num_layers_in_first/last_pipeline_stage need pp > 1")
            return [num_layers]
        fixed = {0: first} if first is not None else {}
        if last is not None:
            fixed[self.pp - 1] = last
        remaining_layers = num_layers - sum(fixed.values())
        remaining_stages = self.pp - len(fixed)
        if remaining_layers < 0 or (remaining_stages == 0 and remaining_layers != 0):
            raise ValueError(f"{num_layers} decoder layers cannot be split with first={first}, last={last} "
                             f"over pp={self.pp}")
        if remaining_stages and remaining_layers % remaining_stages:
            raise ValueError(f"{remaining_layers} decoder layers do not split evenly over the {remaining_stages} "
                             f"pipeline stages left (first={first}, last={last}, pp={self.pp})")
        even = remaining_layers // remaining_stages if remaining_stages else 0
        return [fixed.get(stage, even) for stage in range(self.pp)]

    def decoder_layer_range(self, num_layers: int, pp_rank: int, vp_stage: int | None = None) -> range:
        """Global (0-based) indices of the decoder layers of chunk (pp_rank, vp_stage).

        Without virtual stages, stages hold consecutive blocks of layers. With `vpp` chunks per stage, each
        stage's layer count is divided into `vpp` equal chunks and the model is laid out chunk-major: chunk v of
        every stage, in stage order, then chunk v + 1 (Megatron's interleaved schedule).
        """
        if not 0 <= pp_rank < self.pp:
            raise ValueError(f"pp_rank={pp_rank} outside pp={self.pp}")
        per_stage = self.layers_per_stage(num_layers)
        vpp = self.num_chunks_per_stage
        if (vp_stage or 0) >= vpp:
            raise ValueError(f"vp_stage={vp_stage} outside vpp={self.vpp}")
        for stage, count in enumerate(per_stage):
            if count % vpp:
                raise ValueError(f"pipeline stage {stage} holds {count} layers, not a multiple of vpp={vpp}")
        per_chunk = [count // vpp for count in per_stage]
        start = (vp_stage or 0) * sum(per_chunk) + sum(per_chunk[:pp_rank])
        return range(start, start + per_chunk[pp_rank])
