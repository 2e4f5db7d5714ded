"""Writes config/grafana-troupe.json (run: python config/make_grafana_dashboard.py)."""
import json
def panel(i, title, exprs, unit, x, y, w=12, h=8, kind="timeseries"):
    return {"id": i, "type": kind, "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + k), "expr": e, "legendFormat": l} for k, (e, l) in enumerate(exprs)]}
sel = 'model=~"$model"'
panels = [
    panel(1, "Requests / s by model", [(f'sum by (model) (rate(troupe_requests_total{{{sel}}}[5m]))', "{{model}}")], "reqps", 0, 0),
    panel(2, "Errors / s by code", [(f'sum by (code) (rate(troupe_errors_total{{{sel}}}[5m]))', "{{code}}")], "reqps", 12, 0),
    panel(3, "Tokens / s", [(f'sum by (model, kind) (rate(troupe_tokens_total{{{sel}}}[5m]))', "{{model}} {{kind}}")], "short", 0, 8),
    panel(4, "Spend (USD / hour)", [(f'sum by (model) (rate(troupe_cost_usd_total{{{sel}}}[5m])) * 3600', "{{model}}")], "currencyUSD", 12, 8),
    panel(5, "Time to first token", [
        (f'histogram_quantile(0.5, sum by (le, model) (rate(troupe_ttft_seconds_bucket{{{sel}}}[5m])))', "p50 {{model}}"),
        (f'histogram_quantile(0.95, sum by (le, model) (rate(troupe_ttft_seconds_bucket{{{sel}}}[5m])))', "p95 {{model}}")], "s", 0, 16),
    panel(6, "End-to-end latency", [
        (f'histogram_quantile(0.5, sum by (le, model) (rate(troupe_e2e_seconds_bucket{{{sel}}}[5m])))', "p50 {{model}}"),
        (f'histogram_quantile(0.95, sum by (le, model) (rate(troupe_e2e_seconds_bucket{{{sel}}}[5m])))', "p95 {{model}}")], "s", 12, 16),
    panel(7, "Inter-token time", [
        (f'histogram_quantile(0.5, sum by (le, model) (rate(troupe_inter_token_seconds_bucket{{{sel}}}[5m])))', "p50 {{model}}"),
        (f'histogram_quantile(0.99, sum by (le, model) (rate(troupe_inter_token_seconds_bucket{{{sel}}}[5m])))', "p99 {{model}}")], "s", 0, 24),
    panel(8, "Queue wait", [
        (f'histogram_quantile(0.95, sum by (le, model) (rate(troupe_queue_wait_seconds_bucket{{{sel}}}[5m])))', "p95 {{model}}")], "s", 12, 24),
    panel(9, "In-flight requests (gateway)", [('sum by (deployment) (troupe_in_flight_requests)', "{{deployment}}")], "short", 0, 32),
    panel(11, "Replicas per deployment", [('sum by (deployment, state) (troupe_replicas)', "{{deployment}} {{state}}")], "short", 0, 40, w=24),
    panel(10, "Estimated-cost requests / s", [(f'sum by (model) (rate(troupe_cost_estimated_requests_total{{{sel}}}[5m]))', "{{model}}")], "reqps", 12, 32),
    panel(12, "Local engine queue (waiting / running)", [
        (f'sum by (model) (troupe_engine_queue_depth{{{sel}}})', "{{model}} waiting"),
        (f'sum by (model) (troupe_engine_running_requests{{{sel}}})', "{{model}} running")], "short", 0, 48),
    panel(13, "Local engine expected queue wait", [
        (f'max by (model) (troupe_engine_expected_wait_seconds{{{sel}}})', "{{model}}")], "s", 12, 48),
]
dash = {
    "title": "Troupe gateway", "uid": "troupe-gateway", "schemaVersion": 39, "version": 1,
    "tags": ["troupe", "inference"], "timezone": "utc", "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "model", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": "label_values(troupe_requests_total, model)", "includeAll": True, "multi": True,
         "current": {"text": "All", "value": "$__all"}, "allValue": ".*", "refresh": 2},
    ]},
    "panels": panels,
}
open(__import__("pathlib").Path(__file__).with_name("grafana-troupe.json"), "w").write(json.dumps(dash, indent=2) + "\n")
