"""What the model owns about tokens (as TransformerLens's `to_single_token` / `to_string` do), one rule each:

- `single_token(model, token, what)`: a string or an id -> one token id; the only vocabulary check of a
  single token (answers, rivals, graph targets, watched tokens).
- `to_string(model, ids, special_tokens=...)`: ids -> text; the only decoder (`Model.str_tokens` decodes
  each id alone through it).
- `resolve_positions(spec, n_pos, repeats=...)`: an int, list, slice or range -> prompt positions; the
  only position resolver (steering, the steering requests of the front ends, QK key positions).
- `Contrast`: the (answer, rival) pair that m = logit(answer) - logit(rival) compares, resolved once,
  with the default rival (the runner-up) and the "rival is the answer" check (as circuit-tracer's
  `AttributionTargets` resolves what a graph explains once).

`Model` exposes the first two as `Model.to_single_token` and `Model.to_string`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from ..errors import InputError, OutOfRangeError, check_index, quoted

if TYPE_CHECKING:
    from .model import Model

Positions = int | slice | range | Sequence[int]


def vocab_size(model: Model) -> int:
    """How many token ids name one token: ids below both the embedding's rows (a prompt token is looked up
    there) and the unembedding's columns (an answer is read there). A single token can be either (a
    watched token is an answer; a target is a logit), so it must be valid for both; in Hugging Face causal
    LMs both are `config.vocab_size`, and where a checkpoint pads one of them, the smaller is the bound."""
    return min(int(model.anatomy.W_E.shape[0]), int(model.anatomy.W_U.shape[1]))


MAX_TOKEN_CHARS = 1024  # longer than any token of any tokenizer


def single_token(model: Model, token: str | int, what: str = "token") -> int:
    """The one token id that `token` names: an id (any integer, e.g. 3920 or a numpy int) in
    0..vocab_size-1, or a string the tokenizer encodes to exactly one token without special tokens
    (' Paris', with its leading space). One line naming the value and the fix otherwise: InputError for
    text of several tokens (or none) and for other types, OutOfRangeError for ids outside the vocabulary."""
    n = vocab_size(model)
    if not isinstance(token, str):
        try:
            tid = operator.index(token) if not isinstance(token, bool) else None
        except TypeError:
            tid = None
        if tid is None:
            raise InputError(
                f"{what} {quoted(token)} is neither a token string nor a token id: give e.g. ' Paris' or 3920"
            )
        if not 0 <= tid < n:
            raise OutOfRangeError(f"{what} id {tid} is out of range: valid ids are 0..{n - 1}")
        return tid
    if model.tokenizer is None:
        raise InputError(f"model '{model.name}' has no tokenizer: give the {what} as a token id")
    if not token:
        raise InputError(f"{what} '' is empty: name a single token, e.g. ' the' (with its leading space)")
    if len(token) > MAX_TOKEN_CHARS:  # no token is this long: refused before the tokenizer sees it
        raise InputError(f"{what} {quoted(token)} is longer than any single token: name one token, e.g. ' the'")
    ids = [int(i) for i in model.tokenizer(token, add_special_tokens=False)["input_ids"]]
    if len(ids) != 1:
        pieces = list(model.str_tokens(ids[:8])) + (["..."] if len(ids) > 8 else [])
        hint = f"e.g. its first piece {pieces[0]!r}" if pieces else "e.g. ' the'"
        raise InputError(
            f"{what} {quoted(token)} is {len(ids)} tokens for this tokenizer {pieces}: name a single token, {hint}"
        )
    if not 0 <= ids[0] < n:
        raise OutOfRangeError(f"{what} {quoted(token)} is token id {ids[0]}, outside the model's vocabulary 0..{n - 1}")
    return ids[0]


def to_string(model: Model, ids: Sequence[int] | Tensor, *, special_tokens: bool) -> str:
    """The text of token ids, decoded as one sequence by the model's tokenizer.

    The rule for special tokens (BOS, EOS, padding) is the caller's, said at every call: `True` keeps them,
    so that the text shows every token the model read (a graph's prompt, `Model.str_tokens`, generated
    text); `False` leaves them out, giving the text a person typed (a mechanism's or a comparison's prompt).
    Without a tokenizer: each id as "<id>", separated by spaces."""
    flat = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids)]
    if model.tokenizer is None:
        return " ".join(f"<{i}>" for i in flat)
    return str(model.tokenizer.decode(flat, skip_special_tokens=not special_tokens))


def resolve_positions(
    spec: Positions, n_pos: int, *, repeats: Literal["merge", "refuse"] = "merge", what: str = "position"
) -> list[int]:
    """Prompt positions (non-negative) of an int, a list, a slice or a range; negative values count from the
    end. Each must lie in the prompt (OutOfRangeError naming it), and the spec must select something.

    Repeats, named by the caller: "merge" (the library's interventions: a set of positions, returned sorted,
    each once; a position steered twice is steered once) or "refuse" (what a person typed: a position given
    twice, e.g. 2 and -3 in a prompt of 5 tokens, is a slip; one line naming it; the given order is kept)."""
    if isinstance(spec, slice | range):
        raw = list(range(n_pos)[spec]) if isinstance(spec, slice) else list(spec)
    elif isinstance(spec, int):
        raw = [spec]
    else:
        raw = list(spec)
    if not raw:
        raise InputError(f"{what}s {spec!r} select nothing in a prompt of {n_pos} tokens: give at least one")
    out = [check_index(int(p), n_pos, what, allow_negative=True) for p in raw]
    if repeats == "merge":
        return sorted(set(out))
    if len(set(out)) < len(out):
        twice = next(p for p in out if out.count(p) > 1)
        raise InputError(f"{what} {twice} is given twice (negative positions count from the end): give each once")
    return out


def runner_up(logits: Tensor, answer_id: int) -> int:
    """The most likely token other than the answer: the default rival."""
    return next(int(t) for t in logits.float().argsort(descending=True).tolist() if int(t) != answer_id)


@dataclass(frozen=True)
class Contrast:
    """What m = logit(answer) - logit(rival) compares, resolved once: both token ids and their texts."""

    answer_id: int
    rival_id: int
    answer: str  # the answer token's text (`Model.str_tokens`)
    rival: str
    rival_given: bool  # False: the rival is the default, the runner-up of the logits it was resolved on

    @staticmethod
    def tokens(model: Model, answer: str | int, rival: str | int | None = None) -> tuple[int, int | None]:
        """(answer id, rival id or None): each a single token (`Model.to_single_token`), the rival not the
        answer. Cheap: callers check a pair with it before any forward pass."""
        a = single_token(model, answer, "answer")
        r = None if rival is None else single_token(model, rival, "rival")
        if r == a:
            raise InputError(f"the rival {rival!r} is the answer itself: name another token, or leave rival out")
        return a, r

    @classmethod
    def resolve(cls, model: Model, answer: str | int, rival: str | int | None, logits: Tensor) -> Contrast:
        """The pair for these last-position logits [vocab]: the rival defaults to their runner-up."""
        a, r = cls.tokens(model, answer, rival)
        rival_id = runner_up(logits, a) if r is None else r
        names = model.str_tokens([a, rival_id])
        return cls(a, rival_id, names[0], names[1], rival is not None)

    def metric(self, logits: Tensor) -> float:
        """m = logit(answer) - logit(rival) of logits [vocab], in float32."""
        return float(logits[self.answer_id].float() - logits[self.rival_id].float())
