"""The schedule IR: one action is ``(stage, kind, microbatch)``, written ``2F0``, ``1B3``, ``3SEND_F1``.

The compiler writes every rank's action list into ``program.json`` in this text form and the
runtime parses it back, so the IR lives in the runtime (which imports only torch and stdlib).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class ActionKind(str, Enum):
    """What a rank does for one stage (and usually one microbatch)."""

    F = "F"  # forward
    B = "B"  # full backward: input grads and weight grads together
    I = "I"  # noqa: E741  (the standard zero-bubble name) backward, input-grad half
    W = "W"  # backward, weight-grad half; may run later to fill bubbles
    SEND_F = "SEND_F"  # send this microbatch's activations to every consumer stage
    RECV_F = "RECV_F"  # receive this microbatch's activations from every producer stage
    SEND_B = "SEND_B"  # send input grads back to every producer stage
    RECV_B = "RECV_B"  # receive output grads from every consumer stage
    REDUCE_GRAD = "REDUCE_GRAD"  # once per step: all-reduce tied / shared parameter grads
    OPT = "OPT"  # once per step: optimizer step


COMPUTE_KINDS = frozenset({ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W})
SEND_KINDS = frozenset({ActionKind.SEND_F, ActionKind.SEND_B})
RECV_KINDS = frozenset({ActionKind.RECV_F, ActionKind.RECV_B})
# These happen once per step, not once per microbatch, so they carry no microbatch.
STEP_KINDS = frozenset({ActionKind.REDUCE_GRAD, ActionKind.OPT})

# Longest kind first so that the alternation never stops at a shorter prefix. Stage and
# microbatch forbid leading zeros: "01F0" would not print back as itself.
_KIND_PATTERN = "|".join(sorted((kind.value for kind in ActionKind), key=len, reverse=True))
_ACTION_RE = re.compile(rf"(0|[1-9][0-9]*)({_KIND_PATTERN})(0|[1-9][0-9]*)?")
_ACCEPTED_FORMS = (
    "<stage><kind><microbatch> such as 2F0, 1B3, 0W5, 3SEND_F1, 1RECV_B2, "
    "or <stage><kind> for REDUCE_GRAD and OPT such as 0REDUCE_GRAD, 0OPT; "
    f"kinds: {', '.join(kind.value for kind in ActionKind)}"
)


@dataclass(frozen=True)
class Action:
    """One step of one rank's program.

    Example::

        >>> str(Action(3, ActionKind.SEND_F, 1))
        '3SEND_F1'
        >>> Action.parse("0OPT")
        Action(stage=0, kind=<ActionKind.OPT: 'OPT'>, microbatch=None)
    """

    stage: int
    kind: ActionKind
    microbatch: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            raise ValueError(f"action kind must be an ActionKind, got {self.kind!r}")
        if self.stage < 0:
            raise ValueError(f"action stage must be >= 0, got {self.stage} in {self.kind.value}")
        if self.kind in STEP_KINDS:
            if self.microbatch is not None:
                raise ValueError(
                    f"{self.kind.value} runs once per step and takes no microbatch, got {self.microbatch}"
                )
        elif self.microbatch is None or self.microbatch < 0:
            raise ValueError(f"{self.kind.value} needs a microbatch >= 0, got {self.microbatch}")

    def __str__(self) -> str:
        microbatch = "" if self.microbatch is None else str(self.microbatch)
        return f"{self.stage}{self.kind.value}{microbatch}"

    @property
    def is_compute(self) -> bool:
        """True for F, B, I and W: the actions that take a stage's compute time."""
        return self.kind in COMPUTE_KINDS

    @staticmethod
    def parse(text: str) -> Action:
        """Parse the text form; ``str(Action.parse(text)) == text`` for every valid ``text``.

        Example::

            >>> Action.parse("1RECV_B2")
            Action(stage=1, kind=<ActionKind.RECV_B: 'RECV_B'>, microbatch=2)
        """
        match = _ACTION_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid action {text!r}: expected {_ACCEPTED_FORMS}")
        stage, kind, microbatch = match.groups()
        try:
            return Action(int(stage), ActionKind(kind), None if microbatch is None else int(microbatch))
        except ValueError as error:
            raise ValueError(f"invalid action {text!r}: {error}; expected {_ACCEPTED_FORMS}") from None


def format_rank_actions(actions: list[Action] | tuple[Action, ...]) -> str:
    """One rank's action list as space-separated text.

    Example::

        >>> format_rank_actions([Action(0, ActionKind.F, 0), Action(0, ActionKind.SEND_F, 0)])
        '0F0 0SEND_F0'
    """
    return " ".join(str(action) for action in actions)


def parse_rank_actions(text: str) -> list[Action]:
    """Inverse of :func:`format_rank_actions`; any run of whitespace separates actions.

    Example::

        >>> parse_rank_actions("0F0 0B0")
        [Action(stage=0, kind=<ActionKind.F: 'F'>, microbatch=0), Action(stage=0, kind=<ActionKind.B: 'B'>, microbatch=0)]
    """
    return [Action.parse(token) for token in text.split()]
