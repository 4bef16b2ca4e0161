"""Ray in local mode with 2 workers: merged dashboards equal the single-process result exactly, a job
interrupted after some shards and restarted writes the same files, and batch output equals tracing each
prompt alone. One Ray runtime (2 CPUs, no dashboard) for the module, shut down after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import qktrace
from qktrace.errors import InputError
from qktrace.jobs.batch import BatchOptions, read_prompts, trace_batch, trace_prompt
from qktrace.jobs.dashboards import DashboardOptions, build_dashboards
from qktrace.jobs.pool import import_ray, loopback, worker_pool
from qktrace.options import GraphOptions
from qktrace.testing import JobSetup as Setup
from qktrace.testing import make_job_setup, tree

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'qktrace[scale]'")

OPTS = DashboardOptions(seq_len=24, docs_per_shard=4, batch_tokens=24, n_contexts=3, label_pool=5, before=3, after=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_job_setup(tmp_path_factory.mktemp("scale"))


@pytest.fixture(scope="module")
def ray_runtime() -> Any:
    # workers get 1 CPU (so 1 torch thread) each, as the test process has (conftest): the same numerics; a fresh
    # runtime (never a cluster found on the machine), on 127.0.0.1 only
    with loopback(ray):
        local = dict(address="local", _node_ip_address="127.0.0.1")
        ray.init(**local, num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


class _Stop(Exception):
    pass


def test_ray_dashboards_equal_one_process_also_when_interrupted(setup: Setup, ray_runtime: Any, tmp_path: Path) -> None:
    """2 Ray workers, stopped after 3 shards, then restarted (in this process, to keep the test short): every
    file, shards included, is byte for byte what one uninterrupted process writes."""
    one = tmp_path / "one"
    build_dashboards(setup.model, setup.saes, setup.corpus, one, options=OPTS, device="cpu", circuit_tracer=True)

    def stop_after_three(p: Any) -> None:
        if p.done >= 3:
            raise _Stop

    two = tmp_path / "two"
    kw: dict[str, Any] = dict(options=OPTS, device="cpu", circuit_tracer=True)
    with pytest.raises(_Stop):
        build_dashboards(setup.model, setup.saes, setup.corpus, two, progress=stop_after_three, workers=2, **kw)
    finished = len(list((two / "shards").glob("*.npz")))
    assert 3 <= finished < 8 and not (two / "index.json").exists()
    for name, data in tree(two / "shards").items():  # what the Ray workers wrote
        assert (one / "shards" / name).read_bytes() == data
    result = build_dashboards(setup.model, setup.saes, setup.corpus, two, **kw)
    assert result.resumed == finished and result.shards == 8
    assert tree(two) == tree(one)


def test_ray_batch_equals_each_prompt_alone(setup: Setup, ray_runtime: Any, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "Aunt Sally is the w1 . Aunt", "answer": " Sally", "rival": " Bob"},
        {"prompt": "w3 w8 w2 of the w9 w4", "id": "plain"},
        {"prompt": "Uncle Bob , w5 w6 . Uncle", "answer": " Bob"},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    options = BatchOptions(graph=GraphOptions(qk_terms=False))
    result = trace_batch(setup.model, setup.saes, prompts, tmp_path / "out", device="cpu", workers=2, options=options)
    tracer = qktrace.Tracer.load(setup.model, setup.saes)
    files = tree(tmp_path / "out")
    for record in read_prompts(prompts):
        for name, data in trace_prompt(tracer, record, options).items():
            assert files[name] == data, name
    assert result.n_prompts == 3 and len((tmp_path / "out" / "summary.jsonl").read_text().splitlines()) == 3


def test_a_worker_error_reaches_the_driver_as_its_one_line(ray_runtime: Any) -> None:
    from qktrace.jobs.pool import _unwrap

    @ray.remote
    def fails() -> None:
        raise InputError("prompt 3 is empty: give it text")

    with pytest.raises(Exception) as e:
        ray.get(fails.remote())
    err = _unwrap(e.value)
    assert isinstance(err, InputError) and str(err) == "prompt 3 is empty: give it text"


def test_without_ray(monkeypatch: pytest.MonkeyPatch, setup: Setup, tmp_path: Path) -> None:
    """No Ray: more than one worker runs in this process (a warning); an address is an error."""
    import builtins

    real = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert import_ray(required=False) is None
    with pytest.raises(InputError, match="pip install 'qktrace\\[scale\\]'"):
        import_ray(required=True)
    with worker_pool(lambda: object(), workers=2) as pool:  # type: ignore[arg-type,return-value]
        assert pool.size == 1
