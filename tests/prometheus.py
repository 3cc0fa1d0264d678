"""A real Prometheus (Debian's package) for the tests of what the chart ships
for monitoring: the alert rules exactly as `helm template` renders them, the
dashboard's queries as the chart carries them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from kubecluster import kube_tools

CHART = Path(__file__).resolve().parents[1] / "charts" / "synfleet"
PORT = 19090
# Grafana's variables, as "All" and a short rate window (the scrapes are 1 s apart).
DASHBOARD_VARIABLES = {"$pool": ".*", "$node": ".*", "$__rate_interval": "15s"}


def rendered_rules() -> list[dict]:
    """The PrometheusRule's groups as the chart renders them with its default
    values, each `for` shortened to 0 s: the durations are the operator's to
    tune, the expressions are what is tested."""
    out = subprocess.run([str(kube_tools()["helm"]), "template", "synfleet", str(CHART),
                          "--set", "metrics.prometheusRule.enabled=true", "--show-only", "templates/monitoring.yaml"],
                         check=True, capture_output=True, text=True)
    groups = yaml.safe_load(out.stdout)["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["for"] = "0s"
    return groups


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every panel target, variables filled in."""
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


class Prometheus:
    """Scrapes `targets` ({address: labels}) every second and evaluates
    `rules` every second; runs in `ns` (a lab namespace) or here. `close()`
    stops it and removes its data."""

    def __init__(self, targets: dict[str, dict[str, str]], rules: list[dict], ns=None) -> None:
        self.ns = ns
        self.dir = tempfile.mkdtemp(prefix="synfleet-prometheus-")
        self.proc: subprocess.Popen | None = None
        try:
            rules_path = os.path.join(self.dir, "rules.yaml")
            with open(rules_path, "w") as f:
                yaml.safe_dump({"groups": rules}, f)
            check = subprocess.run(["promtool", "check", "rules", rules_path], capture_output=True, text=True)
            if check.returncode != 0:
                raise AssertionError(f"promtool rejects the chart's rules: {check.stdout}{check.stderr}")
            config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                      "rule_files": [rules_path],
                      "scrape_configs": [{"job_name": "synfleet", "static_configs": [
                          {"targets": [address], "labels": labels} for address, labels in targets.items()]}]}
            config_path = os.path.join(self.dir, "prometheus.yml")
            with open(config_path, "w") as f:
                yaml.safe_dump(config, f)
            args = ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={self.dir}/data",
                    f"--web.listen-address=127.0.0.1:{PORT}", "--log.level=warn"]
            log = open(os.path.join(self.dir, "log"), "wb")
            self.proc = ns.popen(*args, stdout=log, stderr=subprocess.STDOUT) if ns else \
                subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self._wait_ready()
            self._wait_scraped(len(targets))
        except BaseException:
            self.close()
            raise

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{PORT}{path}"
        if self.ns is not None:
            return self.ns.http_get(url, timeout=5)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except OSError as err:
            return 0, str(err)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._get("/-/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {self.log()}")
            time.sleep(0.2)

    def _wait_scraped(self, count: int, timeout: float = 30.0) -> None:
        """Until every target was scraped once (discovery hands targets over
        in 5 s batches)."""
        deadline = time.monotonic() + timeout
        while len([r for r in self.query("up") if r["value"][1] == "1"]) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus scraped {self.query('up')} of {count} targets; "
                                   f"{self._get('/api/v1/targets')[1][:2000]}")
            time.sleep(0.5)

    def log(self) -> str:
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()[-3000:]

    def query(self, expr: str) -> list[dict]:
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200:
            raise AssertionError(f"query {expr!r}: {status} {body}")
        return json.loads(body)["data"]["result"]

    def firing(self) -> dict[str, list[dict]]:
        """Labels of every firing alert, by alert name."""
        status, body = self._get("/api/v1/alerts")
        if status != 200:
            raise AssertionError(f"alerts: {status} {body}")
        out: dict[str, list[dict]] = {}
        for alert in json.loads(body)["data"]["alerts"]:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def wait_firing(self, alert: str, timeout: float = 30.0, **labels: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for found in self.firing().get(alert, []):
                if all(found.get(k) == v for k, v in labels.items()):
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{alert} {labels} not firing after {timeout:.0f} s; firing: {self.firing()}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
