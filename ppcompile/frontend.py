"""Frontend: load ``PATH.py:FACTORY``, build the model on the meta device, trace it with torch.fx."""

from __future__ import annotations

import inspect
import linecache
import traceback
from pathlib import Path

import sympy
from torch import fx, nn

from ppcompile.context import CompileConfig, CompileContext
from ppcompile.devices import get_profile
from ppcompile.errors import CompileError
from ppcompile.runtime.spec import ModelRef, SpecError


class PipelineTracer(fx.Tracer):
    """fx's tracer, with buffers proxied so ``self.mask[:, :T]`` traces like a parameter would."""

    proxy_buffer_attributes = True


def load_context(ref_text: str, config: CompileConfig) -> CompileContext:
    """Build the model on the meta device (no weights allocated) and set up the context."""
    try:
        ref = ModelRef.parse(ref_text)
        spec = ref.build("meta")
    except SpecError as e:
        raise CompileError(str(e)) from None
    except Exception as e:
        where = _model_frame(e, ref.path)
        raise CompileError(f"{where}: building the model failed: {type(e).__name__}: {e}") from None
    params = inspect.signature(spec.module.forward).parameters
    input_names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    input_names = input_names[: len(spec.example_inputs)]
    if len(input_names) != len(spec.example_inputs):
        raise CompileError(
            f"{ref}: forward takes {len(input_names)} positional inputs but the factory gave "
            f"{len(spec.example_inputs)} example inputs"
        )
    dims = {name: {0: "b"} for name in input_names}
    for name, named in spec.dims.items():
        if name not in dims:
            raise CompileError(
                f"{ref}: ModelSpec.dims names input {name!r}; forward's inputs are {input_names}"
            )
        dims[name] = dict(named)
    symbol_values: dict[str, int] = {}
    for name, example in zip(input_names, spec.example_inputs):
        for dim, symbol in dims[name].items():
            size = int(example.shape[dim])
            if symbol_values.setdefault(symbol, size) != size:
                raise CompileError(
                    f"{ref}: symbol {symbol!r} is {symbol_values[symbol]} in one input and {size} in {name!r}"
                )
    symbols = {s: sympy.Symbol(s, integer=True, positive=True) for s in symbol_values}
    return CompileContext(
        config=config,
        ref=ref,
        spec=spec,
        profile=get_profile(config.device_profile),
        input_names=input_names,
        input_dims=dims,
        symbols=symbols,
        symbol_values=symbol_values,
    )


def trace(ctx: CompileContext) -> fx.GraphModule:
    """Symbolically trace the meta model; an untraceable model is one line naming its code."""
    module: nn.Module = ctx.spec.module
    try:
        graph = PipelineTracer().trace(module)
    except Exception as e:
        where = _model_frame(e, ctx.ref.path)
        raise CompileError(
            f"{where}: torch.fx cannot trace this model ({type(e).__name__}: {e}); make control flow "
            "independent of tensor values, or move that code into a submodule fx keeps as a leaf"
        ) from None
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return gm


def _model_frame(error: BaseException, model_path: str) -> str:
    """``file:line: code`` of the innermost frame inside the model file, else the file alone."""
    target = Path(model_path).resolve()
    found = model_path
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == target:
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            found = f"{model_path}:{frame.lineno}: `{code}`"
    return found
