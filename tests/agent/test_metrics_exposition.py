"""The agent's hand-written Prometheus exposition (agent/metrics.py) is what Prometheus parses:
read back with prometheus-client's own parser (the fleet's dependency; the agent does not need it)."""

from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import ModelStats, prometheus_text


def test_the_agents_exposition_parses_as_prometheus_reads_it() -> None:
    stats = ModelStats()
    for seconds in (0.0002, 0.0004, 0.003, 0.25):
        stats.ok(seconds)
    stats.error()
    families = {f.name: f for f in text_string_to_metric_families(
        prometheus_text({"digits": ("2", stats)}, dropped={"cmd": 3}))}
    hist = families["edgesdk_inference_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] == 4 and buckets[-1].labels["le"] == "+Inf"
    assert all(s.labels["model"] == "digits" and s.labels["version"] == "2" for s in hist.samples)
    by_name = {s.name: s.value for s in hist.samples if not s.name.endswith("_bucket")}
    assert by_name["edgesdk_inference_seconds_count"] == 4
    assert abs(by_name["edgesdk_inference_seconds_sum"] - 0.2536) < 1e-9
    assert families["edgesdk_requests"].samples[0].value == 5
    assert families["edgesdk_request_errors"].samples[0].value == 1
    assert families["edgesdk_dropped_messages"].samples[0].labels == {"channel": "cmd"}
