"""A pipeline plan: which stage actor runs which roles, on which GPU (or the CPU). Pure data, no Ray.

A plan is a chain of stage actors, in data-flow order. Each actor has one device (one GPU, or the
CPU in tests) and one or more roles:

    encode   VAE encode + the motion-aware noise + the text encoder   (always the first actor)
    dit      a contiguous range [start, end) of DiT blocks             (actors in block order)
    decode   VAE decode                                                (always the last actor)

The DiT ranges of the chain cover [0, L) contiguously. Encode may share the first shard's actor and
decode the last shard's (the reference's roles: rank 0 "input", last rank "output").

Compact spec string (the `--plan` of `weir bench pipeline`): actors separated by '|', each a
'+'-joined list of roles ('enc', 'dec', 'a-b' for blocks [a, b)); GPUs are numbered in actor order.
Worked example for the 30-block 1.3B model on 2 GPUs, the default:

    build_plan(2, model="wan-1.3b")            -> "enc+0-15|15-30+dec"
        actor 0 on GPU 0: encode, blocks [0, 15)      actor 1 on GPU 1: blocks [15, 30), decode
    build_plan(4, model="tiny", layout="separate", device="cpu")
                                               -> "enc|0-2|2-4|dec" (4 CPU actors, the CPU test graph)
    build_plan(2, model="wan-1.3b", block_times_s=[[0.003] * 30, [0.006] * 30], extra_s=[0.02, 0.03])
                                               -> "enc+0-21|21-30+dec"  (the faster GPU 0 gets more)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

from scheduling.block_scheduler import BlockPlan, optimal_split, reference_split
from stages.config import DIT_PRESETS

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("colocated", "separate")
WEIGHTS_INITS = ("replay", "shard")


@dataclass(frozen=True)
class StagePlacement:
    """One stage actor of the chain: where it runs and what it does."""

    actor: int
    """Position in the chain, 0-based (data flows actor 0 -> actor 1 -> ...)."""
    gpu: int | None
    """GPU index (0-based, distinct per actor: NCCL cannot put two ranks on one GPU), or None = CPU."""
    encode: bool = False
    """Runs VAE encode, the noise controller and the text encoder (first actor only)."""
    blocks: tuple[int, int] | None = None
    """DiT block range [start, end) this actor owns, or None."""
    decode: bool = False
    """Runs VAE decode (last actor only)."""

    def __post_init__(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.actor < 0:
            raise ValueError(f"actor={self.actor} must be >= 0")
        if self.gpu is not None and self.gpu < 0:
            raise ValueError(f"gpu={self.gpu} must be >= 0 or None (CPU)")
        if self.blocks is not None:
            start, end = self.blocks
            if not 0 <= start < end:
                raise ValueError(f"actor {self.actor}: blocks={self.blocks} must satisfy 0 <= start < end")
        if not (self.encode or self.decode or self.blocks is not None):
            raise ValueError(f"actor {self.actor} has no role: give it encode, blocks or decode")

    @property
    def roles(self) -> str:
        """The compact spec of this actor, e.g. 'enc+0-15'."""
        parts = ["enc"] if self.encode else []
        if self.blocks is not None:
            parts.append(f"{self.blocks[0]}-{self.blocks[1]}")
        if self.decode:
            parts.append("dec")
        return "+".join(parts)

    @property
    def device_name(self) -> str:
        """'cpu' or 'gpu<i>' (for tables and JSON)."""
        return "cpu" if self.gpu is None else f"gpu{self.gpu}"


@dataclass(frozen=True)
class PipelinePlan:
    """The whole chain plus the model it runs. Validated on construction (see `__post_init__`)."""

    model: str
    """DiT preset name (stages.config.DIT_PRESETS): 'tiny', 'wan-1.3b', 'wan-14b'."""
    stages: tuple[StagePlacement, ...]
    """The actors in chain order."""
    dtype: str = "bfloat16"
    """Model dtype: 'float32' (CPU, exactness tests), 'bfloat16' (GPU default) or 'float16'."""
    vae: str = "wan"
    """Default VAE kind of streams that do not choose ('wan' or 'taehv')."""
    checkpoint_dir: str | None = None
    """Folder laid out like the published release; None = seeded random weights."""
    weights_seed: int = 0
    """Seed of the random weights (same meaning as EngineSpec.weights_seed)."""
    weights_init: str = "replay"
    """Random weights: 'replay' gives every shard exactly the weights the single-process engine draws
    (each actor replays the whole model's draw sequence and keeps its blocks: CPU time ~ model size);
    'shard' seeds each shard on its own (fast; not comparable with a single-process engine)."""
    text_on_cpu: bool = False
    """Run the text encoder on the CPU of the encode actor instead of its GPU."""

    def __post_init__(self) -> None:
        """Raise ValueError naming the first rule the chain breaks and how to fix it."""
        if self.model not in DIT_PRESETS:
            raise ValueError(f"model={self.model!r}: choose one of {sorted(DIT_PRESETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {DTYPES}")
        if self.vae not in ("wan", "taehv"):
            raise ValueError(f"vae={self.vae!r}: choose 'wan' or 'taehv'")
        if self.weights_init not in WEIGHTS_INITS:
            raise ValueError(f"weights_init={self.weights_init!r}: choose one of {WEIGHTS_INITS}")
        stages = self.stages
        if not stages:
            raise ValueError("a plan needs at least one stage actor")
        if [s.actor for s in stages] != list(range(len(stages))):
            raise ValueError(f"actors must be numbered 0..{len(stages) - 1} in chain order")
        encoders = [s.actor for s in stages if s.encode]
        decoders = [s.actor for s in stages if s.decode]
        if encoders != [0]:
            raise ValueError(f"exactly the first actor must encode, got encode on actors {encoders}")
        if decoders != [len(stages) - 1]:
            raise ValueError(f"exactly the last actor must decode, got decode on actors {decoders}")
        shard_actors = [s.actor for s in stages if s.blocks is not None]
        if not shard_actors:
            raise ValueError("the plan has no DiT shard: give some actor a block range")
        if shard_actors != list(range(shard_actors[0], shard_actors[-1] + 1)):
            raise ValueError(f"DiT shards must be consecutive actors, got actors {shard_actors}")
        num_layers = DIT_PRESETS[self.model].num_layers
        ranges = self.shard_ranges
        expected = 0
        for start, end in ranges:
            if start != expected:
                raise ValueError(
                    f"block ranges {list(ranges)} must be contiguous from 0: expected a range starting at "
                    f"{expected}, got [{start}, {end})"
                )
            expected = end
        if expected != num_layers:
            raise ValueError(
                f"block ranges {list(ranges)} cover [0, {expected}); {self.model} has {num_layers} blocks"
            )
        gpus = [s.gpu for s in stages]
        if any(g is None for g in gpus) and any(g is not None for g in gpus):
            raise ValueError(f"mix of CPU and GPU actors {gpus}: put every actor on a GPU, or all on the CPU")
        used = [g for g in gpus if g is not None]
        if len(set(used)) != len(used):
            raise ValueError(f"GPU indices {used} repeat: each actor needs its own GPU (NCCL: one rank per GPU)")

    # ---- derived ------------------------------------------------------------------------------

    @property
    def num_actors(self) -> int:
        """Number of stage actors."""
        return len(self.stages)

    @property
    def num_gpus(self) -> int:
        """GPUs the plan needs (0 on CPU)."""
        return sum(1 for s in self.stages if s.gpu is not None)

    @property
    def on_gpu(self) -> bool:
        """True when the actors run on GPUs."""
        return self.stages[0].gpu is not None

    @property
    def num_layers(self) -> int:
        """DiT blocks L of the model."""
        return DIT_PRESETS[self.model].num_layers

    @property
    def shard_actors(self) -> tuple[int, ...]:
        """Actor index of each DiT shard, in block order."""
        return tuple(s.actor for s in self.stages if s.blocks is not None)

    @property
    def shard_ranges(self) -> tuple[tuple[int, int], ...]:
        """Block range of each DiT shard, in block order."""
        return tuple(s.blocks for s in self.stages if s.blocks is not None)  # type: ignore[misc]

    @property
    def block_plan(self) -> BlockPlan:
        """The shard split as the block scheduler sees it (stage w = shard w)."""
        return BlockPlan(self.shard_ranges)

    @property
    def spec(self) -> str:
        """The compact spec string, e.g. 'enc+0-15|15-30+dec'."""
        return "|".join(s.roles for s in self.stages)

    def with_ranges(self, ranges: Sequence[tuple[int, int]]) -> PipelinePlan:
        """The same plan with new shard ranges (after a block rebalance); validated."""
        ranges = [tuple(r) for r in ranges]
        if len(ranges) != len(self.shard_actors):
            raise ValueError(f"{len(ranges)} ranges for {len(self.shard_actors)} shards")
        by_actor = dict(zip(self.shard_actors, ranges))
        stages = tuple(
            dataclasses.replace(s, blocks=by_actor[s.actor]) if s.actor in by_actor else s for s in self.stages
        )
        return dataclasses.replace(self, stages=stages)

    def describe(self) -> str:
        """A small table of the actors, one line each."""
        lines = [f"plan {self.spec}  model={self.model} dtype={self.dtype}"]
        for s in self.stages:
            lines.append(f"  actor {s.actor}  {s.device_name:<5} {s.roles}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON of every field (round-trips through `from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PipelinePlan:
        """Parse `to_json` output."""
        raw = json.loads(text)
        stages = tuple(
            StagePlacement(**{**s, "blocks": tuple(s["blocks"]) if s.get("blocks") else None})
            for s in raw.pop("stages")
        )
        return cls(stages=stages, **raw)


def parse_spec(
    spec: str, *, model: str, device: str = "cuda", gpu_offset: int = 0, **plan_fields: object
) -> PipelinePlan:
    """A plan from the compact spec string (module docstring). GPUs are numbered in actor order from
    `gpu_offset`; device 'cpu' puts every actor on the CPU.

    Example: parse_spec("enc|0-15|15-30+dec", model="wan-1.3b") -> 3 actors on GPUs 0, 1, 2.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose 'cuda' or 'cpu'")
    stages = []
    for actor, text in enumerate(spec.split("|")):
        encode = decode = False
        blocks = None
        for role in filter(None, (r.strip() for r in text.split("+"))):
            if role == "enc":
                encode = True
            elif role == "dec":
                decode = True
            elif "-" in role and blocks is None:
                try:
                    start, end = (int(x) for x in role.split("-"))
                except ValueError:
                    raise ValueError(f"plan {spec!r}: role {role!r} of actor {actor} is not 'a-b'") from None
                blocks = (start, end)
            else:
                raise ValueError(
                    f"plan {spec!r}: actor {actor} role {role!r}: use 'enc', 'dec' and one block range 'a-b'"
                )
        gpu = None if device == "cpu" else gpu_offset + actor
        stages.append(StagePlacement(actor=actor, gpu=gpu, encode=encode, blocks=blocks, decode=decode))
    plan_fields.setdefault("dtype", "float32" if device == "cpu" else "bfloat16")
    return PipelinePlan(model=model, stages=tuple(stages), **plan_fields)  # type: ignore[arg-type]


def build_plan(
    num_devices: int,
    *,
    model: str = "wan-1.3b",
    device: str = "cuda",
    layout: str = "colocated",
    block_times_s: Sequence[Sequence[float]] | None = None,
    extra_s: Sequence[float] | None = None,
    **plan_fields: object,
) -> PipelinePlan:
    """The plan for `num_devices` actors (one GPU each, or CPU actors with device='cpu').

    layout 'colocated' (default): every actor holds a DiT shard; encode rides with shard 0 and decode
    with the last shard (1 device: one actor does everything).
    layout 'separate': an encode-only actor, num_devices - 2 shard actors, a decode-only actor
    (needs >= 3 devices).

    The split: with `block_times_s` (per shard, per block, seconds) and `extra_s` (per shard: its
    encode / decode / transfer time) the block scheduler's optimal split; otherwise the reference
    split (equal GPUs). See the module docstring for worked examples.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
    if model not in DIT_PRESETS:
        raise ValueError(f"model={model!r}: choose one of {sorted(DIT_PRESETS)}")
    min_devices = 3 if layout == "separate" else 1
    if num_devices < min_devices:
        raise ValueError(f"layout {layout!r} needs >= {min_devices} devices, got num_devices={num_devices}")
    num_shards = num_devices if layout == "colocated" else num_devices - 2
    num_layers = DIT_PRESETS[model].num_layers
    if num_shards > num_layers:
        raise ValueError(f"{num_shards} shards for {num_layers} blocks: use at most {num_layers} shard devices")
    if block_times_s is not None:
        if len(block_times_s) != num_shards:
            raise ValueError(f"block_times_s has {len(block_times_s)} rows for {num_shards} shards")
        if any(len(row) != num_layers for row in block_times_s):
            raise ValueError(f"every row of block_times_s needs {num_layers} block times")
        ranges = optimal_split(block_times_s, list(extra_s) if extra_s is not None else [0.0] * num_shards).plan
    else:
        if extra_s is not None:
            raise ValueError("extra_s needs block_times_s")
        ranges = reference_split(num_layers, num_shards)
    parts = [f"{a}-{b}" for a, b in ranges.ranges]
    if layout == "colocated":
        parts[0] = "enc+" + parts[0]
        parts[-1] = parts[-1] + "+dec"
    else:
        parts = ["enc", *parts, "dec"]
    return parse_spec("|".join(parts), model=model, device=device, **plan_fields)
