#!/usr/bin/env python3
"""Static checks of the Grafana dashboard (deploy/grafana/duet.json) and Grafana's provisioning
files; no Grafana is needed (none is installable here).

  check_dashboard.py REPO_ROOT

Checks: valid JSON; uid "duet", title "duet", schemaVersion >= 37; a datasource variable
(Prometheus) and a multi/all model variable; every panel and every target on ${datasource}; every
metric an expression selects is in duet's metric set (dashboard.METRICS, with the right
_bucket/_sum/_count/_total suffix) and is filtered by model_name=~"$model"; histogram_quantile
always over rate() of _bucket summed by le; every expression parses (promtool check rules on a
temp file of them); the panel topics of issue 4 are all there with their units; unique panel ids;
gridPos inside 24 columns without overlaps; the metric set agrees with metrics.h; the provisioning
files point at the dashboard and at ${PROMETHEUS_URL}. Prints every problem, exits 1 if any.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dashboard as dash  # noqa: E402

problems = []


def fail(msg):
    problems.append(msg)


def quantile_of(expr):
    m = re.match(r"\s*histogram_quantile\(\s*([0-9.]+)\s*,", expr)
    return float(m.group(1)) if m else None


def check_top(d):
    if d.get("uid") != "duet":
        fail(f'uid is {d.get("uid")!r}, want "duet"')
    if d.get("title") != "duet":
        fail(f'title is {d.get("title")!r}, want "duet"')
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 37:
        fail(f'schemaVersion is {d.get("schemaVersion")!r}, want >= 37')
    if d.get("id") is not None:
        fail("top-level id must be null (Grafana assigns it on import)")


def check_variables(d):
    by_name = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = by_name.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail('needs a variable "datasource" of type datasource with query "prometheus"')
    model = by_name.get("model")
    if not model:
        fail('needs a variable "model"')
        return
    if model.get("type") != "query":
        fail(f'variable model has type {model.get("type")!r}, want "query"')
    if (model.get("datasource") or {}).get("uid") != "${datasource}":
        fail("variable model must query ${datasource}")
    q = model.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    m = re.fullmatch(r"label_values\(\s*(\w+)\s*,\s*model_name\s*\)", q or "")
    if not m:
        fail(f"variable model's query is {q!r}, want label_values(<duet metric>, model_name)")
    elif m.group(1) not in dash.series_names():
        fail(f"variable model reads {m.group(1)}, which duet does not export")
    if not model.get("multi") or not model.get("includeAll"):
        fail("variable model must allow several values and All (multi, includeAll)")
    for name in by_name:
        if name not in ("datasource", "model"):
            fail(f"unexpected variable {name!r}: the Prometheus test substitutes only $model")


def check_layout(d):
    ids = {}
    rects = []
    for p in dash.all_panels(d):
        title = p.get("title", "?")
        pid = p.get("id")
        if not isinstance(pid, int):
            fail(f"panel {title!r} has no integer id")
        elif pid in ids:
            fail(f"panel id {pid} used by {ids[pid]!r} and {title!r}")
        else:
            ids[pid] = title
        g = p.get("gridPos") or {}
        x, y, w, h = (g.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)):
            fail(f"panel {title!r} has an incomplete gridPos {g}")
            continue
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
            fail(f"panel {title!r}: gridPos {g} is not within 24 columns")
        for other_title, (ox, oy, ow, oh) in rects:
            if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                fail(f"panels {other_title!r} and {title!r} overlap")
        rects.append((title, (x, y, w, h)))


def check_panels(d):
    names = dash.series_names()
    for p in dash.query_panels(d):
        title = p.get("title", "?")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            fail(f"panel {title!r}: datasource is not ${{datasource}}")
        if not (p.get("fieldConfig", {}).get("defaults", {}).get("unit")):
            fail(f"panel {title!r} sets no unit")
        if not p.get("description"):
            fail(f"panel {title!r} has no description")
        targets = p.get("targets") or []
        if not targets:
            fail(f"panel {title!r} has no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            fail(f"panel {title!r}: duplicate refIds {ref_ids}")
        for t in targets:
            where = f"panel {title!r} {t.get('refId')}"
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                fail(f"{where}: target datasource is not ${{datasource}}")
            expr = t.get("expr", "")
            if not expr.strip():
                fail(f"{where}: empty expr")
                continue
            for v in dash.variables_used(expr):
                if v not in dash.VARIABLES:
                    fail(f"{where}: unknown variable ${v}")
            refs = dash.metric_refs(expr)
            if not refs:
                fail(f"{where}: selects no duet metric: {expr}")
            for name in refs:
                if name not in names:
                    fail(f"{where}: {name} is not a duet series (known: dashboard.METRICS)")
            for name, matchers in dash.selectors(expr):
                if matchers is None or dash.MODEL_MATCHER not in matchers:
                    fail(f'{where}: {name} is not filtered by {dash.MODEL_MATCHER}')
            if "histogram_quantile" in expr:
                m = re.fullmatch(
                    r"\s*histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(([^)]*)\)\s*"
                    r"\(\s*rate\(\s*(duet_\w+_bucket)\{[^}]*\}\[\$__rate_interval\]\)\s*\)\s*\)\s*",
                    expr)
                if not m:
                    fail(f"{where}: want histogram_quantile(q, sum by (..., le) (rate(X_bucket"
                         f"{{...}}[$__rate_interval]))), got {expr}")
                elif "le" not in [s.strip() for s in m.group(1).split(",")]:
                    fail(f"{where}: histogram_quantile's sum must keep le: {expr}")
            if re.search(r"(rate|increase)\(", expr) and "$__rate_interval" not in expr:
                fail(f"{where}: rate()/increase() should use [$__rate_interval]: {expr}")
            for name in (n for n in refs if n in names):
                kind = dash.METRICS[names[name]][0]
                if name.endswith(("_total", "_bucket", "_sum", "_count")) and not re.search(
                        r"(rate|increase)\(\s*" + re.escape(name) + r"\b", expr):
                    fail(f"{where}: {name} is a counter; query its rate(), not its value")
                if kind == "gauge" and re.search(r"(rate|increase)\(\s*" + re.escape(name), expr):
                    fail(f"{where}: {name} is a gauge; rate() of it means nothing")


# Required topics: (topic, title regex, predicate over the panel's exprs, accepted units).
def _has_quantiles(metric, qs):
    def pred(exprs):
        got = {quantile_of(e) for e in exprs if f"{metric}_bucket" in e}
        return set(qs) <= got
    return pred


def _has_all(*needles):
    return lambda exprs: all(any(n in e for e in exprs) for n in needles)


def _has_re(pattern):
    return lambda exprs: any(re.search(pattern, e) for e in exprs)


TOPICS = [
    ("TTFT p50/p90/p99", r"(?i)first token",
     _has_quantiles("duet_time_to_first_token_seconds", [0.5, 0.9, 0.99]), {"s"}),
    ("inter-token latency p50/p90/p99", r"(?i)inter-token",
     _has_quantiles("duet_inter_token_latency_seconds", [0.5, 0.9, 0.99]), {"s"}),
    ("end-to-end latency p50/p90/p99", r"(?i)end-to-end",
     _has_quantiles("duet_e2e_request_latency_seconds", [0.5, 0.9, 0.99]), {"s"}),
    ("requests/s finished", r"(?i)requests/s",
     _has_re(r"rate\(duet_requests_finished_total\{"), {"reqps"}),
    ("tokens/s prompt + generation", r"(?i)tokens/s",
     _has_all("rate(duet_prompt_tokens_total{", "rate(duet_generation_tokens_total{"), None),
    ("K/V transfer time p50/p99", r"(?i)K/V transfer time",
     _has_quantiles("duet_kv_transfer_seconds", [0.5, 0.99]), {"s"}),
    ("K/V transfer bytes/s", r"(?i)K/V transfer bytes",
     _has_all("rate(duet_kv_transfer_bytes_total{"), {"Bps", "binBps"}),
    ("prefill time p50/p99", r"(?i)^prefill time",
     _has_quantiles("duet_prefill_time_seconds", [0.5, 0.99]), {"s"}),
    ("prefill queue time p50/p99", r"(?i)prefill queue time",
     _has_quantiles("duet_prefill_queue_time_seconds", [0.5, 0.99]), {"s"}),
    ("sessions by state", r"(?i)sessions by state",
     _has_re(r"by \([^)]*\bstate\b[^)]*\) \(duet_sessions\{"), None),
    ("K/V cache usage", r"(?i)K/V cache usage",
     _has_all("duet_kv_cache_usage_ratio{"), {"percentunit"}),
    ("batch size avg and p90", r"(?i)batch size",
     lambda exprs: _has_re(r"rate\(duet_batch_size_sum\{[^}]*\}\[[^]]*\]\)\)\s*/\s*"
                           r"sum by \([^)]*\) \(rate\(duet_batch_size_count\{")(exprs)
     and _has_quantiles("duet_batch_size", [0.9])(exprs), None),
    ("requests waiting/running, decode + prefill", r"(?i)waiting",
     _has_all("duet_requests_running{", "duet_requests_waiting{",
              "duet_prefill_requests_running{", "duet_prefill_requests_waiting{"), None),
    ("errors by status code", r"(?i)errors",
     _has_re(r"sum by \([^)]*\bcode\b[^)]*\) \(rate\(duet_request_errors_total\{"), {"reqps"}),
]


def check_topics(d):
    panels = dash.query_panels(d)
    for topic, title_re, pred, units in TOPICS:
        found = [p for p in panels
                 if re.search(title_re, p.get("title", ""))
                 and pred([t.get("expr", "") for t in p.get("targets", [])])]
        if not found:
            fail(f"no panel for {topic!r} (title matching /{title_re}/ with the right queries)")
            continue
        unit = found[0].get("fieldConfig", {}).get("defaults", {}).get("unit")
        if units and unit not in units:
            fail(f"panel {found[0]['title']!r} ({topic}) has unit {unit!r}, want one of "
                 f"{sorted(units)}")
    # Every metric of the set appears somewhere, except what no panel needs.
    used = {dash.series_names()[n] for _, _, _, e in dash.exprs(d) for n in dash.metric_refs(e)
            if n in dash.series_names()}
    for name in sorted(set(dash.METRICS) - used):
        fail(f"no panel shows {name}")


def check_promql_parses(d, promtool):
    """promtool check rules parses every expression (with the variables substituted)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (title, ref, _, expr) in enumerate(dash.exprs(d)):
        sub = dash.substitute(expr, dash.grafana_regex_escape("duet-tiny"), "1m")
        lines.append(f"      - record: duet_dashboard_expr_{i}")
        lines.append("        expr: |-")
        lines.extend("          " + ln for ln in sub.splitlines())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dashboard_rules.yml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        r = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
        if r.returncode != 0:
            fail("promtool does not parse every dashboard expression:\n" + r.stdout + r.stderr)


def check_metrics_header(repo):
    """dashboard.METRICS agrees with the names in common/metrics (the C++ side's one place)."""
    header = os.path.join(repo, "common/metrics/include/duet/metrics/metrics.h")
    if not os.path.exists(header):
        fail(f"{header} is missing: cannot hold the dashboard's metric set against the servers'")
        return
    with open(header, encoding="utf-8") as f:
        text = f.read()
    # Counters may be spelled with or without _total there (prometheus-cpp versions differ).
    in_header = {re.sub(r"_total$", "", n) for n in re.findall(r'"(duet_\w+)"', text)}
    for name in sorted(in_header - set(dash.METRICS)):
        fail(f"metrics.h defines {name}, which the dashboard's metric set does not know")
    for name in sorted(set(dash.METRICS) - in_header):
        fail(f"the dashboard's metric set has {name}, which metrics.h does not define")


def check_provisioning(repo):
    prov = os.path.join(repo, "deploy/grafana/provisioning")
    ds_path = os.path.join(prov, "datasources/duet.yaml")
    db_path = os.path.join(prov, "dashboards/duet.yaml")
    for path in (ds_path, db_path):
        if not os.path.exists(path):
            fail(f"{path} is missing")
            return
    ds = open(ds_path, encoding="utf-8").read()
    db = open(db_path, encoding="utf-8").read()
    # Line checks: the files are flat enough, and no YAML parser is guaranteed on the machine.
    for pattern, what in [(r"(?m)^apiVersion: 1$", "apiVersion: 1"),
                          (r"(?m)^datasources:$", "a datasources list"),
                          (r"(?m)^\s+type: prometheus$", "type: prometheus"),
                          (r"(?m)^\s+url: \$\{PROMETHEUS_URL\}$", "url: ${PROMETHEUS_URL}"),
                          (r"(?m)^\s+timeInterval: (\d+s)$", "jsonData.timeInterval")]:
        if not re.search(pattern, ds):
            fail(f"{ds_path}: want {what}")
    for pattern, what in [(r"(?m)^apiVersion: 1$", "apiVersion: 1"),
                          (r"(?m)^providers:$", "a providers list"),
                          (r"(?m)^\s+type: file$", "type: file"),
                          (r"(?m)^\s+path: /var/lib/grafana/dashboards/duet$",
                           "options.path: /var/lib/grafana/dashboards/duet")]:
        if not re.search(pattern, db):
            fail(f"{db_path}: want {what}")
    # Grafana's $__rate_interval is right only when timeInterval is the scrape interval.
    ti = re.search(r"(?m)^\s+timeInterval: (\d+s)$", ds)
    prom = open(os.path.join(repo, "deploy/prometheus/prometheus.yml"), encoding="utf-8").read()
    si = re.search(r"(?m)^\s+scrape_interval: (\d+s)$", prom)
    if ti and si and ti.group(1) != si.group(1):
        fail(f"datasource timeInterval {ti.group(1)} differs from prometheus.yml's scrape_interval "
             f"{si.group(1)}")
    try:
        import yaml  # optional: a full parse where PyYAML happens to be installed
    except ImportError:
        return
    for path in (ds_path, db_path):
        try:
            yaml.safe_load(open(path, encoding="utf-8"))
        except yaml.YAMLError as e:
            fail(f"{path} is not valid YAML: {e}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    repo = sys.argv[1]
    path = os.path.join(repo, "deploy/grafana/duet.json")
    try:
        d = dash.load(path)
    except (OSError, ValueError) as e:
        print(f"FAIL {path}: {e}")
        return 1
    promtool = shutil.which("promtool")
    if not promtool:
        fail("promtool is not on PATH: install Debian's prometheus package "
             "(scripts/install_packages scripts/packages-test.txt)")
    check_top(d)
    check_variables(d)
    check_layout(d)
    check_panels(d)
    check_topics(d)
    if promtool:
        check_promql_parses(d, promtool)
    check_metrics_header(repo)
    check_provisioning(repo)
    n_panels = len(dash.query_panels(d))
    n_exprs = len(dash.exprs(d))
    if problems:
        for p in problems:
            print("FAIL", p)
        print(f"{len(problems)} problem(s) in {path} ({n_panels} panels, {n_exprs} expressions)")
        return 1
    print(f"ok: {path}: {n_panels} panels, {n_exprs} expressions, {len(TOPICS)} required topics, "
          f"provisioning files consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
