"""Measured costs (``--profile``): time every node forward and backward on the real device.

The model is built for real on the device from the same factory, the graph is run once on the
example micro-batch to get every node's real inputs, then each node is timed alone: forward,
then backward (gradients of its inputs and parameters), after warm-up, as the median of
repeated runs. Identical nodes (same operator, shapes and module configuration) are timed once.
Timed alone, a node misses what it shares with its neighbours in a real run (one pass of the
autograd engine, warm caches), so all node times are scaled by one factor: the whole model's
measured forward + backward over the sum of its nodes. What autograd saves for backward is counted on the real device too, since a backend may save
less than the meta device suggests (CPU attention kernels keep a log-sum-exp, not the matrix).

On CPU the timing uses ``profile_threads`` threads (default 1: what torchrun gives each rank).
There the K ranks will also share this machine's cores, so by default the profile measures what
they cost each other (``ppcompile.contention``): every node time is multiplied by the compute
slowdown with K processes busy at once, and the link latency and bandwidth measured between two
busy ranks replace the device profile's, for the partitioner and the simulated step alike.
``profile_concurrency=1`` times alone; on CUDA each rank has its own device and nothing is shared.

On CPU the nodes are timed on the heap ``run.py`` runs them on (``ppcompile.runtime.heap``: freed
memory kept for reuse, so a large tensor does not page-fault anew each time; this sets the
compiling process's ``malloc`` too). Profiles are cached by graph, shapes, device, thread count,
concurrency, heap and torch version, so recompiling the same model reuses them. The roofline FLOPs and bytes stay; only times, saved
bytes and (under contention) the link change.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import fx

from ppcompile.contention import Contention, measure_contention
from ppcompile.context import CompileContext
from ppcompile.devices import check_device
from ppcompile.frontend import input_shapes_at
from ppcompile.passes.estimate_costs import (
    _arg_nodes,
    _flatten,
    _signature,
    call_node,
    classify_saved,
    costs_nothing,
    fresh_inputs,
)
from ppcompile.passes.propagate_shapes import ValueRecorder
from ppcompile.program import write_atomically
from ppcompile.runtime.executor import held_storages
from ppcompile.runtime.heap import keep_freed_memory
from ppcompile.runtime.train import resized
from ppcompile.tracer import under_regions

MIN_SECONDS = 0.004  # time each node for at least this long
MAX_REPEATS = 50


def profile_costs(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    config = ctx.config
    if not config.profile:
        return gm
    device = check_device(config.profile_device)
    key = profile_key(gm, ctx, device)
    cache_file = Path(config.profile_cache).expanduser() / f"{key}.json" if config.profile_cache else None
    cached = read_cached_profile(cache_file) if cache_file is not None else None
    if cached is not None:
        ctx.notes.append(f"profile: reused {cache_file.name} from the cache")
    if cached is None:
        if device.type == "cpu":  # time the nodes on the heap the runtime will run them on
            keep_freed_memory()
        cached = {"nodes": measure(gm, ctx, device), "contention": None}
        ranks = profile_concurrency(config, device)
        if ranks > 1:
            cached["contention"] = asdict(
                measure_contention(
                    ctx.ref,
                    ranks,
                    config.profile_threads,
                    config.trains,
                    input_shapes_at(ctx, ctx.symbol_values),
                )
            )
        ctx.notes.append(f"profile: measured {len(cached['nodes'])} nodes on {device}")
        if cache_file is not None:
            write_atomically(cache_file, json.dumps(cached, indent=0, sort_keys=True))
    measured = cached["nodes"]
    slowdown = 1.0
    if cached["contention"] is not None:
        contention = Contention(**cached["contention"])
        slowdown = contention.slowdown
        ctx.profile = replace(
            ctx.profile,
            link_latency=contention.link_latency,
            link_bandwidth=contention.link_bandwidth,
            send_overhead=contention.send_seconds,
            idle_latency=contention.idle_latency,
        )
        if (
            config.spare_cores
            and contention.cores > config.profile_threads
            and contention.spare_core_speedup > 1
        ):
            ctx.spare_cores = (contention.cores, contention.spare_core_speedup)
        ctx.notes.append(
            f"profile: {contention.ranks} ranks busy at once compute {slowdown:.2f}x slower than one alone; "
            f"link measured between busy ranks: {contention.link_latency * 1e6:.0f} us + "
            f"{contention.link_bandwidth / 1e9:.2f} GB/s (to an idle rank {contention.idle_latency * 1e6:.0f} us); "
            f"a send call costs its rank {contention.send_seconds * 1e6:.0f} us"
        )
    for node in gm.graph.nodes:
        if node.name in measured:
            forward, backward, saved_inputs, temp = measured[node.name]
            forward, backward = forward * slowdown, backward * slowdown
            node.meta["ppc.cost"] = replace(
                node.meta["ppc.cost"],
                forward_time=forward,
                backward_time=backward,
                saved_inputs=tuple(saved_inputs),
                saved_temp_bytes=temp,
            )
    ctx.profiled_on = str(device)
    ctx.profile_slowdown = slowdown
    ctx.profile_shared_machine = cached["contention"] is not None
    ctx.profile_key = key
    return gm


def read_cached_profile(cache_file: Path) -> dict | None:
    """The cached profile in ``cache_file``, or None where there is none or it cannot be used.

    A file cut short by a killed compile, or written by another version of this pass, is a miss
    (measured again and overwritten), never an error: the cache only saves time."""
    if not cache_file.is_file():
        return None
    try:
        cached = json.loads(cache_file.read_text())
        for forward, backward, saved_inputs, temp in cached["nodes"].values():
            float(forward), float(backward), list(saved_inputs), int(temp)
        if cached["contention"] is not None:
            Contention(**cached["contention"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return cached


def profile_concurrency(config, device: torch.device) -> int:
    """Processes busy at once while measuring: the K ranks on a CPU, one per device on CUDA."""
    if config.profile_concurrency is not None:
        return config.profile_concurrency
    return config.stages if device.type == "cpu" else 1


def profile_key(gm: fx.GraphModule, ctx: CompileContext, device: torch.device) -> str:
    what = [
        gm.code,
        repr(sorted(ctx.symbol_values.items())),
        repr([(n.name, n.meta.get("ppc.concrete"), str(n.meta.get("ppc.dtype"))) for n in gm.graph.nodes]),
        # Freezing layers for fine-tuning changes their backward, not the graph's code.
        repr([name for name, p in gm.named_parameters() if not p.requires_grad]),
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        str(ctx.config.profile_threads),
        str(profile_concurrency(ctx.config, device)),
        "contention-v9, kept heap, sender thread, at --dims",  # the cache layout, and how nodes and sends were timed
        torch.__version__,
    ]
    return hashlib.sha256("\n".join(what).encode()).hexdigest()[:24]


def measure(gm: fx.GraphModule, ctx: CompileContext, device: torch.device) -> dict:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(ctx.config.profile_threads)
    try:
        spec = ctx.ref.build(device, seed=0)
        if not ctx.config.trains:
            spec.module.requires_grad_(False)  # as the compiler's own copy: inference runs no backward
        real = fx.GraphModule(spec.module, gm.graph)
        recorder = ValueRecorder(real)
        # The micro-batch the program is compiled for: the example's rows repeated where --dims
        # (or --global-batch) asks for more.
        microbatch = [
            resized(t, shape)
            for t, shape in zip(spec.example_inputs, input_shapes_at(ctx, ctx.symbol_values))
        ]
        with torch.enable_grad():  # a model's torch.no_grad() switches it inside the run
            recorder.run(*microbatch)
        values = recorder.values
        result, by_signature = {}, {}
        for node in gm.graph.nodes:
            if costs_nothing(node) or node.meta["ppc.kind"] == "none":
                continue
            key = _signature(real, node, values)
            if key not in by_signature:
                by_signature[key] = _time_node(real, node, values, device)
            forward, backward, saved_args, saved_self, temp = by_signature[key]
            inputs = _arg_nodes(node)
            saved = [inputs[i].name for i in saved_args if inputs[i].op != "get_attr"]
            if saved_self:
                saved.append(node.name)
            result[node.name] = [forward, backward, saved, temp]
        # Timed alone, nodes miss what they share in a real run (one autograd engine pass, caches
        # warmed by the previous node): scale every node by whole-model time over the nodes' sum.
        whole = _time_whole(real, microbatch, device)
        total = sum(f + b for f, b, _, _ in result.values())
        scale = whole / total if total > 0 else 1.0
        for entry in result.values():
            entry[0] *= scale
            entry[1] *= scale
        return result
    finally:
        torch.set_num_threads(threads)


def _time_whole(real: fx.GraphModule, inputs, device: torch.device) -> float:
    """Forward + backward of the whole traced model on one micro-batch, median seconds
    (forward alone where nothing trains)."""
    params = [p for p in real.parameters() if p.requires_grad]
    # The graph's own code leaves out the regions the model ran its nodes in (a frozen teacher
    # under torch.no_grad(), blocks under torch.autocast); ValueRecorder runs each node inside them.
    forward = ValueRecorder(real).run if any("ppc.regions" in n.meta for n in real.graph.nodes) else real

    def step():
        loss = forward(*inputs)
        if params and isinstance(loss, torch.Tensor) and loss.requires_grad:  # not for inference
            torch.autograd.grad([loss], params, allow_unused=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return timed(step, sync)


def timed(fn, sync) -> float:
    """Median seconds of ``fn`` after two warm-up calls, repeated for at least MIN_SECONDS."""
    fn()
    fn()
    samples, spent = [], 0.0
    while (spent < MIN_SECONDS and len(samples) < MAX_REPEATS) or len(samples) < 3:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples)


_ENGINE_OVERHEAD: list[float] = []


def engine_overhead() -> float:
    """Seconds one autograd.grad call costs around a trivial graph on this machine."""
    if not _ENGINE_OVERHEAD:
        x = torch.ones(1, requires_grad=True)
        y = x * 1.0
        g = torch.ones(1)
        _ENGINE_OVERHEAD.append(
            timed(lambda: torch.autograd.grad([y], [x], [g], retain_graph=True), lambda: None)
        )
    return _ENGINE_OVERHEAD[0]


def _time_node(real: fx.GraphModule, node: fx.Node, values: dict, device: torch.device):
    inputs = _arg_nodes(node)
    module = real.get_submodule(node.target) if node.op == "call_module" else None
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def forward(fresh, hooks=None):
        args = fx.node.map_arg(node.args, lambda n: fresh[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: fresh[n.name])
        with under_regions(node):
            if hooks is None:
                return call_node(real, node, module, args, kwargs)
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                return call_node(real, node, module, args, kwargs)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timed_inputs = fresh_inputs(inputs, values, detach_attributes=False)[1]
    forward_seconds = timed(lambda: forward(timed_inputs), sync)
    # Saved tensors, counted on the real device. An in-place node (relu_) changed its input on each
    # timed run above, so the graph backward runs through is made after them, from new copies.
    saved: list[torch.Tensor] = []
    leaves, fresh = fresh_inputs(inputs, values, detach_attributes=False)
    leaves = [leaf for leaf in leaves.values() if leaf.requires_grad]
    out = forward(fresh, (lambda t: saved.append(t) or t, lambda t: t))
    saved_args, saved_self, temp, _ = classify_saved(
        saved, [fresh[n.name] for n in inputs], out, held_storages([module] if module is not None else [])
    )
    outputs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
    differentiable = [o for o in outputs if o.requires_grad]
    wrt = leaves + params

    backward_seconds = 0.0
    if differentiable and wrt:
        grads = [torch.ones_like(o) for o in differentiable]

        def backward():
            torch.autograd.grad(differentiable, wrt, grads, retain_graph=True, allow_unused=True)

        # Each autograd.grad call starts the engine once; a stage's backward starts it once for
        # all its nodes, so that fixed cost is taken out of every node's share.
        raw = timed(backward, sync)
        backward_seconds = max(raw - engine_overhead(), 0.1 * raw)
    return forward_seconds, backward_seconds, sorted(saved_args), saved_self, temp
