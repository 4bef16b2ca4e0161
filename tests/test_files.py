"""Files qktrace writes and reads: nothing on disk is lost (atomic replace, exclusive temp files, a kill
mid-write leaves the old file), output paths are refused before any work, and graph files cannot make
the reader allocate more than their content (numbers bounded, deep nesting and bad bytes one line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qktrace import files
from qktrace.errors import GraphFileError, InputError
from qktrace.graph import Graph, load_graph
from qktrace.graph.graph import GraphNode
from qktrace.nodes import Kind, Node

SRC = str(Path(files.__file__).resolve().parents[1])


def small_graph(n_links: int = 3, top: int = 2) -> Graph:
    nodes = tuple(GraphNode(Node(Kind.TOKEN, 0, p, 5 + p), None, 1.0, 1.0, f"tok{p}") for p in range(n_links + 1)) + (
        GraphNode(Node(Kind.LOGIT, 2, n_links, 7), 3.0, 1.0, 1.0, "logit", token_prob=0.5, is_target_logit=True),
    )
    src = torch.arange(n_links)
    return Graph(
        nodes=nodes,
        source=src,
        target=torch.full((n_links,), n_links + 1),
        weight=torch.linspace(0.5, 1.5, n_links),
        influence=torch.linspace(0.1, 0.3, n_links),
        head_layer=torch.ones(n_links, dtype=torch.long),
        heads=torch.tensor([[h for h in range(top)]] * n_links),
        direct=torch.full((n_links, top), 0.25),
        via_mlp=torch.zeros(n_links, top),
        tokens=tuple(range(5, 6 + n_links)),
        str_tokens=tuple(f"t{i}" for i in range(n_links + 1)),
        prompt="a prompt",
        model_name="tiny",
        n_layers=2,
        replacement=0.5,
        completeness=0.9,
        settings={"top_heads": top},
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


# -- writing --------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_keeps_permissions(tmp_path):
    target = tmp_path / "g.json"
    target.write_text("old")
    target.chmod(0o600)
    files.atomic_write(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # no temp file left


def test_no_overwrite_refuses_existing_file_and_link(tmp_path):
    target = tmp_path / "g.json"
    target.write_text("old")
    with pytest.raises(InputError, match="exists"):
        files.atomic_write(target, "new", overwrite=False)
    assert target.read_text() == "old"
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="exists"):
        files.atomic_write(link, "new", overwrite=False)
    assert not (tmp_path / "nowhere").exists()
    assert files.atomic_write(tmp_path / "fresh.json", "x", overwrite=False).read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.json", "fresh.json", "g.json"]


def test_a_link_planted_at_the_temp_name_is_never_followed(tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    data = tmp_path / "data"
    data.mkdir()
    names = iter(["planted", "planted", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (data / ".g.json.planted.tmp").symlink_to(outside)
    files.atomic_write(data / "g.json", "graph")
    assert outside.read_text() == "precious"
    assert (data / "g.json").read_text() == "graph" and not (data / "g.json").is_symlink()
    assert (data / ".g.json.planted.tmp").is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "g.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(InputError, match="No space left"):
        small_graph().save(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["g.json"]


def test_plots_write_atomically(tmp_path, monkeypatch):
    import pandas as pd

    from qktrace.analyses.plots import plot_sweep

    df = pd.DataFrame({"scale": [0.0, 1.0], "top_1": ["a", "b"], "p_top_1": [0.2, 0.7]})
    out = plot_sweep(df, tmp_path / "s.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(30, "Read-only")))
    with pytest.raises(InputError, match="Read-only"):
        plot_sweep(df, tmp_path / "s.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["s.png"]


def test_kill_during_write_leaves_the_old_file_intact(tmp_path):
    """SIGKILL a process while it writes 64 MB over an existing file: the old bytes survive, whole."""
    target = tmp_path / "graph.json"
    old = json.dumps({"old": list(range(1000))}).encode()
    target.write_bytes(old)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from qktrace.files import atomic_open
        with atomic_open({str(target)!r}) as f:
            for i in range(64):
                f.write(b"x" * (1 << 20))
                f.flush()
                if i == 4:
                    print("writing", flush=True)
                    time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size >= 5 << 20  # the new bytes go elsewhere
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old


def test_output_paths_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    ok = files.check_output(tmp_path / "new.json")
    assert ok == tmp_path / "new.json" and not ok.exists()
    assert files.check_output(tmp_path / "file") == tmp_path / "file"  # replaced atomically later
    for bad, words in [
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "x.json", "does not exist"),
        (tmp_path / "file" / "x.json", "not a folder"),
        ("", "empty"),
    ]:
        with pytest.raises(InputError, match=words):
            files.check_output(bad)
    assert files.check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(InputError, match="not a folder"):
        files.check_output_dir(tmp_path / "file")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(InputError, match="permission denied"):
            files.check_output(ro / "x.json")


# -- reading graph files --------------------------------------------------------------------------------


def test_graph_round_trips_through_atomic_save(tmp_path):
    g = small_graph()
    back = load_graph(g.save(tmp_path / "g.json"))
    for name in ("source", "target", "weight", "heads", "direct", "head_layer"):
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    with pytest.raises(InputError, match="exists"):
        g.save(tmp_path / "g.json", overwrite=False)


def _edited(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    data = small_graph().to_json()
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d["metadata"]["qktrace"]["settings"].update(top_heads=200_000), "settings.top_heads"),
        (lambda d: d["metadata"]["qktrace"]["settings"].update(top_heads="3"), "settings.top_heads"),
        (lambda d: d["metadata"]["qktrace"].update(n_layers=10**9), "n_layers"),
        (lambda d: d["metadata"]["qktrace"].update(n_layers=2.5), "n_layers"),
        (lambda d: d["links"][0]["head_loadings"][0].update(head=10**12), "head_loadings head"),
        (lambda d: d["links"][0]["head_loadings"][0].update(layer=7), "head_loadings layer"),
        (lambda d: d["links"][0].update(head_loadings={"a": 1}), "not a list"),
        (lambda d: d["nodes"][0].update(node_id="token/c0/p99999999999/t1"), "outside the graph"),
        (lambda d: d["metadata"]["qktrace"].update(tokens=[1, "2"]), "tokens.1 is a string '2', not an integer"),
        (lambda d: d.update(links=5), "not a list"),
    ],
)
def test_numbers_in_graph_files_are_bounded_by_their_content(tmp_path, edit, words):
    path = _edited(tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(GraphFileError, match=words) as e:
        load_graph(path)
    assert time.perf_counter() - start < 5 and "\n" not in str(e.value)


def test_unreadable_graph_files_are_one_line(tmp_path):
    cases = {
        "deep.json": b"[" * 200_000 + b"]" * 200_000,
        "deep_obj.json": b'{"metadata": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
        "utf8.json": b'{"metadata": "\xff\xfe"}',
        "nan.json": b'{"metadata": NaN}',
        "list.json": b"[1, 2]",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(GraphFileError) as e:
            load_graph(tmp_path / name)
        assert "\n" not in str(e.value), name
