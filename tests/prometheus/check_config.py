#!/usr/bin/env python3
"""Static checks of deploy/prometheus/ with Debian's promtool:

  check_config.py REPO_ROOT

- `promtool check config` on prometheus.yml (as committed, with its example targets);
- `promtool check rules` on rules.yml, and `promtool test rules` on tests/prometheus/rules_test.yml;
- the example target files are file_sd JSON naming host:port targets, and set neither role nor
  model_name (the servers export those; a target label would rename them to exported_*);
- the example targets use the servers' default metrics ports (from their flag tables).
Prints every problem and exits 1 if there is any.
"""

import json
import os
import re
import shutil
import subprocess
import sys

problems = []


def run(args, cwd):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    print(f"$ {' '.join(args)}\n{out}")
    if r.returncode != 0:
        problems.append(f"{' '.join(args)} exited {r.returncode}")
    elif re.search(r"(?i)\bwarning\b|\bfailed\b", out):
        problems.append(f"{' '.join(args)} reported a problem")


def default_metrics_port(repo, service):
    """The port of the server's --metrics-listen default, read from its sources (None if not
    found there)."""
    root = os.path.join(repo, f"{service}_service")
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".cc"):
                continue
            text = open(os.path.join(dirpath, name), encoding="utf-8").read()
            # A line naming the flag (metrics-listen / metrics_listen) and a "HOST:PORT" literal.
            m = re.search(r'(?m)^.*metrics[-_]listen.*"[\d.]+:(\d+)".*$', text)
            if m:
                return int(m.group(1))
    return None


def check_targets(repo):
    tdir = os.path.join(repo, "deploy/prometheus/targets")
    for role in ("decode", "prefill"):
        path = os.path.join(tdir, f"{role}.json")
        try:
            groups = json.load(open(path, encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {e}")
            continue
        if not isinstance(groups, list) or not groups:
            problems.append(f"{path}: want a non-empty list of target groups")
            continue
        ports = set()
        for g in groups:
            for t in g.get("targets", []):
                m = re.fullmatch(r"[\w.-]+:(\d+)", t)
                if not m:
                    problems.append(f"{path}: target {t!r} is not host:port")
                else:
                    ports.add(int(m.group(1)))
            for label in ("role", "model_name"):
                if label in (g.get("labels") or {}):
                    problems.append(f"{path}: sets label {label}, which the servers export "
                                    "themselves (it would become exported_{label})")
        want = default_metrics_port(repo, role)
        if want is None:
            problems.append(f"cannot find the default --metrics-listen HOST:PORT in "
                            f"{role}_service/")
        elif want not in ports:
            problems.append(f"{path} does not name duet-{role}'s default metrics port {want} "
                            f"(it names {sorted(ports)})")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    repo = os.path.abspath(sys.argv[1])
    promtool = shutil.which("promtool")
    if not promtool:
        print("FAIL promtool is not on PATH: install Debian's prometheus package "
              "(scripts/install_packages scripts/packages-test.txt)")
        return 1
    prom_dir = os.path.join(repo, "deploy/prometheus")
    run([promtool, "check", "config", "prometheus.yml"], prom_dir)
    run([promtool, "check", "rules", "rules.yml"], prom_dir)
    run([promtool, "test", "rules", "tests/prometheus/rules_test.yml"], repo)
    check_targets(repo)
    if problems:
        for p in problems:
            print("FAIL", p)
        return 1
    print("ok: deploy/prometheus: config, rules and rule tests pass; example targets are the "
          "servers' default metrics ports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
