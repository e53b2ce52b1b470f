"""Measure a compiled program stage by stage, for benchmarks that hold predictions to account.

``measure_stages`` chains the stages once on one micro-batch to get each stage's real inputs,
then times each stage's forward + backward alone (median of repeats after warm-up) and counts
the bytes autograd saves for its backward through ``saved_tensors_hooks``. An inference program
(``--schedule forward-only``) is timed as its runtime runs it: forward alone under
``torch.no_grad()``, nothing saved.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ppcompile.runtime.executor import held_storages, size_arguments, stage_arguments, symbol_values
from ppcompile.runtime.loader import Program
from ppcompile.runtime.train import batches, build_spec


@dataclass(frozen=True)
class StageMeasurement:
    seconds: float  # forward + backward of one micro-batch (forward alone for inference), median
    saved_bytes: int  # activations autograd keeps for backward, one micro-batch (0 for inference)


def measure_stages(
    program: Program, repeats: int = 20, threads: int = 1, seed: int = 0
) -> list[StageMeasurement]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spec = build_spec(program, seed)
        microbatch = next(batches(program, spec, seed))[0]
        stages = [program.stage_class(s)(spec.module) for s in range(program.num_stages)]
        params = {id(p): p for stage in stages for p in stage.parameters()}
        held = held_storages(stages)
        inputs = _stage_inputs(program, stages, microbatch)
        symbols = symbol_values(program, microbatch)
        steps, saved = [], []
        for s, stage in enumerate(stages):
            info = program.stage(s)

            def step(count=None, stage=stage, info=info, s=s):
                received = {
                    n: inputs[s][n].detach().requires_grad_(inputs[s][n].requires_grad)
                    for n in info["receives"]
                }
                args = stage_arguments(info, microbatch, received, size_arguments(info, symbols))
                if not program.trains:
                    with torch.no_grad():
                        stage(*args)
                    return
                if count is None:
                    out = stage(*args)
                else:
                    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                        out = stage(*args)
                roots, grads = [], []
                if info["returns_loss"]:
                    roots.append(out["loss"])
                    grads.append(torch.ones_like(out["loss"]))
                for name in info["sends"]:
                    if out[name].requires_grad:
                        roots.append(out[name])
                        grads.append(torch.ones_like(out[name]))
                if roots:
                    torch.autograd.backward(roots, grads)

            seen: dict = {}

            def count(t, seen=seen):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in held:
                    seen[ref] = t.untyped_storage().nbytes()
                return t

            step(count)
            for _ in range(3):
                step()  # warm-up
            steps.append(step)
            saved.append(sum(seen.values()))
        # Round-robin over the stages, so a change in the machine's load hits every stage alike.
        samples = [[] for _ in stages]
        for _ in range(repeats):
            for s, step in enumerate(steps):
                for p in params.values():
                    p.grad = None
                start = time.perf_counter()
                step()
                samples[s].append(time.perf_counter() - start)
        return [StageMeasurement(statistics.median(t), b) for t, b in zip(samples, saved)]
    finally:
        torch.set_num_threads(previous_threads)


def _stage_inputs(program: Program, stages, microbatch) -> list[dict[str, torch.Tensor]]:
    values, inputs = {}, []
    symbols = symbol_values(program, microbatch)
    with torch.no_grad():
        for s, stage in enumerate(stages):
            info = program.stage(s)
            received = {n: values[n] for n in info["receives"]}
            inputs.append(
                {
                    n: t.clone().requires_grad_(program.boundary(n)["requires_grad"])
                    for n, t in received.items()
                }
            )
            out = stage(*stage_arguments(info, microbatch, received, size_arguments(info, symbols)))
            values.update({n: out[n] for n in info["sends"]})
    return inputs
