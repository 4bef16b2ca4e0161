"""The one label of a component (`qktrace.nodes.component_label`): label, kind and position as `@8 "…"`,
whitespace visible, never a Python repr; the page's names.js holds the same table of kind names, and the
library's QK tables use it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qktrace
from qktrace.nodes import KIND_NAMES, Kind, Node, component_label, component_name, visible

NAMES_JS = Path(qktrace.__file__).parent / "web" / "static" / "names.js"
REPR_POSITION = re.compile(r"@\d+'|@\d+ ?'.*'$")


@pytest.mark.parametrize(
    ("node_id", "token", "label", "expected"),
    [
        ("feature/c3/p8/f12", " Sally", "name after 'Mary'", "name after 'Mary' (c3/f12) @8 \"␣Sally\""),
        ("feature/c3/p8/f12", " Sally", None, 'c3/f12 @8 "␣Sally"'),
        ("feature/c3/p8/f12", " Sally", "  ", 'c3/f12 @8 "␣Sally"'),
        ("feature/c0/p2/f1", "\n", "\\n Quel", '⏎ Quel (c0/f1) @2 "⏎"'),
        ("sae_bias/c0/p8", " '", "ignored: not a feature", 'SAE bias c0 @8 "␣\'"'),
        ("error/c3/p5", "\t", None, 'SAE error c3 @5 "⇥"'),
        ("head_bias/c2/p0", "", None, 'head bias L2 @0 "∅"'),
        ("attn_bias/c3/p1", "a b", None, 'attention bias L2 @1 "a␣b"'),
        ("token/c0/p4/t9", " x", None, 'embedding @4 "␣x"'),
        ("transcoder/l2/p5/f7", "y", None, 't2/f7 @5 "y"'),
        ("transcoder/l2/p5/f7", "y", "writes y", 'writes y (t2/f7) @5 "y"'),
        ("mlp_error/l1/p3", "z", None, 'MLP error L1 @3 "z"'),
        ("attn/l1/p8/f15", "w", "a1/f15", 'a1/f15 @8 "w"'),  # a label that is only the short name: not twice
    ],
)
def test_component_label(node_id, token, label, expected):
    node = Node.parse(node_id)
    got = component_label(node, token, label)
    assert got == expected
    assert not REPR_POSITION.search(got) and "\\n" not in got and "\n" not in got
    assert got.startswith(component_name(node, label) + f" @{node.pos} ")


def test_every_kind_has_a_name_and_visible_marks():
    assert set(KIND_NAMES) == set(Kind)
    assert visible(" a\tb\nc") == "␣a⇥b⏎c" and visible("a b", spaces=False) == "a b"
    assert visible("") == "∅" and visible(" ", spaces=False) == "␣"


def test_page_names_are_the_librarys():
    """names.js's KIND_NAMES (the page's formatter) is the library's table, kind by kind."""
    text = NAMES_JS.read_text()
    block = re.search(r"export const KIND_NAMES = (\{.*?\});", text, re.S)
    assert block, "names.js lost its KIND_NAMES table"
    assert json.loads(block.group(1)) == {k.value: v for k, v in KIND_NAMES.items()}


def test_qk_tables_use_the_one_label(tiny_models):
    """QKAttribution's labels (the server's and the CLI's) are component_label's, for every term."""
    from qktrace import Tracer
    from qktrace.testing import random_prompt, random_saes

    model = tiny_models["llama"]
    saes = random_saes(model, "topk", seed=0)
    sae = saes[1]
    traced = Tracer(model, saes).run(random_prompt(8, 1))
    att = traced.qk(1, 0, -1)
    f = next(Node.parse(c).index for c in att.query.ids if Node.parse(c).kind is Kind.FEATURE)
    sae.labels[f] = "three\\n"  # a written-out newline becomes ⏎
    att = traced.qk(1, 0, -1)
    df = att.terms_frame(top=None)
    for comp, lab in zip([*df["query"], *df["key"]], [*df["query_label"], *df["key_label"]], strict=True):
        node = Node.parse(comp)
        tok = traced.str_tokens[node.pos]
        assert lab == component_label(node, tok, sae.labels.get(node.index) if node.kind is Kind.FEATURE else None)
        assert not REPR_POSITION.search(lab) and "\\n" not in lab
    assert any(x.startswith(f"three⏎ (c1/f{f}) @") for x in df["query_label"])


def test_page_formatter_writes_the_librarys_labels():
    """names.js's componentLabel, run by Node.js where it is installed, writes what component_label writes."""
    import shutil
    import subprocess

    node_js = shutil.which("node")
    if node_js is None:
        pytest.skip("Node.js is not installed")
    cases = [
        ("feature/c3/p8/f12", " Sally", "name after 'Mary'"),
        ("feature/c3/p8/f12", "\n", None),
        ("feature/c0/p2/f1", "\t x", "\\n Quel"),
        ("sae_bias/c0/p8", " '", "ignored"),
        ("attn_bias/c3/p1", "", None),
        ("transcoder/l2/p5/f7", "  ", "writes\ty"),
        ("attn/l1/p0/f3", "é", " "),
        ("mlp_error/l1/p3", "z", None),
        ("attn/l1/p8/f15", "w", "a1/f15"),
    ]
    nodes = [Node.parse(c) for c, _, _ in cases]
    parts = [{"kind": n.kind.value, "cp": n.checkpoint, "pos": n.pos, "index": n.index} for n in nodes]
    script = (
        f"import {{ componentLabel }} from {json.dumps(NAMES_JS.as_uri())};\n"
        f"const cases = {json.dumps([[p, lab, tok] for p, (_, tok, lab) in zip(parts, cases, strict=True)])};\n"
        "console.log(JSON.stringify(cases.map(([p, label, tok]) => componentLabel(p, label, tok))));"
    )
    out = subprocess.run([node_js, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    want = [component_label(n, tok, lab) for n, (_, tok, lab) in zip(nodes, cases, strict=True)]
    assert json.loads(out.stdout) == want


@pytest.mark.parametrize(
    "bad", ["feature/c3/p5/f" + "9" * 5000, "feature/c" + "1" * 19 + "/f2", "error/c3/p" + "7" * 400]
)
def test_a_node_id_with_a_huge_number_is_refused_in_one_short_line(bad):
    from qktrace.errors import InputError
    from qktrace.nodes import Node, parse_positionless

    for parse in (Node.parse, parse_positionless):
        with pytest.raises(InputError) as e:
            parse(bad)
        assert "is not a node id" in str(e.value) and len(str(e.value)) < 200 and "\n" not in str(e.value)
