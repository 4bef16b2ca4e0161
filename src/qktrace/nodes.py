"""The one place that knows how graph nodes are identified, written and parsed.

A node is typed and positioned: (kind, checkpoint, pos, index). Its id is a '/'-joined string with a
prefix per field, so ids never collide and always parse back:

    token/c0/p5/t412        the embedding of token 412 at position 5 (checkpoint 0)
    feature/c3/p5/f1234     SAE feature 1234 at checkpoint 3, position 5
    error/c3/p5             the SAE reconstruction error at checkpoint 3, position 5
    sae_bias/c3/p5          the SAE decoder bias at checkpoint 3, position 5
    attn_bias/c3/p5         layer 2's attention output biases (b_O, and b_V through the pattern), at checkpoint 3
    mlp_bias/c3/p5          what layer 2's MLP writes when its input carries only constants, at checkpoint 3
    logit/c4/p9/t77         the logit of token 77 at the last position (checkpoint = n_layers)
    head_bias/c3/p5         a QK component, not a graph node: the constant part of one head's query or
                            key at position 5 of layer 3 (the norm's bias through W_Q/W_K, plus b_Q/b_K)
    transcoder/l2/p5/f12    transcoder feature 12 read at layer 2's MLP input, position 5 (writes layer 2's
                            MLP output, and later layers' for a cross-layer transcoder)
    mlp_error/l2/p5         layer 2's MLP output minus its transcoder reconstruction at position 5
    attn_out/l2/p5          a QK component of transcoder graphs, not a graph node: attention layer 2's whole
                            output at position 5 (every head, its biases, the post-attention norm)
    tc_bias/l2/p5           a QK component: layer 2's transcoder decoder bias plus its skip term at position 5
    pos_embed/c0/p5         a QK component: the learned position embedding at position 5 (GPT-2)
    attn/l2/p5/f12          attention-output SAE feature 12 of layer 2 at position 5 (reads layer 2's attention
                            output, at hook_z or after W_O; writes it)
    attn_error/l2/p5        layer 2's attention output minus its attention SAE's reconstruction at position 5
    attn_sae_bias/l2/p5     a QK component of checkpointed graphs: layer 2's attention SAE decoder bias and the
                            layer's output bias, as written into the residual at position 5

Checkpoint c is the residual stream at the input of layer c; c = n_layers is the final residual.
Transcoder and attention-SAE nodes belong to a layer's MLP or attention, not to a checkpoint: their ids write
`l{layer}` and `Node.layer` reads it (the number is stored in the `checkpoint` field; `TRANSCODER_FEATURE_TYPES`
gives their circuit-tracer / Neuronpedia feature types).
A *positionless* id drops the position (`feature/c3/f1234`, `error/c3`): the same feature at any position.

Tensors of many nodes store a kind as an integer: `CODE[kind]` writes it, `KINDS[code]` reads it back.
`describe(node)` says in words what a node without a feature label is ("SAE error at checkpoint 3").
`component_label(node, token, label)` is the one way a component is named to a reader, by the library, the CLI,
the server and the page alike (web/static/names.js mirrors `KIND_NAMES` and `visible`): a feature's own label
and its kind's short name, then its position and token with whitespace made visible: `Sally (c3/f12) @8 "␣Sally"`,
`SAE bias c3 @8 "␣Sally"`.
How nodes are written for circuit-tracer and Neuronpedia (feature numbers, feature types) is
`qktrace.graph.formats`; it builds and reads every id through this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import InputError, quoted


class Kind(str, Enum):
    TOKEN = "token"
    FEATURE = "feature"
    ERROR = "error"
    SAE_BIAS = "sae_bias"
    ATTN_BIAS = "attn_bias"
    MLP_BIAS = "mlp_bias"
    LOGIT = "logit"
    HEAD_BIAS = "head_bias"
    TRANSCODER = "transcoder"
    MLP_ERROR = "mlp_error"
    ATTN_OUT = "attn_out"
    TC_BIAS = "tc_bias"
    POS_EMBED = "pos_embed"
    ATTN_FEATURE = "attn"
    ATTN_ERROR = "attn_error"
    ATTN_SAE_BIAS = "attn_sae_bias"


KINDS: tuple[Kind, ...] = tuple(Kind)
CODE: dict[Kind, int] = {kind: i for i, kind in enumerate(KINDS)}
# no edge enters these
LEAF_KINDS = (Kind.ERROR, Kind.SAE_BIAS, Kind.ATTN_BIAS, Kind.MLP_BIAS, Kind.MLP_ERROR, Kind.ATTN_ERROR)
LAYERED_KINDS = (
    Kind.TRANSCODER,
    Kind.MLP_ERROR,
    Kind.ATTN_OUT,
    Kind.TC_BIAS,
    Kind.ATTN_FEATURE,
    Kind.ATTN_ERROR,
    Kind.ATTN_SAE_BIAS,
)  # numbered by layer (`l2`), not by checkpoint
# attention features: Neuronpedia's types for attention-layer features and their error ("lorsa", "lorsa error")
TRANSCODER_FEATURE_TYPES = {
    Kind.TRANSCODER: "cross layer transcoder",
    Kind.MLP_ERROR: "mlp reconstruction error",
    Kind.ATTN_FEATURE: "lorsa",
    Kind.ATTN_ERROR: "lorsa error",
}


_INDEXED = {Kind.TOKEN: "t", Kind.FEATURE: "f", Kind.LOGIT: "t", Kind.TRANSCODER: "f", Kind.ATTN_FEATURE: "f"}
# numbers of at most 18 digits (int64): a 5,000-digit feature is no node id, refused like any other non-id
_PATTERN = re.compile(
    r"^(?P<kind>[a-z_]+)/(?P<cl>[cl])(?P<c>\d{1,18})/p(?P<p>\d{1,18})(?:/(?P<tag>[ft])(?P<i>\d{1,18}))?$"
)
_POSITIONLESS = re.compile(r"^(?P<kind>[a-z_]+)/(?P<cl>[cl])(?P<c>\d{1,18})(?:/(?P<tag>[ft])(?P<i>\d{1,18}))?$")


def _prefix(kind: Kind) -> str:
    return "l" if kind in LAYERED_KINDS else "c"


@dataclass(frozen=True, order=True)
class Node:
    kind: Kind
    checkpoint: int
    pos: int
    index: int = -1  # feature id (FEATURE, TRANSCODER, ATTN_FEATURE), token id (TOKEN, LOGIT), else -1

    @property
    def layer(self) -> int:
        """The layer of a transcoder, attention-SAE or error node (the layer whose MLP or attention it reads)."""
        return self.checkpoint

    @property
    def id(self) -> str:
        base = f"{self.kind.value}/{_prefix(self.kind)}{self.checkpoint}/p{self.pos}"
        tag = _INDEXED.get(self.kind)
        return f"{base}/{tag}{self.index}" if tag else base

    def __str__(self) -> str:
        return self.id

    @staticmethod
    def parse(node_id: str) -> Node:
        m = _PATTERN.match(node_id)
        try:
            kind = Kind(m.group("kind")) if m else None
        except ValueError:
            kind = None
        if m is None or kind is None or (m.group("tag") or None) != _INDEXED.get(kind) or m["cl"] != _prefix(kind):
            raise InputError(
                f"{quoted(node_id)} is not a node id: expected e.g. 'feature/c3/p5/f1234' or 'error/c3/p5'"
            )
        return Node(kind, int(m.group("c")), int(m.group("p")), int(m.group("i")) if m.group("i") else -1)

    @property
    def positionless(self) -> str:
        """The id without the position: 'feature/c3/f1234', 'error/c3'."""
        tag = _INDEXED.get(self.kind)
        base = f"{self.kind.value}/{_prefix(self.kind)}{self.checkpoint}"
        return f"{base}/{tag}{self.index}" if tag else base


def parse_positionless(node_id: str) -> tuple[Kind, int, int]:
    """'feature/c3/f12' -> (FEATURE, 3, 12); 'error/c3' -> (ERROR, 3, -1). Full ids are accepted too."""
    m = _POSITIONLESS.match(node_id)
    if m is None:
        node = Node.parse(node_id)
        return node.kind, node.checkpoint, node.index
    try:
        kind = Kind(m.group("kind"))
    except ValueError:
        kind = None
    if kind is None or (m.group("tag") or None) != _INDEXED.get(kind) or m["cl"] != _prefix(kind):
        raise InputError(f"{quoted(node_id)} is not a node id: expected e.g. 'feature/c3/f1234' or 'error/c3'")
    return kind, int(m.group("c")), int(m.group("i")) if m.group("i") else -1


def positionless(node_id: str) -> str:
    """'feature/c3/p5/f12' -> 'feature/c3/f12'; 'error/c3/p5' -> 'error/c3' (positionless ids pass through)."""
    kind, checkpoint, index = parse_positionless(node_id)
    return Node(kind, checkpoint, 0, index).positionless


def describe(node: Node) -> str:
    """A node in words, for kinds without a label of their own: tokens, features and logits get theirs from
    the prompt, the SAE and the vocabulary."""
    c = node.checkpoint
    return {
        Kind.TOKEN: f"token at position {node.pos}",
        Kind.FEATURE: f"feature {node.index} at checkpoint {c}",
        Kind.ERROR: f"SAE error at checkpoint {c}",
        Kind.SAE_BIAS: f"SAE decoder bias at checkpoint {c}",
        Kind.ATTN_BIAS: f"attention bias of layer {c - 1}",
        Kind.MLP_BIAS: f"MLP bias of layer {c - 1}",
        Kind.LOGIT: f"logit of token {node.index}",
        Kind.HEAD_BIAS: f"head bias at layer {c} (norm bias through W_Q/W_K, plus b_Q/b_K)",
        Kind.TRANSCODER: f"transcoder feature {node.index} at layer {c}",
        Kind.MLP_ERROR: f"MLP error of layer {c} (its output minus the transcoder reconstruction)",
        Kind.ATTN_OUT: f"attention output of layer {c} (every head and its biases)",
        Kind.TC_BIAS: f"transcoder decoder bias and skip term of layer {c}",
        Kind.POS_EMBED: f"position embedding at position {node.pos}",
        Kind.ATTN_FEATURE: f"attention SAE feature {node.index} at layer {c}",
        Kind.ATTN_ERROR: f"attention error of layer {c} (its output minus the attention SAE reconstruction)",
        Kind.ATTN_SAE_BIAS: f"attention SAE decoder bias and output bias of layer {c}",
    }[node.kind]


def feature(checkpoint: int, pos: int, index: int) -> Node:
    return Node(Kind.FEATURE, checkpoint, pos, index)


def token(pos: int, token_id: int) -> Node:
    return Node(Kind.TOKEN, 0, pos, token_id)


def error(checkpoint: int, pos: int) -> Node:
    return Node(Kind.ERROR, checkpoint, pos)


def sae_bias(checkpoint: int, pos: int) -> Node:
    return Node(Kind.SAE_BIAS, checkpoint, pos)


def logit(checkpoint: int, pos: int, token_id: int) -> Node:
    return Node(Kind.LOGIT, checkpoint, pos, token_id)


def transcoder(layer: int, pos: int, index: int) -> Node:
    return Node(Kind.TRANSCODER, layer, pos, index)


def mlp_error(layer: int, pos: int) -> Node:
    return Node(Kind.MLP_ERROR, layer, pos)


def attn_feature(layer: int, pos: int, index: int) -> Node:
    return Node(Kind.ATTN_FEATURE, layer, pos, index)


def attn_error(layer: int, pos: int) -> Node:
    return Node(Kind.ATTN_ERROR, layer, pos)


def of_code(code: int, checkpoint: int, pos: int, index: int = -1) -> Node:
    """The node with integer kind `code` (see CODE): how node tables stored as tensors are read back."""
    return Node(KINDS[code], checkpoint, pos, index if KINDS[code] in _INDEXED else -1)


# the short name of a component without a label of its own; {c}: its checkpoint or layer, {l}: the layer
# before a checkpoint, {i}: its index. web/static/names.js holds the same table (tests/test_nodes.py checks).
KIND_NAMES: dict[Kind, str] = {
    Kind.TOKEN: "embedding",
    Kind.FEATURE: "c{c}/f{i}",
    Kind.ERROR: "SAE error c{c}",
    Kind.SAE_BIAS: "SAE bias c{c}",
    Kind.ATTN_BIAS: "attention bias L{l}",
    Kind.MLP_BIAS: "MLP bias L{l}",
    Kind.LOGIT: "logit t{i}",
    Kind.HEAD_BIAS: "head bias L{c}",
    Kind.TRANSCODER: "t{c}/f{i}",
    Kind.MLP_ERROR: "MLP error L{c}",
    Kind.ATTN_OUT: "attention output L{c}",
    Kind.TC_BIAS: "transcoder bias L{c}",
    Kind.POS_EMBED: "position embedding",
    Kind.ATTN_FEATURE: "a{c}/f{i}",
    Kind.ATTN_ERROR: "attention error L{c}",
    Kind.ATTN_SAE_BIAS: "attention SAE bias L{c}",
}
LABELLED_KINDS = (Kind.FEATURE, Kind.TRANSCODER, Kind.ATTN_FEATURE)  # their label is their SAE's
_MARKS = {" ": "\u2423", "\n": "\u23ce", "\t": "\u21e5"}  # ␣ ⏎ ⇥


def visible(text: str, spaces: bool = True) -> str:
    """Whitespace made visible: ⏎ newline (a label's written-out "\\n" too), ⇥ tab and, with `spaces`
    (tokens, not prose labels), ␣ space; ∅ for nothing."""
    out = str(text).replace("\\n", "\n")
    for ch, mark in _MARKS.items():
        if spaces or ch != " ":
            out = out.replace(ch, mark)
    return out if out.strip() else visible(out) if out else "\u2205"


def component_name(node: Node, label: str | None = None) -> str:
    """A component without its position: its kind's short name (`KIND_NAMES`: "SAE bias c3", "c3/f12"),
    after a feature's `label` (its SAE's; newlines and tabs made visible) when it has one, so that two
    features of one label stay apart: "name after title (c3/f12)"."""
    c = node.checkpoint
    name = KIND_NAMES[node.kind].format(c=c, l=c - 1, i=node.index)
    if label is not None and label.strip() and label.strip() != name and node.kind in LABELLED_KINDS:
        return f"{visible(label.strip(), spaces=False)} ({name})"
    return name  # (a label that is only the short name, as unlabelled features are written, is not repeated)


def component_label(node: Node, token: str, label: str | None = None) -> str:
    """The one way to name a component: `component_name`, then `@pos "token"` (whitespace visible), e.g.
    'Mary/John (c3/f12) @8 "␣Sally"' or 'SAE bias c0 @8 "␣Sally"'; never a Python repr."""
    return f"{component_name(node, label)} {position_text(node.pos, token)}"


def position_text(pos: int, token: str) -> str:
    """A position and its token as every label writes them: '@8 "␣Sally"'."""
    return f'@{pos} "{visible(token)}"'
