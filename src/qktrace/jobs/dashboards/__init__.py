"""Feature dashboards for any model and its SAEs, over a corpus of any size.

For every checkpoint with an SAE and every feature: the exact top activating contexts (with a token
window), activation frequency, an activation histogram over fixed bins, the top and bottom output tokens
through the final norm and unembedding, and a short automatic label.

1. The corpus (`qktrace.jobs.corpus`: text, JSONL, or a `datasets.save_to_disk` folder) is cut into shards of
   consecutive documents; each document into chunks of `seq_len` tokens.
2. Each shard runs through the model (`models.residuals`, batched, stopping at the last SAE's checkpoint)
   and every SAE (`SAE.encode`, exactly as tracing encodes). Per feature it keeps counts, a histogram and
   its top activations in the total order (activation descending, then document, then offset) (`stats`).
3. Each shard's statistics are written to `shards/NNNNNN.npz` as it finishes (`qktrace.jobs.runner`); a restarted
   job skips finished shards. Shards run in this process or on Ray workers, one model replica each.
4. The shards merge exactly (`stats.merge`): the same top-k, counts and histograms as one pass.
5. `render`: per checkpoint `HOOK/dashboards.json` (the web UI's contract, `version` 1) and
   `HOOK/labels.json`, `index.json`, and optionally circuit-tracer's `features/SCAN/INDEX.json`.

Copy (or write, with `out` = the SAE folder) `dashboards.json` and `labels.json` beside an SAE's
`cfg.json` and `load_saes`, the server and graphs pick the labels and dashboards up.

Without residual SAEs the job describes the tracer's attention-output SAEs' features when it has them
(`attention.py`: `blocks.L.attn/`, "kind": "attn"), else its transcoders' (`transcoders.py`:
`blocks.L.transcoder/`, "kind": "transcoder"), keyed by layer. With `out` = a `dashboards` folder inside the
set's folder (or those folders copied beside its files), loading the set labels its features from them and
the server serves them (`saes.labels.dashboards_folder`).
"""

from .job import DashboardOptions, DashboardsResult, DashboardWorker, build_dashboards
from .render import VERSION, TokenKind, auto_label, circuit_tracer_features, render, token_kind, top_outputs
from .stats import HIST_EDGES, N_BINS, Partial, collect, merge

__all__ = [
    "HIST_EDGES",
    "N_BINS",
    "VERSION",
    "DashboardOptions",
    "DashboardWorker",
    "DashboardsResult",
    "Partial",
    "TokenKind",
    "auto_label",
    "build_dashboards",
    "circuit_tracer_features",
    "collect",
    "merge",
    "render",
    "token_kind",
    "top_outputs",
]
