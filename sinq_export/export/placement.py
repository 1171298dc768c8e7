"""Where a quantized linear's column scale ``t`` goes: the typed fold plan of one linear.

A quantized linear computes ``(x * t) @ W'^T``. The ``* t`` is an explicit ``Mul`` in front
of the node, an input of the fused custom op, folded into whatever produced ``x`` when that
is exact (a norm weight, another linear's output rows), a ratio over the ``t`` of another
reader of the same norm that is already folded into it, or absent (the method gave no t).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.Enum):
    """How ``t`` is applied; the values are the manifest's ``col_scale_mode``."""

    MUL = "mul"
    FUSED = "fused"
    NONE = "none"
    FOLD = "fold"
    RATIO = "ratio"


@dataclass(frozen=True)
class Placement:
    """One linear's ``t``: its `Mode` and, for ``FOLD`` the tensor or linear that absorbs it
    (the norm weight without ``.weight``, or the linear whose rows it scales), for ``RATIO``
    the linear whose ``t`` the input already carries."""

    mode: Mode
    target: str | None = None

    def __post_init__(self) -> None:
        if (self.target is not None) != (self.mode in (Mode.FOLD, Mode.RATIO)):
            need = "needs" if self.target is None else "takes no"
            raise ValueError(f"a {self.mode.value} placement {need} target")

    @property
    def has_input(self) -> bool:
        """The graph has a ``col_scale`` initializer for the node."""
        return self.mode in (Mode.MUL, Mode.FUSED, Mode.RATIO)

    @property
    def multiplied(self) -> bool:
        """A Mul in front of the node: by t, or by t over the lead's t already in the norm."""
        return self.mode in (Mode.MUL, Mode.RATIO)

    @property
    def ratio_of(self) -> str | None:
        return self.target if self.mode is Mode.RATIO else None

    @property
    def folded_into(self) -> str | None:
        return self.target if self.mode is Mode.FOLD else None


MUL, FUSED, NONE = Placement(Mode.MUL), Placement(Mode.FUSED), Placement(Mode.NONE)


def folded(into: str) -> Placement:
    return Placement(Mode.FOLD, into)


def ratio(lead: str) -> Placement:
    return Placement(Mode.RATIO, lead)
