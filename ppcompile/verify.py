"""The verifier: structural invariants checked after each pass (in tests and under ``--check``)."""

from __future__ import annotations

from torch import fx

from ppcompile.context import CompileContext


class VerifyError(AssertionError):
    pass


def verify(gm: fx.GraphModule, ctx: CompileContext, done: list[str]) -> None:
    """Check what the passes in ``done`` (the driver's, in order, so far) guarantee; what one pass
    guarantees holds after every later one too. Raise VerifyError naming the first breach."""
    gm.graph.lint()
    nodes = list(gm.graph.nodes)
    after = done[-1]
    if "propagate_shapes" in done:
        for node in nodes:
            _require("ppc.kind" in node.meta, f"{node.name} has no ppc.kind after {after}")
            if node.meta["ppc.kind"] == "tensor":
                _require("ppc.shape" in node.meta, f"tensor {node.name} has no symbolic shape")
    if "estimate_costs" in done:
        for node in nodes:
            _require("ppc.cost" in node.meta, f"{node.name} has no cost")
    compute = set(ctx.partition.compute_order) if ctx.partition else set()
    if "partition_stages" in done:
        last = -1
        for node in nodes:
            stage = node.meta.get("ppc.stage")
            if node.name in compute:
                _require(stage is not None, f"compute node {node.name} has no stage")
                _require(
                    stage >= last,
                    f"{node.name} on stage {stage} comes after stage {last}: cuts not contiguous",
                )
                last = stage
    if "plan_memory" in done:
        for node in nodes:
            region = node.meta.get("ppc.checkpoint")
            _require(
                region is None or node.meta.get("ppc.stage") is not None, f"{node.name} recomputed off-stage"
            )
        regions = [node.meta.get("ppc.checkpoint") for node in nodes if node.name in compute]
        closed = set()
        for previous, current in zip([None, *regions], regions):
            if current != previous and previous is not None:
                closed.add(previous)
            _require(
                current is None or current not in closed, f"checkpoint region {current} is not contiguous"
            )
    if "join_layers" in done:
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            _require("ppc.divided" not in node.meta, f"{node.name}'s bands were never joined")
            bands = [by_name[band].meta.get("ppc.stage") for band in node.meta.get("ppc.joins", ())]
            _require(
                not bands or (len(set(bands)) == len(bands) > 1 and bands == sorted(bands)),
                f"{node.name} joins bands of stages {bands}: one band per stage, in stage order",
            )
    if "split_stages" in done:
        received = {(name, sg.stage) for sg in ctx.stage_graphs for name in sg.receives}
        sent = {name for sg in ctx.stage_graphs for name in sg.sends}
        for b in ctx.boundaries.values():
            _require(b.name in sent, f"boundary {b.name} is never sent")
            _require(b.producer < min(b.consumers), f"boundary {b.name} flows backwards")
            for c in b.consumers:
                _require((b.name, c) in received, f"stage {c} never receives {b.name}")
        for name, stage in received:
            _require(
                name in ctx.boundaries and stage in ctx.boundaries[name].consumers,
                f"{name} received by {stage} unsent",
            )
        owned = [n for sg in ctx.stage_graphs for n in sg.node_names]
        _require(len(owned) == len(set(owned)), "a compute node is in two stages")
        _require(set(owned) == compute, "a compute node is in no stage")
        for sg in ctx.stage_graphs:
            sg.graph.lint()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise VerifyError(message)
