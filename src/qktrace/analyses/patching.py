"""Compare's heads shown causally: their attention patterns patched from prompt B into prompt A.

The algorithm of `patch_heads(a, b, heads, pair)` (compare's step 5):

1. The total difference: m = logit(answer) - logit(rival) at the last position, m(B) - m(A).
2. Each head alone, then all of them together: prompt A run with the head's pattern taken from
   prompt B's clean run (`PatchAttention`), every other head frozen at its pattern in A
   (`FreezeAttention`); the change of m from m(A). A prompt patched with its own patterns changes
   nothing, exactly: frozen and patched patterns are recomputed from the clean trace as HF computes them.
3. The heads' share of the total difference: their change together over m(B) - m(A). Values and
   residual stay A's, so it measures what the heads' attention alone carries of the difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..steering.interventions import FreezeAttention, Intervention, PatchAttention, run_with

if TYPE_CHECKING:
    from ..models.tokens import Contrast
    from ..tracer import Traced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patching:
    """The change of m in prompt A when heads take their attention patterns from prompt B."""

    heads: tuple[tuple[int, int], ...]  # (layer, head), in compare's order
    alone: tuple[float, ...]  # per head: m(A, that head patched from B) - m(A)
    together: float  # m(A, every head of `heads` patched from B) - m(A)
    total: float  # m(B) - m(A)

    @property
    def share(self) -> float | None:
        """`together` over `total`: the share of the difference the heads' attention carries (None when
        the prompts do not differ in m)."""
        return self.together / self.total if self.total != 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads],
            "alone": list(self.alone),
            "together": self.together,
            "total": self.total,
            "share": self.share,
        }


def patch_heads(a: Traced, b: Traced, heads: Sequence[tuple[int, int]], pair: Contrast) -> Patching:
    """Steps 1-3 of the module docstring for `heads` of prompt A, patched from prompt B."""
    m_a = pair.metric(a.trace.last_logits.float())
    m_b = pair.metric(b.trace.last_logits.float())

    def patched(which: Sequence[tuple[int, int]]) -> float:
        ivs: list[Intervention] = [PatchAttention(frozenset(which), b.trace), FreezeAttention()]
        res = run_with(a.model, a.saes, a.trace.tokens, ivs, clean=a.trace, last_only=True)
        return pair.metric(res.logits[-1].float()) - m_a

    alone = tuple(patched([h]) for h in heads)
    together = patched(heads) if len(heads) > 1 else (alone[0] if heads else 0.0)
    out = Patching(tuple((int(ly), int(h)) for ly, h in heads), alone, together, m_b - m_a)
    log.info("compare: %d heads patched from B into A move m by %+.3f of %+.3f", len(heads), out.together, out.total)
    return out
