"""The public API is exactly qktrace.__all__, and every exception lives in qktrace.errors."""

from __future__ import annotations

import inspect

import qktrace
from qktrace import errors

PUBLIC = {
    "SAE",
    "Comparison",
    "ExplainSettings",
    "Mechanism",
    "FreezeAttention",
    "Graph",
    "Model",
    "QKAttribution",
    "QKTraceError",
    "SAESet",
    "ScaleHead",
    "SteerFeature",
    "SteerQK",
    "Trace",
    "Traced",
    "Tracer",
    "build_graph",
    "compare",
    "explain",
    "load_graph",
    "load_model",
    "load_saes",
    "qk_attribution",
    "run_with",
    "sweep",
}


def test_public_api_is_all():
    assert set(qktrace.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(qktrace, name) is not None


def test_every_error_derives_from_base_and_is_documented():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 7
    for c in classes:
        assert issubclass(c, errors.QKTraceError)
        assert c.__name__ in errors.__doc__
