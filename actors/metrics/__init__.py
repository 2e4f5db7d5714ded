"""MetricsActor: the cost ledger, latency histograms and Prometheus text of the gateway.

A plain async class (no Ray here): the app builder applies ``ray.remote`` with
``name="troupe-metrics"``, ``namespace="troupe"``, ``lifetime="detached"``,
``max_restarts=-1``, ``max_task_retries=-1``, ``get_if_exists=True``. Gateway replicas
never call it on the request path: a per-process :class:`actors.recorder.MetricsRecorder`
buffers :class:`RequestEvent` s and flushes them here in batches.

What it keeps:

* the ledger, in the store: every event priced by :class:`serve_app.pricing.PriceTable`
  and appended once (``event_id`` makes appends idempotent);
* in-memory aggregates that mirror the ledger (requests, errors, tokens, cost per
  model/provider/route/key/tier/status) and latency histograms (queue wait, TTFT,
  inter-token, end-to-end per model/route/tier). Only rows the store reports as new
  update them, so a retried batch never counts twice. At start both are rebuilt from the
  store (totals from ``ledger_totals``, histograms from the whole ledger), so a killed
  and restarted actor serves the same counters it had;
* gauges (in-flight requests per deployment) and custom metrics, in memory only: gauges
  are re-sent by the recorders, custom metrics restart from empty (Prometheus treats a
  counter that restarts as a reset).

Rebuilding reads the whole ledger once at start: fine for millions of rows; a much
larger ledger wants persisted histogram snapshots (a store change).

Modules: ``actor.py`` (the actor: recording, reading, health), ``aggregates.py`` (totals,
histograms, their Prometheus families), ``custom.py`` (custom metrics and built-in
gauges, validated), ``usage.py`` (usage summaries and percentiles).
"""

from actors.metrics.actor import ACTOR_NAME, ACTOR_NAMESPACE, MetricsActor
from actors.metrics.aggregates import DEFAULT_BUCKETS_MS
from actors.metrics.custom import BUILTIN_GAUGES, MAX_LABEL_SETS
from actors.metrics.usage import USAGE_GROUPS

__all__ = [
    "MetricsActor",
    "ACTOR_NAME",
    "ACTOR_NAMESPACE",
    "DEFAULT_BUCKETS_MS",
    "BUILTIN_GAUGES",
    "USAGE_GROUPS",
    "MAX_LABEL_SETS",
]
