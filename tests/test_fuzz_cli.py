"""Property-based: every CLI command, started from valid arguments with one argument replaced by a bad,
huge or ill-typed value, ends in exit status 2 with one line on stderr (no traceback, nothing on stdout),
in bounded time, and leaves every existing file in the output folder byte for byte as it was. Values
that could make an unbounded allocation run again in a subprocess under a memory limit."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qktrace.cli import main
from qktrace.config import LIMITS, parse_bytes, parse_device, parse_dtype, parse_scales
from qktrace.errors import QKTraceError
from qktrace.saes import save_sae_lens
from qktrace.testing import random_saes

PROMPT = "Aunt Sally is the"  # 5 tokens with BOS
N_POS, N_LAYERS, N_HEADS, D_SAE = 5, 2, 4, 40
FUZZ = settings(
    max_examples=int(os.environ.get("QKTRACE_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def world(tiny_paths, tmp_path_factory):
    """The tiny llama, SAEs at every checkpoint, an output folder holding files that must survive."""
    model = tiny_paths["llama"]
    root = tmp_path_factory.mktemp("fuzz_cli")
    shape = SimpleNamespace(d_model=32, n_layers=N_LAYERS)
    saes = random_saes(shape, "topk", d_sae=D_SAE, k=5, std=(1.0, 0.0, 0.3, 0.0), tied=True, apply_b_dec_to_input=True)
    for c, sae in saes.items():
        save_sae_lens(sae, root / "saes" / f"blocks.{c}.hook_resid_pre")
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    for name, data in {
        "g.json": b'{"old": "graph"}',
        "p.png": b"old plot",
        "h.png": b"old heads",
        "keep.txt": b"x",
        "corpus.jsonl": b'{"text": "Aunt Sally is the w1 of w2"}\n{"text": "the Uncle Bob , w3 w4"}\n',
        "prompts.jsonl": b'{"prompt": "Aunt Sally is the Aunt"}\n',
        "empty.jsonl": b"",
        "bad.jsonl": b'{"prompt": 3}\n{"text": "no prompt"}\n',
    }.items():
        (out / name).write_bytes(data)
    from qktrace.tracer import Tracer

    acts = Tracer.load(model, root / "saes").run(PROMPT).acts(1)
    active = int(acts.feature[acts.pos == 2][0])
    return {"M": str(model), "S": str(root / "saes"), "OUT": out, "F": active}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def base_args(w) -> dict[str, dict[str, str | list[str]]]:
    """Valid arguments of every command (serve and demo are only ever run with a bad one)."""
    out, m, s = w["OUT"], w["M"], w["S"]
    common = {"--device": "cpu", "--dtype": "float32"}
    return {
        "qk": {"": m, "--saes": s, "--prompt": PROMPT, "--layer": "1", "--head": "0", "--top": "5", **common},
        "graph": {
            "": m,
            "--saes": s,
            "--prompt": PROMPT,
            "--out": str(out / "g.json"),
            "--max-nodes": "20",
            "--node-threshold": "0.8",
            "--max-memory": "1GB",
            **common,
        },
        "steer": {
            "": m,
            "--saes": s,
            "--prompt": PROMPT,
            "--layer": "1",
            "--feature": str(w["F"]),
            "--positions": "2",
            "--heads": "2",
            "--scales": "0,1",
            "--plot": str(out / "p.png"),
            "--watch": ["Sally"],
            "--watch-attn": ["1,2,4,2"],
            **common,
        },
        "heads": {"": m, "--top": "3", "--sort": "induction", "--plot": str(out / "h.png"), **common},
        "info": {"": m, "--saes": s, "--sae-ids": "blocks.1.hook_resid_pre", **common},
        "serve": {"": str(out), "--port": "8123", "--max-tokens": "64", "--max-memory": "1GB", **common},
        "demo": {"--out": str(out / "demo"), "--port": "8124", **common},
        "dashboards": {
            "": m,
            "--saes": s,
            "--corpus": str(out / "corpus.jsonl"),
            "--out": str(out / "dash"),
            "--workers": "1",
            "--seq-len": "16",
            "--max-docs": "2",
            **common,
        },  # fmt: skip
        "batch": {
            "": m,
            "--saes": s,
            "--prompts": str(out / "prompts.jsonl"),
            "--out": str(out / "batch"),
            "--workers": "1",
            "--max-nodes": "20",
            **common,
        },  # fmt: skip
    }


def argv_of(command: str, args: dict[str, str | list[str]]) -> list[str]:
    argv = [command]
    for k, v in args.items():
        for x in v if isinstance(v, list) else [v]:
            argv += [x] if k == "" else [k, x]
    return argv


# -- bad values ------------------------------------------------------------------------------------------


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
        return True
    except ValueError:
        return False


def _refused(parse, s) -> bool:  # type: ignore[no-untyped-def]
    try:
        parse(s)
    except (QKTraceError, ValueError, TypeError):
        return True
    return False


huge = st.integers(min_value=10**6, max_value=10**40)
not_int = st.one_of(
    st.sampled_from(["1.5", "0x10", "nan", "", " ", "1e3", "--", "½", "None", "[1]"]),
    st.text(max_size=12).filter(lambda s: not _is_int(s) and not s.startswith("-")),
)


def ints_outside(lo: int, hi: int) -> st.SearchStrategy[str]:
    """Integers outside lo..hi (and non-integers), as argv text."""
    out = st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1), huge, huge.map(lambda x: -x))
    return st.one_of(out.map(str), not_int)


surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
bad_prompt = st.one_of(
    st.text(alphabet=" \t\n\r\x0b\x0c", max_size=5),
    st.tuples(st.text(max_size=8), surrogate, st.text(max_size=8)).map("".join),
    st.tuples(st.sampled_from(["Aunt ", "w1 "]), st.just("\x00"), st.just(" Sally")).map("".join),
)
bad_scales = st.one_of(
    st.tuples(st.integers(-5, 5), st.integers(-5, 5), st.integers(LIMITS.max_scales + 1, 10**15)).map(
        lambda t: f"{t[0]}:{t[1]}:{t[2]}"
    ),
    st.integers(max_value=0).map(lambda n: f"0:1:{n}"),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0,nan", "1,2,inf", "", ",", "1e5", "0:1e9:3", "0:1", "a:b:c"]),
    st.lists(st.floats(-3, 3), min_size=LIMITS.max_scales + 1, max_size=200).map(lambda v: ",".join(map(str, v))),
    st.text(max_size=10).filter(lambda s: _refused(parse_scales, s)),
)
bad_positions = st.one_of(
    ints_outside(-N_POS, N_POS - 1),
    st.integers(0, N_POS - 1).map(lambda p: f"{p},{p}"),
    st.integers(0, N_POS - 1).map(lambda p: f"{p},{p - N_POS}"),
    st.sampled_from(["5:5", "9:", "1:2:3", "a", "", ",", "1,,2", "0," * 5000 + "0"]),
)
bad_heads = st.one_of(
    st.integers(0, N_HEADS - 1).map(lambda h: f"{h},{h}"),
    st.integers(N_HEADS, 10**30).map(str),
    st.sampled_from(["-1", "", ",", "a", "1,,2", ",".join(["0"] * (LIMITS.max_heads + 1))]),
)
bad_out = st.sampled_from(["@OUT", "@OUT/missing/x.json", "@OUT/keep.txt/x.json", "@OUT/sub", ""])
bad_device = st.one_of(
    st.sampled_from(["gpu", "cuda:99", "tpu", "", "cpu:0:1", "mps", "cuda:-1", "meta", "CPU0"]),
    st.text(max_size=8).filter(lambda s: _refused(parse_device, s) and not s.startswith("-")),
)
bad_dtype = st.one_of(
    st.sampled_from(["int8", "float64", "fp8", "", "Float32", "torch.float32", "double"]),
    st.text(max_size=8).filter(lambda s: _refused(parse_dtype, s) and not s.startswith("-")),
)
bad_memory = st.one_of(
    st.sampled_from(["0", "0GB", "1e400", "2PB", "abc", "1.5.5GB", "GB", "1KiBB", "", "nan", "inf", "1 GB B"]),
    st.text(max_size=8).filter(lambda s: _refused(parse_bytes, s) and not s.startswith("-")),
)
bad_fraction = st.one_of(
    st.sampled_from(["nan", "inf", "0", "1.01", "abc", "1e400", "", "0.0"]),
    st.floats(min_value=1.0001, allow_nan=False).map(repr),
    st.floats(max_value=0.0, allow_nan=False).map(repr),
)
bad_watch = st.one_of(
    st.sampled_from(["Aunt Sally", "w1 w2", "", "   "]).map(lambda t: [t]),
    st.just(["Sally"] * (LIMITS.max_watch_tokens + 1)),
)
bad_watch_attn = st.one_of(
    st.sampled_from(["1,2", "1,2,3", "a,b,c,d", "", "1,2,3,4,5", "9,0,0,0", "1,9,0,0", "1,2,9,0", "1,2,0,-9"]).map(
        lambda t: [t]
    ),
    st.just(["1,2,4,2"] * (LIMITS.max_watch_attention + 1)),
)

BAD = {
    "": st.sampled_from(["@OUT/no-model", "@OUT/keep.txt"]),
    "--saes": st.sampled_from(["@OUT/no-saes", "@OUT/keep.txt"]),
    "--sae-ids": st.sampled_from(["blocks.9.hook_resid_pre", "nonsense", ",", "blocks.1.hook_resid_pre,x"]),
    "--prompt": bad_prompt,
    "--layer": ints_outside(0, N_LAYERS - 1),
    "--head": ints_outside(0, N_HEADS - 1),
    "--top": ints_outside(1, LIMITS.max_top),
    "--out": bad_out,
    "--plot": bad_out,
    "--max-nodes": ints_outside(1, LIMITS.max_graph_nodes).filter(lambda s: s.strip().lower() != "none"),  # no cap
    "--node-threshold": bad_fraction,
    "--max-memory": bad_memory,
    "--device": bad_device,
    "--dtype": bad_dtype,
    "--feature": ints_outside(0, D_SAE - 1),
    "--positions": bad_positions,
    "--heads": bad_heads,
    "--scales": bad_scales,
    "--watch": bad_watch,
    "--watch-attn": bad_watch_attn,
    "--sort": st.text(max_size=10).filter(lambda s: s not in ("induction", "prev_token", "duplicate", "qk_skew")),
    "--port": ints_outside(1, 65535),
    "--max-tokens": st.one_of(st.integers(max_value=0).map(str), not_int),
}
SERVE_BAD = {**BAD, "": st.sampled_from(["@OUT/no-dir", "@OUT/keep.txt/x"])}


def run_cli(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def check_refused(w, command: str, key: str, value: object, bases=base_args) -> None:  # type: ignore[no-untyped-def]
    out = w["OUT"]

    def sub(v: str) -> str:
        for name in ("OUT", "T", "A", "S"):
            v = v.replace(f"@{name}", str(w.get(name, f"@{name}")))
        return v

    value = [sub(v) for v in value] if isinstance(value, list) else sub(str(value))
    args = bases(w)[command] | {key: value}
    before = snapshot(out)
    with pytest.MonkeyPatch.context() as mp:  # if a bad value were accepted, these must not block the test
        mp.setattr("uvicorn.run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the server started")))
        mp.setattr("qktrace.demo.run.run_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("demo ran")))
        code, stdout, stderr, seconds = run_cli(argv_of(command, args))
    case = f"{command} {key}={value!r:.200}"
    assert code == 2, f"{case}: exit {code}, stderr {stderr!r:.400}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qktrace: error: "), f"{case}: {stderr!r:.400}"
    assert "Traceback" not in stderr and stdout == "", case
    assert seconds < 60, f"{case}: {seconds:.1f} s"
    assert snapshot(out) == before, f"{case} changed the output folder"


def _fuzz(command: str, bad: dict[str, st.SearchStrategy[object]]):  # type: ignore[no-untyped-def]
    @FUZZ
    @given(data=st.data())
    def test(world, data):  # type: ignore[no-untyped-def]
        key = data.draw(st.sampled_from([k for k in base_args(world)[command] if k in bad]), label="argument")
        check_refused(world, command, key, data.draw(bad[key], label="value"))

    return test


test_fuzz_qk = _fuzz("qk", BAD)
test_fuzz_graph = _fuzz("graph", BAD)
test_fuzz_steer = _fuzz("steer", BAD)
test_fuzz_heads = _fuzz("heads", BAD)
test_fuzz_info = _fuzz("info", BAD)
test_fuzz_serve = _fuzz("serve", SERVE_BAD)
test_fuzz_demo = _fuzz("demo", {**BAD, "--out": st.sampled_from(["@OUT/keep.txt", "@OUT/keep.txt/x", ""])})
SCALE_BAD = {
    **BAD,
    "--out": st.sampled_from(["@OUT/keep.txt", "@OUT/keep.txt/x", "", "@OUT"]),  # @OUT: the user's files
    "--corpus": st.sampled_from(["@OUT/no-corpus", "@OUT/keep.txt/x", "", "@OUT/empty.jsonl"]),
    "--prompts": st.sampled_from(["@OUT/no-prompts", "@OUT/keep.txt", "@OUT/empty.jsonl", "@OUT/bad.jsonl", ""]),
    "--workers": st.one_of(st.integers(max_value=0).map(str), st.integers(min_value=4097).map(str), not_int),
    "--seq-len": st.one_of(st.integers(max_value=1).map(str), not_int),
    # "none" is --max-docs's own default (every document), spelt out
    "--max-docs": st.one_of(st.integers(max_value=0).map(str), not_int.filter(lambda s: s.strip().lower() != "none")),
}
test_fuzz_dashboards = _fuzz("dashboards", SCALE_BAD)
test_fuzz_batch = _fuzz("batch", SCALE_BAD)


# -- the transcoder flags: --transcoders, --attention-saes, --feature-layer, --kind, compare's --prompt-b ---------

FUZZ_TC = settings(FUZZ, max_examples=int(os.environ.get("QKTRACE_FUZZ_EXAMPLES", "8")))  # each run loads a set


@pytest.fixture(scope="module")
def tc_world(world, tmp_path_factory):
    """`world`, a transcoder set of the tiny llama, attention SAEs of it, and a transcoder feature of layer 0
    active at the last position."""
    from qktrace.models import load_model
    from qktrace.testing import random_attention_saes, write_attention_saes, write_transcoder_set
    from qktrace.tracer import Tracer

    root = tmp_path_factory.mktemp("fuzz_cli_tc")
    ct = write_transcoder_set(root / "ct", 32, N_LAYERS)
    att = write_attention_saes(root / "att", random_attention_saes(load_model(world["M"]), ["z", "attn_out"]))
    x = Tracer.load(world["M"], transcoders=ct).run(PROMPT).writers().enc
    f = int(x.index[(x.layer == 0) & (x.pos == N_POS - 1)][0])
    return world | {"T": str(ct), "A": str(att), "F_TC": f}


def tc_args(w) -> dict[str, dict[str, str | list[str]]]:  # type: ignore[no-untyped-def]
    """Valid arguments of the commands that take transcoders (checked by `test_transcoder_bases_run`)."""
    m, t, a = w["M"], w["T"], w["A"]
    common = {"--device": "cpu", "--dtype": "float32"}
    return {
        "steer": {"": m, "--transcoders": t, "--attention-saes": a, "--prompt": PROMPT, "--layer": "1",
                  "--heads": "0", "--kind": "transcoder", "--feature-layer": "0", "--feature": str(w["F_TC"]),
                  "--positions": "-1", "--scales": "0,2", **common},
        "qk": {"": m, "--transcoders": t, "--attention-saes": a, "--prompt": PROMPT, "--layer": "1", "--head": "0",
               "--top": "5", **common},
        "compare": {"": m, "--transcoders": t, "--prompt-a": PROMPT, "--prompt-b": "Aunt Bob is the", "--top": "2",
                    **common},
    }  # fmt: skip


bad_coders = st.sampled_from(["@OUT/none", "@OUT/keep.txt", "@OUT/sub", "", "@S", "@OUT/corpus.jsonl"])
TC_BAD = {
    **BAD,
    "--transcoders": st.one_of(bad_coders, st.just("@A")),  # attention SAEs are not transcoders
    "--attention-saes": st.one_of(bad_coders, st.just("@T")),  # nor transcoders attention SAEs
    "--feature-layer": ints_outside(0, 0),  # below the heads' layer 1: only 0
    # "feature": a residual-SAE feature takes no --feature-layer; none are loaded
    "--kind": st.one_of(st.just("feature"), st.text(max_size=10).filter(lambda s: s not in ("transcoder", "attn"))),
    "--feature": ints_outside(0, 47),  # the set's width is 48
    "--prompt-a": bad_prompt,
    "--prompt-b": st.one_of(bad_prompt, st.just("w1 " * 3000), st.just("Aunt Sally")),  # too long; not aligned
}


def test_transcoder_bases_run(tc_world):
    """The valid arguments the transcoder fuzzing starts from do run (so a refusal is the bad value's)."""
    for command, args in tc_args(tc_world).items():
        code, _, stderr, _ = run_cli(argv_of(command, args))
        assert code == 0, (command, stderr[-400:])


def _fuzz_tc(command: str):  # type: ignore[no-untyped-def]
    @FUZZ_TC
    @given(data=st.data())
    def test(tc_world, data):  # type: ignore[no-untyped-def]
        key = data.draw(st.sampled_from([k for k in tc_args(tc_world)[command] if k in TC_BAD]), label="argument")
        check_refused(tc_world, command, key, data.draw(TC_BAD[key], label="value"), bases=tc_args)

    return test


test_fuzz_steer_transcoders = _fuzz_tc("steer")
test_fuzz_qk_transcoders = _fuzz_tc("qk")
test_fuzz_compare_transcoders = _fuzz_tc("compare")


# -- what could allocate without bound, under a memory limit ----------------------------------------------

HUGE_CASES = [
    ["steer", "--scales", "0:1:100000000"],
    ["steer", "--scales", "0:1:" + "9" * 4000],
    ["steer", "--positions", ",".join(["1"] * 200_000)],
    ["steer", "--heads", ",".join(["1"] * 200_000)],
    ["steer", "--positions", "0:" + "9" * 30],
    ["steer", "--feature", "9" * 30],
    ["qk", "--top", "9" * 30],
    ["qk", "--layer", "9" * 30],
    ["qk", "--key-pos", "9" * 30],
    ["graph", "--max-nodes", "9" * 30],
    ["graph", "--max-memory", "9" * 30 + "TB"],
]


def test_huge_values_are_refused_in_bounded_memory(world):
    """Each case in one subprocess capped at 3 GiB of address space: refused (exit 2, one line), quickly."""
    w = base_args(world)
    cases = [argv_of(c[0], w[c[0]] | {c[1]: c[2]}) for c in HUGE_CASES]
    script = textwrap.dedent(
        f"""
        import contextlib, io, json, resource, sys, time
        sys.path.insert(0, {SRC!r})
        import torch, transformers  # what every command imports, before the cap
        from qktrace.cli import main
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        results = []
        for argv in json.loads(sys.stdin.read()):
            err = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(argv)
            results.append((code, err.getvalue(), time.perf_counter() - start))
        print(json.dumps(results))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (code, err, seconds) in zip(HUGE_CASES, results):
        assert code == 2 and len(err.strip().splitlines()) == 1, (case[:2], err[:300])
        assert seconds < 30, (case[:2], seconds)


# -- hostile files: SAE folders, label exports, corpora, prompts -------------------------------------------


def _sae_folder(w, root: Path, kind: str, n: int) -> Path:  # type: ignore[no-untyped-def]
    """A copy of one saved SAE, made hostile in one way."""
    import shutil

    folder = root / "blocks.1.hook_resid_pre"
    shutil.copytree(Path(w["S"]) / "blocks.1.hook_resid_pre", folder)
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    if kind == "cfg-fifo":
        cfg_path.unlink()
        os.mkfifo(cfg_path)
    elif kind == "cfg-devzero":
        cfg_path.unlink()
        cfg_path.symlink_to("/dev/zero")
    elif kind == "weights-devzero":
        (folder / "sae_weights.safetensors").unlink()
        (folder / "sae_weights.safetensors").symlink_to("/dev/zero")
    elif kind == "npz-header-lie":  # a Gemma Scope npz whose header states a huge width, holding a few bytes
        import zipfile

        npz = root / "layer_1" / "width_16k" / "average_l0_9" / "params.npz"
        npz.parent.mkdir(parents=True)
        header = {"descr": "<f4", "fortran_order": False, "shape": (32, 10 ** (5 + n))}
        import numpy as np

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as z:
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                z.writestr(f"{name}.npy", buf.getvalue() + b"\0" * 64)
        shutil.rmtree(folder)
        return root
    elif kind == "npz-shapes-disagree":  # W_dec's stated shape is not W_enc's transpose
        import numpy as np

        npz = root / "layer_1" / "width_16k" / "average_l0_9" / "params.npz"
        npz.parent.mkdir(parents=True)
        d = 32
        arrays = {"W_enc": np.zeros((d, D_SAE), "f4"), "W_dec": np.zeros((D_SAE + n, d), "f4"),
                  "b_enc": np.zeros(D_SAE, "f4"), "b_dec": np.zeros(d, "f4"),
                  "threshold": np.zeros(D_SAE, "f4")}  # fmt: skip
        np.savez(npz, **arrays)
        shutil.rmtree(folder)
        return root
    else:
        edits = {
            "d_sae-huge": {"d_sae": 10 ** (300 + 50 * n)},
            "width-lie": {"d_sae": D_SAE * (n + 1)},
            "layer-digits": {"metadata": cfg["metadata"] | {"hook_name": f"blocks.{'7' * (1000 * n)}.hook_resid_pre"}},
            "norm-overflow": {"normalize_activations": "expected_average_only_in",
                              "norm_scaling_factor": 10.0 ** (38 + n)},
            "non-finite": {"norm_scaling_factor": "@INF"},
            "deeply-nested": {"metadata": "@DEEP"},
        }  # fmt: skip
        text = json.dumps(cfg | edits[kind]).replace('"@INF"', "1e999").replace('"@DEEP"', "[" * 10**5 + "]" * 10**5)
        cfg_path.write_text(text)
    return folder


SAE_KINDS = ["cfg-fifo", "cfg-devzero", "weights-devzero", "npz-header-lie", "npz-shapes-disagree",
             "d_sae-huge", "width-lie", "layer-digits",
             "norm-overflow", "non-finite", "deeply-nested"]  # fmt: skip


@FUZZ
@given(kind=st.sampled_from(SAE_KINDS), n=st.integers(1, 3))
def test_fuzz_hostile_sae_files(world, tmp_path_factory, kind, n):
    """An SAE folder that is a FIFO, a link to /dev/zero, a lying header, an overflowing constant or an odd
    number: one line (exit 2), at once, never a hang or a read without bound."""
    folder = _sae_folder(world, tmp_path_factory.mktemp("sae"), kind, n)
    check_refused(world, "info", "--saes", str(folder))


def _export(root: Path, kind: str, n: int) -> Path:
    import gzip

    record = {"modelId": "", "layer": "1-res", "index": "3", "description": "a label"}
    path = root / ("labels.jsonl.gz" if kind == "gzip-bomb" else "labels.jsonl")
    if kind == "gzip-bomb":  # inflates past the (lowered) bound: refused before it is read whole
        path.write_bytes(gzip.compress(b" " * ((2 + n) << 20)))
        return path
    if kind == "index-superscript":
        record["index"] = "²" * n
    elif kind == "index-digits":
        record["index"] = "9" * (1000 * n)
    elif kind == "modelId-number":
        record["modelId"] = 10**n  # type: ignore[assignment]
    text = json.dumps(record)
    if kind == "deeply-nested":
        text = "[" * (10**4 * n) + "]" * (10**4 * n)
    path.write_text(text + "\n")
    return path


@FUZZ
@given(kind=st.sampled_from(["gzip-bomb", "index-superscript", "index-digits", "modelId-number", "deeply-nested"]),
       n=st.integers(1, 3))  # fmt: skip
def test_fuzz_hostile_label_exports(world, tmp_path_factory, kind, n):
    path = _export(tmp_path_factory.mktemp("labels"), kind, n)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qktrace.saes.labels.MAX_EXPORT_BYTES", 1 << 20)
        check_refused(world, "info", "--labels", str(path))


def _lines_file(root: Path, kind: str, n: int, field: str) -> Path:
    """A JSONL corpus or prompts file whose line 2 is hostile."""
    path = root / "f.jsonl"
    good = json.dumps({field: "Aunt Sally is the", "answer": " Aunt"} if field == "prompt" else {field: "w1 w2"})
    bad = {
        "huge-line": b'{"%s": "' % field.encode() + b"w" * ((1 << 20) + n) + b'"}',
        "invalid-utf8": b'{"%s": "\xff\xfe"}' % field.encode(),
        "lone-surrogate": b'{"%s": "\\ud800 x"}' % field.encode(),
        "deeply-nested": b"[" * (10**4 * n) + b"]" * (10**4 * n),
        "answer-is-rival": b'{"prompt": "Aunt Sally is the", "answer": " Aunt", "rival": " Aunt"}',
        "multi-token-answer": b'{"prompt": "Aunt Sally is the", "answer": " Aunt Sally is"}',
    }
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "sparse":  # one line of zeros, no newline, bigger than the bound: read no further than it
        with path.open("wb") as f:
            f.truncate((8 << 20) * n)
    elif kind == "compressed":
        import gzip

        path.write_bytes(gzip.compress((good + "\n" + good + "\n").encode()))
    else:
        path.write_bytes(good.encode() + b"\n" + bad[kind] + b"\n")
    return path


LINE_KINDS = ["huge-line", "invalid-utf8", "lone-surrogate", "deeply-nested", "fifo", "sparse", "compressed"]


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_corpora_and_prompts(world, tmp_path_factory, data):
    """A corpus or prompts file with a line past the bound, bad bytes, a lone surrogate, deep nesting, a FIFO,
    a sparse or gzipped file, or (prompts) an answer that is its rival or several tokens: one line naming
    the line where there is one, before any work; the user's folder untouched."""
    command = data.draw(st.sampled_from(["dashboards", "batch"]), label="command")
    extra = ["answer-is-rival", "multi-token-answer"] if command == "batch" else []
    kind = data.draw(st.sampled_from(LINE_KINDS + extra), label="kind")
    field, flag = ("prompt", "--prompts") if command == "batch" else ("text", "--corpus")
    path = _lines_file(tmp_path_factory.mktemp("lines"), kind, data.draw(st.integers(1, 2), label="n"), field)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qktrace.jobs.corpus.MAX_LINE_BYTES", 1 << 20)
        check_refused(world, command, flag, str(path))
    out_folder = base_args(world)[command]["--out"]
    assert not Path(str(out_folder)).exists() or kind not in ("fifo", "sparse"), "work started"


def test_explain_refuses_one_file_for_out_and_plot(world):
    out = world["OUT"]
    argv = [world["M"], "--saes", world["S"], "--prompt", PROMPT, "--answer", " Sally", "--device", "cpu"]
    before = snapshot(out)
    code, stdout, stderr, _ = run_cli(["explain", *argv, "--out", str(out / "g.json"), "--plot", str(out / "g.json")])
    assert code == 2 and "both name" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    code, _, stderr, _ = run_cli(["explain", *argv, "--answer", " Sally" * 20_000])
    assert code == 2 and len(stderr) < 500, stderr[:600]
    assert snapshot(out) == before
