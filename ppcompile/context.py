"""The state every compiler pass reads and extends.

``CompileConfig`` is what the user asked for (frozen). ``CompileContext`` carries the model
and the results that passes hand to each other; per-node facts go into
``node.meta["ppc.<key>"]`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from ppcompile.devices import DeviceProfile
from ppcompile.runtime.spec import ModelRef, ModelSpec


@dataclass(frozen=True)
class CompileConfig:
    stages: int  # pipeline ranks K; each holds virtual_stages stages
    microbatches: int | str = 8  # micro-batches M per training step; "auto" with global_batch
    schedule: str = "1f1b"  # pipeline schedule name
    device_profile: str = "cpu"  # roofline profile used to cost nodes
    check: bool = False  # run the verifier after every pass
    virtual_stages: int = 1  # V: stages per rank (interleaved schedules); stage i lives on rank i % K
    memory_per_device: int | None = None  # bytes a rank may use; None: no limit
    optimizer: str = "adamw"  # sizes the optimizer state in the memory model (memory.OPTIMIZER_MEMORY)
    profile: bool = False  # time every node on a real device instead of the roofline
    profile_device: str = "cpu"  # where --profile measures
    profile_threads: int = 1  # CPU threads while profiling: torchrun gives each rank one
    profile_concurrency: int | None = None  # processes busy while profiling; None: K on cpu, 1 on cuda
    profile_cache: str | None = "~/.cache/ppcompile/profiles"  # None: always measure afresh
    dims: dict[str, int] | None = None  # balance for this micro-batch shape instead of the example's
    # Rows per optimizer step, split into M micro-batches of b = global_batch / M rows each (the
    # batch dim b at that size, as --dims b=... would set it); None: b is the example's.
    global_batch: int | None = None
    # Fuse the last linear layer with its cross-entropy (passes/fuse_loss.py): faster and smaller,
    # but the loss sums run in another order, so losses match eager to float rounding, not bitwise.
    fuse_loss: bool = False
    # Where --profile measured the ranks sharing this machine's cores: the long actions the
    # simulator sees running while every other rank waits get the idle cores too
    # (ppcompile/spare_cores.py). Off by default: on a step-level benchmark its gain is in the noise.
    spare_cores: bool = False
    # Let cuts fall inside a linear layer, each side computing a band of its output features
    # (passes/divide_layers.py), where that evens the stages; off: every node whole on one stage.
    divide_layers: bool = True

    @property
    def trains(self) -> bool:
        """Whether the program trains; ``--schedule forward-only`` compiles one for inference, which
        returns what forward returns and holds no gradients, optimizer state or saved activations."""
        return self.schedule != "forward-only"


@dataclass(frozen=True)
class BoundaryTensor:
    """A value made on one stage and consumed on later ones: sent producer -> each consumer."""

    name: str
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    requires_grad: bool  # a gradient travels back to the producer
    producer: int
    consumers: tuple[int, ...]
    # Its dims outermost first in memory where not their own order (estimate_costs' ppc.dim_order):
    # the wire carries it so, and the consumer gets the producer's layout.
    dim_order: tuple[int, ...] = ()


@dataclass(frozen=True)
class KnownValue:
    """A non-tensor value that the micro-batch's sizes alone fix, so a stage that uses it computes
    it instead of receiving it: ``T = x.size(1)`` is ``KnownValue("int", (s,))``, ``x.size()``
    ``KnownValue("torch.Size", (b, s, 768))``, Hugging Face's ``(-1,) + input_shape[1:] +
    (h.size(-1),)`` ``KnownValue("tuple", (-1, s, 768))``, ``1.0 / math.sqrt(64)``
    ``KnownValue("constant", constant=0.125)``."""

    kind: str  # "int", "torch.Size", "tuple" (of ints) or "constant" (a float, bool or None)
    exprs: tuple[sympy.Expr, ...] = ()  # "int": its value; "torch.Size" and "tuple": each item's
    constant: float | bool | None = None

    def json(self) -> object:
        """program.json's form, which ``runtime.executor.size_value`` reads: expressions as text."""
        if self.kind == "constant":
            return self.constant
        texts = [str(e) for e in self.exprs]
        return texts[0] if self.kind == "int" else texts

    def text(self) -> str:
        """How a stage file lists it among its inputs: ``int s``, ``torch.Size([b, s, 768])``."""
        if self.kind == "constant":
            return "None" if self.constant is None else f"{type(self.constant).__name__} {self.constant!r}"
        items = ", ".join(str(e) for e in self.exprs)
        if self.kind == "tuple":
            return f"tuple ({items}{',' if len(self.exprs) == 1 else ''})"
        return f"int {items}" if self.kind == "int" else f"torch.Size([{items}])"


@dataclass
class StageGraph:
    """One stage's own fx graph and its ports."""

    stage: int
    graph: fx.Graph
    graph_inputs: list[str]  # model inputs this stage loads itself
    receives: list[str]  # boundary tensors it receives, in forward-argument order
    sizes: list[str]  # non-tensor values made on earlier stages that it computes (ppc.value), last
    sends: list[str]  # boundary tensors it sends
    returns_loss: bool  # the last stage of a training program
    returns_output: bool  # the last stage of an inference program: what forward returns
    modules: list[str]  # leaf submodules it owns, by FQN
    tensors: list[str]  # parameters and buffers it uses directly, by FQN
    node_names: list[str]  # the original graph's compute nodes it runs


@dataclass
class Partition:
    """Where the cuts fall and what each stage costs under the cost model."""

    cut_positions: list[int]  # index into the compute order where each stage after the first starts
    stage_times: list[float]  # seconds per micro-batch, forward + backward + link occupancy
    compute_order: list[str]  # compute node names in the order cuts are made
    even_split_times: list[float] | None = None  # the same costs for the even split by layer count
    even_split_layers: int = 0  # repeated layers found for that split
    fitting_cuts: list[int] | None = None  # the best cuts that fit the memory budget without recomputation
    fitting_times: list[float] | None = None
    # The best cut by forward + backward alone, communication left out: no partition's slowest
    # stage computes less than the slowest of these (partition_stages.compute_floor).
    compute_floor_times: list[float] | None = None


@dataclass
class CompileContext:
    config: CompileConfig
    ref: ModelRef
    spec: ModelSpec  # built on the meta device
    profile: DeviceProfile
    input_names: list[str]
    input_dims: dict[str, dict[int, str]]  # input name -> {dim -> symbol}; dim 0 is always "b"
    symbols: dict[str, sympy.Symbol]  # symbol name -> sympy symbol, e.g. "b", "s"
    symbol_values: dict[str, int]  # the example micro-batch's value of each symbol
    partition: Partition | None = None
    stage_graphs: list[StageGraph] = field(default_factory=list)
    boundaries: dict[str, BoundaryTensor] = field(default_factory=dict)
    tied_groups: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts the report should show
    live_microbatches: list[int] = field(default_factory=list)  # per stage, at the schedule's peak
    memory: list[Any] = field(default_factory=list)  # StageMemory per stage
    regions: list[Any] = field(default_factory=list)  # recomputed regions, in stage order
    profiled_on: str | None = None  # the device costs were measured on, if --profile
    profile_slowdown: float = 1.0  # compute with K ranks busy over alone, as --profile measured it
    profile_shared_machine: bool = False  # --profile measured ranks sharing this machine's cores
    # (cores, speedup): the machine's cores, and how much faster a rank alone runs on all of them
    # than on its own threads, where --profile measured both; None: no spare cores to hand out.
    spare_cores: tuple[int, float] | None = None
    profile_key: str | None = None  # the profile's cache key: what calibrations are cached under too
    fused_losses: list[str] = field(default_factory=list)  # linear layers fused with their loss
    # Linear layers a cut divides (passes/join_layers.py): {"layer": name, "columns": [[stage, start, stop], ...]}
    divided: list[dict[str, Any]] = field(default_factory=list)
    cost_basis: list[dict[str, int]] = field(default_factory=list)  # monomials of the cost formulas
    # Conditions on shapes the trace decided for the example's (where, value): another micro-batch
    # shape is compiled only where each comes out the same (frontend.check_decided_at).
    decided: list[tuple[str, Any]] = field(default_factory=list)
    # Per decided condition, what a micro-batch of other sizes must keep to run as the model would
    # (PipelineTracer.decision_formulas): checked at run time, on every batch.
    decided_formulas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        """Stages the graph is cut into: K ranks times V virtual stages."""
        return self.config.stages * self.config.virtual_stages

    def rank_of(self, stage: int) -> int:
        return stage % self.config.stages

    @property
    def device_type(self) -> str:
        """The device type the program is compiled for: ``--profile``'s device's, else the cost profile's."""
        config = self.config
        return torch.device(config.profile_device).type if config.profile else self.profile.device_type
