"""DUO's figures on vLLM's Prometheus endpoint (``/metrics``), so an operator sees what DUO saves.

The API server exports ``prometheus_client``'s registry of its own process. The front end resolves
the DUO runtime there (``patches/engine_config_validation.py``), so the figures are published from
that process, once per engine configuration, before the server answers its first request (with
``--api-server-count`` above 1 vLLM reads multiprocess files instead; not checked there yet):

- ``duo:pattern_info{pattern, model, format, sha256, origin, selection, sink, recent}`` (always 1): which
  pattern is served, in which file format, its file digest and where it was found;
- ``duo:retrieval_ratio``: fraction of KV heads that keep the full cache;
- ``duo:streaming_bytes_per_request``: the fixed sink + recent KV of one request's streaming heads;
- ``duo:retrieval_bytes_per_token`` and ``duo:stock_bytes_per_token``: KV bytes per context token;
- ``duo:capacity_ratio``: tokens DUO holds per token stock holds at ``max_model_len``, with vLLM's
  blocks (the figure vLLM's own "KV cache size" line also reflects).

Pool occupancy itself is vLLM's ``vllm:kv_cache_usage_perc``: both of DUO's KV-cache groups draw
from vLLM's one block pool.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.duo_vllm")

# name -> help; gauges of one value each (per TP rank figures, as the start-up log line)
GAUGES = {
    "duo:retrieval_ratio": "Fraction of KV heads that are retrieval heads (full KV cache)",
    "duo:streaming_bytes_per_request": "Bytes of KV one request's streaming heads hold (sink + recent), per TP rank",
    "duo:retrieval_bytes_per_token": "KV bytes per context token under DUO (retrieval heads), per TP rank",
    "duo:stock_bytes_per_token": "KV bytes per context token under full attention, per TP rank",
    "duo:capacity_ratio": "Context tokens DUO holds per token full attention holds at max_model_len",
}
INFO = "duo:pattern_info"
INFO_LABELS = ("pattern", "model", "format", "sha256", "origin", "selection", "sink", "recent")

_metrics: dict = {}


def _metric(name: str):
    """The process's gauge called ``name``, created once (vLLM may build several configs)."""
    if name not in _metrics:
        from prometheus_client import Gauge

        if name == INFO:
            _metrics[name] = Gauge(name, "The DUO pattern served (value 1)", labelnames=INFO_LABELS,
                                   multiprocess_mode="mostrecent")
        else:
            _metrics[name] = Gauge(name, GAUGES[name], multiprocess_mode="mostrecent")
    return _metrics[name]


def figures(runtime, report) -> dict[str, float]:
    """The gauge values for a resolved runtime and its KV report (``report`` may be None when
    vLLM has not chosen a block size yet: the byte figures are then left out)."""
    values = {"duo:retrieval_ratio": float(runtime.retrieval_mask.mean())}
    if report is not None:
        values.update({
            "duo:streaming_bytes_per_request": float(report.streaming_bytes_per_request),
            "duo:retrieval_bytes_per_token": float(report.retrieval_bytes_per_token),
            "duo:stock_bytes_per_token": float(report.stock_bytes_per_token),
            "duo:capacity_ratio": float(report.planned_ratio),
        })
    return values


def publish(runtime, report) -> None:
    """Set DUO's gauges in this process; a failure is logged, never raised (metrics must not
    stop a server that can serve)."""
    try:
        info = _metric(INFO)
        info.clear()
        selection = (f"sparsity {runtime.sparsity:.2f}" if runtime.sparsity is not None
                     else f"threshold {runtime.config.threshold}")
        pattern = runtime.pattern
        info.labels(pattern=str(pattern.source or pattern.model_name), model=str(pattern.model_name),
                    format=str(pattern.source_format or ""), sha256=str(pattern.content_hash or ""),
                    origin=str(runtime.pattern_origin or ""), selection=selection, sink=str(runtime.sink),
                    recent=str(runtime.recent)).set(1)
        values = figures(runtime, report)
        for name in GAUGES:  # a figure this config cannot give is NaN, never an earlier config's
            _metric(name).set(values.get(name, float("nan")))
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.warning("DUO figures not published on /metrics (%s: %s)", type(exc).__name__, exc)
