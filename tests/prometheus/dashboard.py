"""What the dashboard and Prometheus tests share: duet's metric set, and reading PromQL out of
deploy/grafana/duet.json.

The metric set below is the contract the dashboard is written against (names, types, which server
exports them). check_dashboard.py holds it against common/metrics/include/duet/metrics/metrics.h,
and prometheus_e2e_test.py against what the real servers expose, so a renamed metric breaks a test
instead of an empty Grafana panel.
"""

import json
import math
import re

# name -> (type, roles that export it). Counters are named without "_total" here, as in metrics.h;
# the exposition (and every query) adds it.
METRICS = {
    # decode
    "duet_time_to_first_token_seconds": ("histogram", {"decode"}),
    "duet_inter_token_latency_seconds": ("histogram", {"decode"}),
    "duet_e2e_request_latency_seconds": ("histogram", {"decode"}),
    "duet_request_queue_time_seconds": ("histogram", {"decode"}),
    "duet_kv_transfer_seconds": ("histogram", {"decode"}),
    "duet_batch_size": ("histogram", {"decode"}),
    "duet_kv_transfer_bytes": ("counter", {"decode"}),
    "duet_prompt_tokens": ("counter", {"decode"}),
    "duet_generation_tokens": ("counter", {"decode"}),
    "duet_requests_finished": ("counter", {"decode"}),
    "duet_session_evictions": ("counter", {"decode"}),
    "duet_sessions": ("gauge", {"decode"}),
    "duet_requests_running": ("gauge", {"decode"}),
    "duet_requests_waiting": ("gauge", {"decode"}),
    "duet_kv_cache_usage_ratio": ("gauge", {"decode"}),
    # prefill
    "duet_prefill_time_seconds": ("histogram", {"prefill"}),
    "duet_prefill_queue_time_seconds": ("histogram", {"prefill"}),
    "duet_prefill_tokens": ("counter", {"prefill"}),
    "duet_prefill_requests_running": ("gauge", {"prefill"}),
    "duet_prefill_requests_waiting": ("gauge", {"prefill"}),
    # both; its series appear with the first error of each code
    "duet_request_errors": ("counter", {"decode", "prefill"}),
}

SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def series_names():
    """Every sample name a query may use -> the metric (family) it belongs to."""
    out = {}
    for name, (kind, _) in METRICS.items():
        for suffix in SUFFIXES[kind]:
            out[name + suffix] = name
    return out


# Grafana variables an expression may use; the test substitutes each of them.
VARIABLES = ("model", "__rate_interval", "__interval", "__range")
MODEL_MATCHER = 'model_name=~"$model"'


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard):
    """Every panel, rows included, with the panels of collapsed rows flattened in."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []) if p.get("type") == "row" else [])
    return out


def query_panels(dashboard):
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def exprs(dashboard):
    """(panel title, refId, legendFormat, expr) for every target of every panel."""
    out = []
    for p in query_panels(dashboard):
        for t in p.get("targets", []):
            out.append((p.get("title", ""), t.get("refId", ""), t.get("legendFormat", ""),
                        t.get("expr", "")))
    return out


def strip_strings(expr):
    """The expression with its string literals emptied (so "duet-tiny" is no metric name)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_refs(expr):
    """The duet sample names an expression selects, in order of appearance."""
    return re.findall(r"(?<![\w:])duet_[A-Za-z0-9_:]*", strip_strings(expr))


def selectors(expr):
    """(sample name, the label-matcher text inside its braces, or None when it has none)."""
    out = []
    for m in re.finditer(r"(?<![\w:])(duet_[A-Za-z0-9_:]*)\s*(\{([^}]*)\})?", expr):
        out.append((m.group(1), m.group(3)))
    return out


def variables_used(expr):
    return re.findall(r"\$\{?(\w+)(?::\w+)?\}?", expr)


def grafana_regex_escape(value):
    """A label value as Grafana's Prometheus datasource writes it into a =~ matcher: regex
    metacharacters get a backslash, doubled because the regex sits in a PromQL string."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\\\1", value)


def substitute(expr, model_regex, window):
    """expr with Grafana's variables replaced: $model by model_regex (already escaped), the
    interval variables by window (a PromQL duration such as "1m")."""
    values = {"model": model_regex, "__rate_interval": window, "__interval": window,
              "__range": window}

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def prom_duration(seconds):
    return f"{int(math.ceil(seconds))}s"
