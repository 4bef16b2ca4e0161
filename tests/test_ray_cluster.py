"""Ray clusters as they are deployed: a head node started with `ray start` (token authentication on, as Ray's
default is) on 127.0.0.1 only, `qktrace dashboards` run against it through its address with 2 workers
writes byte for byte what one process writes, nothing it starts listens or connects off loopback, and it
is stopped by the process ids it started (never `ray stop`, never by name). A port that accepts
connections but is not Ray is refused within a bound."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qktrace.errors import InputError
from qktrace.jobs.batch import BatchOptions, trace_batch
from qktrace.jobs.dashboards import DashboardOptions, build_dashboards
from qktrace.jobs.pool import check_reachable
from qktrace.testing import JobSetup, make_job_setup, tree

DASH = DashboardOptions(seq_len=24, n_contexts=3)  # what the CLI's --seq-len and --contexts give
BOUND_S = 3.0  # the greeting bound the refusals below are given


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A server on 127.0.0.1 that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for s in held:
            s.close()
        server.close()


@pytest.mark.parametrize("form", ["127.0.0.1:{}", "ray://127.0.0.1:{}"])
def test_a_port_that_accepts_but_is_not_ray_is_refused_within_the_bound(silent_port: int, form: str) -> None:
    start = time.monotonic()
    with pytest.raises(InputError, match=r"accepts connections but does not answer as Ray does .*within 3 s"):
        check_reachable(form.format(silent_port), timeout=BOUND_S)
    assert time.monotonic() - start < BOUND_S + 2


def test_a_service_that_answers_otherwise_is_refused_at_once() -> None:
    """An HTTP/1 server (it answers our hello with a 400) is not Ray either."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    start = time.monotonic()
    with pytest.raises(InputError, match="does not answer as Ray does"):
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout=30)
    assert time.monotonic() - start < 10
    t.join(5)
    server.close()


# -- a head node, as deployed ------------------------------------------------------------------------------

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'qktrace[scale]'")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
START_S, STOP_S = 90, 5  # bounds on `ray start` and on the head's processes exiting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked(mark: str) -> list[int]:
    """Process ids whose environment carries `mark`: those the head node started, and theirs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def _sockets(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if with_target.startswith("socket:["):
            inodes.add(with_target[8:-1])
    return inodes


def _loopback(hex_address: str) -> bool:
    """An address of /proc/net/tcp{,6} (32-bit words, each little-endian) on loopback: 127.x.x.x, ::1, or
    ::ffff:127.x.x.x."""
    host = hex_address.split(":")[0].upper()
    v4 = host if len(host) == 8 else host[24:] if host.startswith("0000000000000000FFFF0000") else None
    return host == "00000000000000000000000001000000" or (v4 is not None and v4.endswith("7F"))


def test_loopback_reads_proc_net_addresses() -> None:
    assert _loopback("0100007F:1F90") and _loopback("0000000000000000FFFF00000100007F:1F90")
    assert _loopback("00000000000000000000000001000000:0050")
    assert not _loopback("0F00020A:1F90") and not _loopback("00000000:1F90")  # 10.2.0.15, 0.0.0.0
    assert not _loopback("0000000000000000FFFF00000F00020A:0050") and not _loopback("0" * 32 + ":0050")


def tcp_sockets(pids: list[int]) -> list[tuple[str, str, str]]:
    """(local, remote, state) of every TCP socket of `pids`, addresses as /proc/net/tcp{,6} write them."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            inodes |= _sockets(pid)
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                found.append((f[1], f[2], f[3]))
    return found


def off_loopback(sockets: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Those listening or connected anywhere but loopback (a listener's remote address is all zeros)."""
    unset = lambda a: a.split(":")[0].strip("0") == ""  # noqa: E731
    return [(lo, re, st) for lo, re, st in sockets if not _loopback(lo) or not (unset(re) or _loopback(re))]


def stop(pids: list[int]) -> None:
    """SIGTERM to each process the head started, then SIGKILL to what is left after STOP_S."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + STOP_S
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, str, dict[str, str]]]:
    """A Ray head node on 127.0.0.1 (its own temp dir and token; never the machine's default cluster): its
    GCS address, its client server's ray:// address and the environment a driver uses."""
    if RAY is None:
        pytest.skip("the ray command is not installed")
    root = Path(tempfile.mkdtemp(prefix="qkr-", dir="/tmp"))  # short: Ray's socket paths live under it
    (root / "token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    mark = f"QKTRACE_TEST_HEAD={uuid.uuid4().hex}"
    env = {
        **os.environ,
        "RAY_TMPDIR": str(root),  # ray_current_cluster goes here, not /tmp/ray: no other test attaches to it
        "RAY_AUTH_TOKEN_PATH": str(root / "token"),
        "RAY_USAGE_STATS_ENABLED": "0",
        mark.split("=")[0]: mark.split("=")[1],
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    port, client = free_port(), free_port()
    args = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    args += ["--ray-client-server-port", str(client), "--num-cpus", "2", "--include-dashboard", "false"]
    args += ["--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    try:
        # 127.0.0.1 stays 127.0.0.1 (Ray rewrites it to the machine's address by default); token auth as deployed
        head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        # a ray:// client's own server process may take over Ray's 30 s to answer on a loaded 2-core machine
        head_env["RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S"] = "120"
        done = subprocess.run(args, env=head_env, capture_output=True, timeout=START_S)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert (
            not Path("/tmp/ray/ray_current_cluster").exists()
            or "qkr-" not in Path("/tmp/ray/ray_current_cluster").read_text()
        )
        # the driver (env, without RAY_AUTH_MODE and the loopback setting) keeps to loopback and turns token
        # mode on by itself (jobs.pool)
        yield f"127.0.0.1:{port}", f"ray://127.0.0.1:{client}", env
        sockets = tcp_sockets(marked(mark))
        assert sum(st == "0A" for _, _, st in sockets) >= 3, sockets  # 0A: listening (the GCS, raylet, client)
        assert off_loopback(sockets) == []
    finally:
        stop(marked(mark))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> JobSetup:
    return make_job_setup(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def one_process(job: JobSetup, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three prompts (two with an answer: explained) and what one process writes for them."""
    root = tmp_path_factory.mktemp("batch")
    prompts = root / "prompts.jsonl"
    lines = [
        {"prompt": "Aunt Sally is the w1 . Aunt", "answer": " Sally", "rival": " Bob"},
        {"prompt": "w3 w8 w2 of the w9 w4", "id": "plain"},
        {"prompt": "Uncle Bob , w5 w6 . Uncle", "answer": " Bob"},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    trace_batch(job.model, job.saes, prompts, root / "one", options=BatchOptions(), device="cpu")
    return prompts, root / "one"


def batch_cli(job: JobSetup, prompts: Path, out: Path, *more: str) -> list[str]:
    cli = [sys.executable, "-m", "qktrace", "batch", str(job.model), "--saes", str(job.saes), "--device", "cpu"]
    return [*cli, "--prompts", str(prompts), "--out", str(out), "--workers", "2", *more]


@pytest.mark.slow
def test_batch_on_a_head_node_equals_one_process(
    head: tuple[str, str, dict[str, str]], job: JobSetup, one_process: tuple[Path, Path], tmp_path: Path
) -> None:
    """`qktrace batch --workers 2 --ray-address 127.0.0.1:PORT`, as a user runs it against the head node."""
    address, client, env = head
    for form in (address, client):  # both of Ray's endpoints greet as Ray does
        check_reachable(form, timeout=BOUND_S)
    prompts, one = one_process
    seen, code, err = run_watched(batch_cli(job, prompts, tmp_path / "two", "--ray-address", address), env, 150)
    assert code == 0, err[-3000:]
    assert tree(tmp_path / "two") == tree(one)
    # the driver, the head's processes and the workers, while they ran: connected, and only on loopback
    assert sum(st == "01" for _, _, st in seen) >= 4, seen  # 01: established
    assert off_loopback(sorted(seen)) == []


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ray://", "auto"])
def test_dashboards_through_ray_client_or_auto_equal_one_process(
    head: tuple[str, str, dict[str, str]], job: JobSetup, tmp_path: Path, form: str
) -> None:
    """`qktrace dashboards --ray-address ray://127.0.0.1:PORT` (or `auto`: the head this machine's Ray
    address file names) against the token-authenticated head."""
    _, client, env = head
    client = client if form == "ray://" else "auto"
    build_dashboards(job.model, job.saes, job.corpus, tmp_path / "one", options=DASH, device="cpu")
    cli = [sys.executable, "-m", "qktrace", "dashboards", str(job.model), "--saes", str(job.saes), "--device", "cpu"]
    cli += ["--corpus", str(job.corpus), "--out", str(tmp_path / "two"), "--seq-len", str(DASH.seq_len)]
    cli += ["--contexts", str(DASH.n_contexts), "--workers", "2", "--ray-address", client]
    seen, code, err = run_watched(cli, env, 150)
    assert code == 0, err[-3000:]
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert off_loopback(sorted(seen)) == []


@pytest.mark.slow
def test_a_local_runtime_keeps_to_loopback(job: JobSetup, one_process: tuple[Path, Path], tmp_path: Path) -> None:
    """`--workers 2` without an address: a fresh local Ray runtime (never a cluster found on the machine), every
    socket of it on 127.0.0.1 although nothing in the environment asks for that."""
    mark, root = uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix="qkr-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(root), "QKTRACE_TEST_HEAD": mark, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    prompts, one = one_process
    try:
        seen, code, err = run_watched(batch_cli(job, prompts, tmp_path / "two"), env, 150)
    finally:
        stop(marked(f"QKTRACE_TEST_HEAD={mark}"))  # whatever of the runtime outlived its driver
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, err[-3000:]
    assert tree(tmp_path / "two") == tree(one)
    assert sum(st == "0A" for _, _, st in seen) >= 3 and sum(st == "01" for _, _, st in seen) >= 4, seen
    assert off_loopback(sorted(seen)) == []


def run_watched(cli: list[str], env: dict[str, str], timeout: float) -> tuple[set[tuple[str, str, str]], int, str]:
    """Run `cli`, sampling every 0.2 s the TCP sockets of every process carrying the head's mark (the
    driver carries it too): (sockets seen, exit code, stderr)."""
    mark = next(f"{k}={v}" for k, v in env.items() if k == "QKTRACE_TEST_HEAD")
    seen: set[tuple[str, str, str]] = set()
    with subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= set(tcp_sockets(marked(mark)))
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(10)
        reader.join(10)
    return seen, code, b"".join(err).decode(errors="replace")


@pytest.mark.slow
def test_a_wrong_token_is_named_as_what_failed(
    head: tuple[str, str, dict[str, str]], job: JobSetup, one_process: tuple[Path, Path], tmp_path: Path
) -> None:
    address, _, env = head
    wrong = tmp_path / "wrong-token"
    wrong.write_text(uuid.uuid4().hex)
    cli = batch_cli(job, one_process[0], tmp_path / "out", "--ray-address", address)
    done = subprocess.run(cli, env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, capture_output=True, timeout=120)
    last = done.stderr.decode().strip().splitlines()[-1]
    assert done.returncode == 2 and "refused this client's authentication" in last and "RAY_AUTH_TOKEN" in last, last
