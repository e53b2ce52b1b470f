"""Load a program directory: read ``program.json``, check every file's sha256, import stage modules.

The runtime's only view of the compiler is this directory.

Example::

    program = load_program("build/mini")
    stage_cls = program.stage_class(1)        # the generated Stage1
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FORMAT = 1


class ProgramError(ValueError):
    """A program directory that cannot be run as it is; the message is one line for the user."""


@dataclass(frozen=True)
class Program:
    root: Path
    data: dict

    @property
    def num_stages(self) -> int:
        return len(self.data["stages"])

    @property
    def num_ranks(self) -> int:
        return len({s["rank"] for s in self.data["stages"]})

    @property
    def trains(self) -> bool:
        """False for an inference program (compiled with ``--schedule forward-only``), which returns
        what the model's forward returns instead of a loss to train on."""
        return self.data.get("trains", True)

    @property
    def optimizer(self) -> str:
        """The optimizer the program was compiled for (``--optimizer``, whose state its memory
        model counts): what ``run.py`` and ``ppcompile verify`` train with unless told otherwise."""
        return self.data["costs"].get("optimizer", "adamw")

    def output_batch_dims(self) -> dict[str, int | None]:
        """An inference program's returned values by path, each with the dim its micro-batches join
        along (None: kept per micro-batch)."""
        return {o["path"]: o["batch_dim"] for o in self.data.get("outputs", [])}

    def stage(self, stage_id: int) -> dict:
        return self.data["stages"][stage_id]

    @property
    def rank_of_stage(self) -> dict[int, int]:
        return {s["id"]: s["rank"] for s in self.data["stages"]}

    def stages_of_rank(self, rank: int) -> list[int]:
        return [s["id"] for s in self.data["stages"] if s["rank"] == rank]

    def boundary(self, name: str) -> dict:
        return next(b for b in self.data["boundaries"] if b["name"] == name)

    def stage_class(self, stage_id: int):
        info = self.stage(stage_id)
        path = self.root / info["file"]
        # Keyed by the file's text as well as its place: a program compiled again into the same
        # directory within one process must not get the classes of the one it replaced.
        digest = hashlib.sha256(str(path.resolve()).encode() + path.read_bytes()).hexdigest()[:12]
        module_name = f"ppc_stage_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[module_name] = module
        return getattr(module, info["class"])


def load_program(root: str | Path, check_hashes: bool = True) -> Program:
    root = Path(root)
    try:
        data = json.loads((root / "program.json").read_text())
    except (OSError, ValueError) as e:
        raise ProgramError(f"{root} holds no readable program.json ({e}); compile the model first") from None
    if data.get("format_version") != SUPPORTED_FORMAT:
        raise ProgramError(
            f"{root}/program.json has format {data.get('format_version')}, this runtime reads {SUPPORTED_FORMAT}; "
            "recompile with the installed ppcompile"
        )
    if check_hashes:
        for name, expected in sorted(data["files"].items()):
            path = root / name
            if not path.is_file():
                raise ProgramError(f"{path} is missing; recompile the program")
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != expected:
                raise ProgramError(
                    f"{path} was changed after compilation (sha256 {actual[:12]} != {expected[:12]}); recompile "
                    "instead of editing generated files"
                )
    return Program(root, data)
