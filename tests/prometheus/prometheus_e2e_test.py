#!/usr/bin/env python3
"""A real Prometheus scrapes the real pair under `duet bench` load, and every PromQL expression of
the Grafana dashboard returns data.

  prometheus_e2e_test.py --decode BIN --prefill BIN --duet BIN --repo DIR --model DIR

1. duet-prefill and duet-decode start on 127.0.0.1 (gRPC and metrics on port 0; the ports come
   from their "listening on" and "metrics on" lines); `promtool check metrics` must report
   nothing on either /metrics.
2. Debian's prometheus starts on 127.0.0.1 (a free port, a temp TSDB) with deploy/prometheus's
   prometheus.yml and rules.yml copied unchanged into a temp directory next to a targets/
   directory this test writes (file_sd paths are relative to the config file).
3. Once both targets are up: two requests the server must refuse (an unknown session: NOT_FOUND;
   max_tokens past the context: INVALID_ARGUMENT), so the errors panel has data; then
   `duet bench` (--concurrency 4 --requests 25 --prompt-tokens 256 --max-tokens 32).
4. After Prometheus has scraped the load, every expression of deploy/grafana/duet.json ($model =
   the model name, $__rate_interval = a window covering the whole run) is an instant query on
   /api/v1/query: each must return at least one series, and every value must be a number (not
   NaN: a NaN quantile means no observations in the window). Counters are also checked exactly
   against the load (25 TTFTs, 25 x 32 generated tokens, ...).
5. TTFT p50: Prometheus's histogram_quantile(0.5, sum by (le) (increase(..._bucket[window])))
   against the client's p50 from the bench JSON. Rule: with (lo, hi] the histogram bucket that
   contains Prometheus's estimate, |prometheus - client| <= hi - lo (the estimate only knows the
   bucket, and interpolates linearly inside it).
Prometheus and both servers are stopped on every path; their logs are printed on failure.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dashboard as dash  # noqa: E402

# An odd number of requests: the client's p50 is then one observation (the 13th of 25), and
# histogram_quantile's rank 12.5 falls in the bucket holding that same observation, so the two
# p50s differ by where inside that bucket the estimate lands, plus the client's own share of the
# latency (its call setup, loopback, thread wake-ups: 2-5 ms on a busy 2-core machine, which the
# server cannot see). 256-token prompts put TTFT near 100 ms, where buckets are 25-50 ms wide and
# that share stays well inside one; with 64-token prompts TTFT sits at 15-30 ms in 10 ms buckets
# and the client's share alone can exceed a bucket.
BENCH = {"concurrency": 4, "requests": 25, "prompt_tokens": 256, "max_tokens": 32}


class TestFailure(Exception):
    pass


def log(msg):
    print(msg, flush=True)


class Process:
    """A child process whose stdout+stderr go to a log file and are watched for lines."""

    def __init__(self, name, args, logdir):
        self.name = name
        self.args = args
        self.log_path = os.path.join(logdir, name + ".log")
        self.lines = []
        self.cond = threading.Condition()
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace",
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pattern, timeout):
        """The first match of pattern in the output; fails if the process exits or time runs
        out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise TestFailure(f"{self.name} exited ({self.proc.returncode}) before "
                                      f"printing /{pattern}/")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestFailure(f"{self.name} did not print /{pattern}/ within {timeout} s")
                self.cond.wait(min(left, 0.2))

    def alive(self):
        return self.proc.poll() is None

    def stop(self, grace=15):
        """SIGTERM, then SIGKILL after grace seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} still running {grace} s after SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        self.log.close()
        return self.proc.returncode

    def tail(self, n=40):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8")


class Prometheus:
    def __init__(self, base):
        self.base = base

    def api(self, path, **params):
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as e:
            raise TestFailure(f"GET {path} {params}: HTTP {e.code}: "
                              f"{e.read().decode('utf-8', 'replace')}") from e
        if body.get("status") != "success":
            raise TestFailure(f"GET {path} {params}: {body}")
        return body["data"]

    def query(self, expr, at=None):
        data = self.api("/api/v1/query", query=expr, time=f"{at or time.time():.3f}")
        if data["resultType"] not in ("vector", "scalar"):
            raise TestFailure(f"{expr}: result type {data['resultType']}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def scalar(self, expr):
        r = self.query(expr)
        if len(r) != 1:
            raise TestFailure(f"{expr}: want one series, got {r}")
        return r[0][1]


def promtool_check_metrics(promtool, name, text):
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or out:
        raise TestFailure(f"promtool check metrics on {name}'s /metrics (exit {r.returncode}):\n"
                          f"{out}")
    log(f"promtool check metrics: {name}: no problems ({len(text.splitlines())} lines)")


def parse_exposition(text):
    """{sample name: [label dicts]} of a text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})?\s", line)
        if not m:
            raise TestFailure(f"cannot parse exposition line {line!r}")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append(labels)
    return out


def check_exposition(role, text, model_name):
    """Every series carries model_name and role; every metric of duet's set for this role is
    there (the labelled errors family only once an error happened, so not checked here)."""
    samples = parse_exposition(text)
    for name, label_sets in samples.items():
        if not name.startswith("duet_"):
            continue
        for labels in label_sets:
            if labels.get("model_name") != model_name or labels.get("role") != role:
                raise TestFailure(f"{role}: {name}{labels} lacks model_name=\"{model_name}\" / "
                                  f"role=\"{role}\"")
    names = dash.series_names()
    for sample in samples:
        if sample.startswith("duet_") and sample not in names:
            raise TestFailure(f"{role} exports {sample}, which the dashboard's metric set "
                              "(tests/prometheus/dashboard.py) does not know")
    exported = {names[s] for s in samples if s in names}
    missing = [m for m, (_, roles) in dash.METRICS.items()
               if role in roles and m not in exported and m != "duet_request_errors"]
    if missing:
        raise TestFailure(f"{role}'s /metrics lacks {missing}")
    return samples


def run_cli(args, timeout=120):
    log("$ " + " ".join(args))
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.stdout.strip():
        log(r.stdout.rstrip())
    if r.stderr.strip():
        log(r.stderr.rstrip())
    return r


def scrape_interval(config_text):
    m = re.search(r"(?m)^\s+scrape_interval:\s*(\d+)s\s*$", config_text)
    if not m:
        raise TestFailure("cannot read global scrape_interval (N s) from prometheus.yml")
    return int(m.group(1))


def bucket_containing(bounds, x):
    """(lo, hi] of the sorted finite bucket bounds containing x (lo = 0 for the first)."""
    lo = 0.0
    for hi in bounds:
        if x <= hi:
            return lo, hi
        lo = hi
    return lo, math.inf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--decode", "--prefill", "--duet", "--repo", "--model"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    a = ap.parse_args()

    prometheus_bin = shutil.which("prometheus")
    promtool = shutil.which("promtool")
    if not prometheus_bin or not promtool:
        log("FAIL prometheus/promtool are not on PATH: install Debian's prometheus package "
            "(scripts/install_packages scripts/packages-test.txt)")
        return 1

    tmp = tempfile.mkdtemp(prefix="duet-prom-e2e-")
    procs = []
    ok = False
    t_start = time.monotonic()
    try:
        run_test(a, prometheus_bin, promtool, tmp, procs)
        ok = True
    except TestFailure as e:
        log(f"\nFAIL {e}")
    except Exception as e:  # noqa: BLE001 - report anything with the logs below
        log(f"\nFAIL unexpected {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    finally:
        for p in reversed(procs):
            rc = p.stop()
            log(f"stopped {p.name} (exit {rc})")
        if not ok:
            for p in procs:
                log(f"\n----- last lines of {p.name} ({p.log_path}) -----\n{p.tail()}")
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{'ok' if ok else 'FAILED'} in {time.monotonic() - t_start:.1f} s")
    return 0 if ok else 1


def run_test(a, prometheus_bin, promtool, tmp, procs):
    model_name = os.path.basename(os.path.normpath(a.model))
    board = dash.load(os.path.join(a.repo, "deploy/grafana/duet.json"))
    exprs = dash.exprs(board)

    # 1. The pair, and promtool on both /metrics.
    prefill = Process("duet-prefill", [a.prefill, "--model", a.model, "--listen", "127.0.0.1:0",
                                       "--metrics-listen", "127.0.0.1:0", "--threads", "1"], tmp)
    procs.append(prefill)
    prefill_addr = prefill.wait_line(r"listening on (127\.0\.0\.1:\d+)", 60).group(1)
    prefill_metrics = prefill.wait_line(r"duet-prefill metrics on http://(127\.0\.0\.1:\d+)/metrics",
                                        10).group(1)
    decode = Process("duet-decode", [a.decode, "--model", a.model, "--listen", "127.0.0.1:0",
                                     "--metrics-listen", "127.0.0.1:0", "--prefill", prefill_addr,
                                     "--threads", "1"], tmp)
    procs.append(decode)
    decode_addr = decode.wait_line(r"listening on (127\.0\.0\.1:\d+)", 60).group(1)
    decode_metrics = decode.wait_line(r"duet-decode metrics on http://(127\.0\.0\.1:\d+)/metrics",
                                      10).group(1)
    log(f"duet-prefill gRPC {prefill_addr}, metrics {prefill_metrics}; "
        f"duet-decode gRPC {decode_addr}, metrics {decode_metrics}")
    for role, addr in (("prefill", prefill_metrics), ("decode", decode_metrics)):
        text = http_get(f"http://{addr}/metrics")
        promtool_check_metrics(promtool, f"duet-{role}", text)
        check_exposition(role, text, model_name)

    # 2. Prometheus with the repo's config, copied unchanged, and targets of its own.
    prom_dir = os.path.join(tmp, "prometheus")
    os.makedirs(os.path.join(prom_dir, "targets"))
    for f in ("prometheus.yml", "rules.yml"):
        shutil.copy(os.path.join(a.repo, "deploy/prometheus", f), prom_dir)
    with open(os.path.join(prom_dir, "prometheus.yml"), encoding="utf-8") as f:
        interval = scrape_interval(f.read())
    for role, addr in (("decode", decode_metrics), ("prefill", prefill_metrics)):
        with open(os.path.join(prom_dir, "targets", f"{role}.json"), "w", encoding="utf-8") as f:
            json.dump([{"targets": [addr], "labels": {}}], f)
    prom = None
    for attempt in range(3):  # a free port can be taken between free_port() and the bind
        port = free_port()
        p = Process(f"prometheus-{attempt}", [
            prometheus_bin, f"--config.file={prom_dir}/prometheus.yml",
            f"--storage.tsdb.path={prom_dir}/data", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn"], tmp)
        procs.append(p)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and p.alive():
            try:
                http_get(f"{base}/-/ready", timeout=2)
                prom = Prometheus(base)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        if prom:
            break
        p.stop()
    if not prom:
        raise TestFailure("prometheus did not become ready")
    t_prom = time.time()
    log(f"prometheus {base} ready (scrape_interval {interval} s)")

    deadline = time.monotonic() + 6 * interval + 10
    while True:
        up = {m.get("job"): v for m, v in prom.query("up")}
        if up.get("duet-decode") == 1 and up.get("duet-prefill") == 1:
            break
        if time.monotonic() > deadline:
            targets = prom.api("/api/v1/targets")["activeTargets"]
            raise TestFailure(f"targets not up: up = {up}; targets = "
                              f"{[(t['labels'], t['health'], t['lastError']) for t in targets]}")
        time.sleep(0.5)
    log("both targets up")

    # Grafana's model variable: label_values(duet_requests_running, model_name).
    values = prom.api("/api/v1/label/model_name/values", **{"match[]": "duet_requests_running"})
    if model_name not in values:
        raise TestFailure(f"label_values(duet_requests_running, model_name) = {values}, "
                          f"lacks {model_name}")
    log(f"model variable: label_values(duet_requests_running, model_name) = {values}")

    # 3. Two refused requests, then the load.
    r = run_cli([a.duet, "generate", "--server", decode_addr, "--session", "0" * 32,
                 "--prompt", "hello", "--max-tokens", "4"])
    if r.returncode == 0 or "NOT_FOUND" not in r.stderr:
        raise TestFailure("duet generate on an unknown session should fail with NOT_FOUND")
    r = run_cli([a.duet, "generate", "--server", decode_addr, "--prompt", "hello",
                 "--max-tokens", "100000"])
    if r.returncode == 0 or "INVALID_ARGUMENT" not in r.stderr:
        raise TestFailure("duet generate with max_tokens past the context should fail with "
                          "INVALID_ARGUMENT")
    bench_json = os.path.join(tmp, "bench.json")
    r = run_cli([a.duet, "bench", "--server", decode_addr,
                 "--concurrency", str(BENCH["concurrency"]), "--requests", str(BENCH["requests"]),
                 "--prompt-tokens", str(BENCH["prompt_tokens"]),
                 "--max-tokens", str(BENCH["max_tokens"]), "--seed", "7", "--json", bench_json])
    if r.returncode != 0:
        raise TestFailure(f"duet bench exited {r.returncode}")
    with open(bench_json, encoding="utf-8") as f:
        bench = json.load(f)
    if bench["succeeded"] != BENCH["requests"]:
        raise TestFailure(f"bench: {bench['succeeded']} of {BENCH['requests']} succeeded")

    # 4. Wait until Prometheus has scraped the whole load, then one more scrape so every series
    # that appeared during it (the error codes) has two samples for rate().
    want_tokens = BENCH["requests"] * BENCH["max_tokens"]
    sel = f'{{model_name="{model_name}"}}'
    deadline = time.monotonic() + 4 * interval + 10
    while True:
        got = prom.query(f"sum(duet_generation_tokens_total{sel})")
        if got and got[0][1] >= want_tokens:
            break
        if time.monotonic() > deadline:
            raise TestFailure(f"Prometheus never saw the load: duet_generation_tokens_total = "
                              f"{got}, want {want_tokens}")
        time.sleep(0.5)
    time.sleep(interval + 1)

    # Both expositions after the load: promtool again (now with error series), and every metric
    # of the set on its server, errors included.
    for role, addr in (("prefill", prefill_metrics), ("decode", decode_metrics)):
        text = http_get(f"http://{addr}/metrics")
        promtool_check_metrics(promtool, f"duet-{role} after the load", text)
        samples = check_exposition(role, text, model_name)
        if role == "decode" and "duet_request_errors_total" not in samples:
            raise TestFailure("decode exports no duet_request_errors_total after two errors")

    # Counters against the load (exact: each is a count of known events).
    expect = [
        (f"sum(duet_time_to_first_token_seconds_count{sel})", BENCH["requests"]),
        (f"sum(duet_generation_tokens_total{sel})", want_tokens),
        (f'sum(duet_requests_finished_total{{model_name="{model_name}",finished_reason="length"}})',
         BENCH["requests"]),
        (f"sum(duet_prefill_tokens_total{sel})", BENCH["requests"] * BENCH["prompt_tokens"]),
        (f"sum(duet_prompt_tokens_total{sel})", BENCH["requests"] * BENCH["prompt_tokens"]),
        (f'sum(duet_request_errors_total{{model_name="{model_name}",role="decode",code="NOT_FOUND"}})', 1),
        (f'sum(duet_request_errors_total{{model_name="{model_name}",role="decode",'
         f'code="INVALID_ARGUMENT"}})', 1),
        (f"sum(duet_kv_transfer_seconds_count{sel})", BENCH["requests"]),
    ]
    wrong = []
    for expr, want in expect:
        got = prom.query(expr)
        v = got[0][1] if got else None
        log(f"  {expr} = {v} (want {want})")
        if v != want:
            wrong.append(f"{expr} = {v}, want {want}")
    if wrong:
        raise TestFailure("counters disagree with the load:\n  " + "\n  ".join(wrong))

    # Every dashboard expression returns data.
    window_s = max(60, time.time() - t_prom + 2 * interval)
    window = dash.prom_duration(window_s)
    model_re = dash.grafana_regex_escape(model_name)
    log(f"\ndashboard expressions ($model = {model_re}, $__rate_interval = {window}):")
    empty = []
    for title, ref, legend, expr in exprs:
        q = dash.substitute(expr, model_re, window)
        result = prom.query(q)
        bad = [v for _, v in result if math.isnan(v) or math.isinf(v)]
        shown = ", ".join(f"{v:.4g}" for _, v in result[:4]) + (" ..." if len(result) > 4 else "")
        log(f"  {'ok  ' if result and not bad else 'FAIL'} {title} [{ref} {legend}]: "
            f"{len(result)} series: {shown}")
        if not result:
            empty.append(f"{title} [{ref}]: no series: {q}")
        elif bad:
            empty.append(f"{title} [{ref}]: {len(bad)} value(s) not a number: {q}")
    log(f"{len(exprs) - len(empty)} of {len(exprs)} dashboard expressions returned data")
    if empty:
        raise TestFailure("dashboard expressions without data:\n  " + "\n  ".join(empty))

    # 5. TTFT p50: Prometheus against the client.
    buckets = f"duet_time_to_first_token_seconds_bucket{sel}"
    prom_p50 = prom.scalar(f"histogram_quantile(0.5, sum by (le) (increase({buckets}[{window}])))")
    bounds = sorted(float(m["le"]) for m, _ in prom.query(f"sum by (le) ({buckets})")
                    if m["le"] != "+Inf")
    client_p50 = bench["ttft_ms"]["p50"] / 1e3
    lo, hi = bucket_containing(bounds, prom_p50)
    diff = abs(prom_p50 - client_p50)
    log(f"\nTTFT p50: Prometheus {prom_p50 * 1e3:.2f} ms (histogram_quantile over increase[{window}]), "
        f"client {client_p50 * 1e3:.2f} ms (duet bench, {bench['succeeded']} requests); "
        f"bucket ({lo * 1e3:g}, {hi * 1e3:g}] ms, width {(hi - lo) * 1e3:g} ms; "
        f"|difference| {diff * 1e3:.2f} ms")
    log("rule: |prometheus - client| <= width of the bucket (lo, hi] containing Prometheus's p50")
    if not diff <= hi - lo:
        raise TestFailure(f"TTFT p50 disagrees: Prometheus {prom_p50 * 1e3:.2f} ms vs client "
                          f"{client_p50 * 1e3:.2f} ms, more than the bucket width "
                          f"{(hi - lo) * 1e3:g} ms")

    # The alerting rules load and evaluate.
    groups = prom.api("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    bad_rules = [(r["name"], r.get("health"), r.get("lastError")) for r in rules
                 if r.get("health") != "ok"]
    if not rules or bad_rules:
        raise TestFailure(f"rules.yml in Prometheus: {len(rules)} rules, unhealthy: {bad_rules}")
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    log(f"rules.yml: {len(rules)} rules loaded and evaluated, firing: {firing or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
