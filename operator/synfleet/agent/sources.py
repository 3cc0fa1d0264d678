"""Where an agent's DataplaneConfig comes from. Both sources are select()able
(readable when the document may have changed) and return the whole document
as text, so the agent validates and applies it the same way whatever its origin:
a file (`--config`), or the pool's ConfigMap and salt Secret (`--kubernetes`)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from synfleet import contract
from synfleet.agent.inotify import FileWatch
from synfleet.config import yamltext
from synfleet.config.schema import ConfigError
from synfleet.kube import Kube, api_client

log = logging.getLogger("synfleet.agent")


class FileSource(FileWatch):
    # A file has no version the control plane could wait for, and carries no
    # retirement: `synfleet agent uninstall` is file mode's teardown.
    version: str | None = None

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def wait_synced(self, timeout: float) -> bool:
        return True

    def retirement(self) -> str | None:
        return None

    def describe(self) -> str:
        return self.path

    def read(self) -> str:
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read {self.path}: {err.strerror}") from None



@dataclass(frozen=True)
class KubeSourceOptions:
    namespace: str
    configmap: str
    secret: str | None          # proxies only
    node_addresses: str         # comma-separated, as status.hostIPs gives them
    kubeconfig: str | None = None


WATCH_TIMEOUT_S = 60
MAX_BACKOFF_S = 30.0


class KubeSource:
    """Watches one ConfigMap and (proxies) one Secret by name: list, then watch
    from the list's resourceVersion; on 410 Gone list again; on errors back off
    exponentially. Each change wakes the agent through a pipe."""

    def __init__(self, opts: KubeSourceOptions) -> None:
        self.opts = opts
        self._addresses = opts.node_addresses
        self.kube = Kube(api_client(opts.kubeconfig))
        self._objects: dict[str, dict | None] = {}
        self._listed = {kind: threading.Event() for kind in ("ConfigMap", "Secret")[:1 + bool(opts.secret)]}
        self.version: str | None = None     # the ConfigMap's resourceVersion as last read
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=("ConfigMap", opts.configmap),
                                          name="watch-configmap", daemon=True)]
        if opts.secret:
            self._threads.append(threading.Thread(target=self._watch, args=("Secret", opts.secret),
                                                  name="watch-secret", daemon=True))
        for t in self._threads:
            t.start()

    def describe(self) -> str:
        parts = [f"ConfigMap {self.opts.namespace}/{self.opts.configmap}"]
        if self.opts.secret:
            parts.append(f"Secret {self.opts.namespace}/{self.opts.secret}")
        return " + ".join(parts)

    def fileno(self) -> int:
        return self._wake_r

    def changed(self) -> bool:
        hit = False
        while True:
            try:
                hit |= bool(os.read(self._wake_r, 512))
            except BlockingIOError:
                return hit

    def _set(self, kind: str, obj: dict | None) -> None:
        if self._stop.is_set():
            return
        with self._lock:
            if kind in self._objects and self._objects[kind] == obj:
                return
            self._objects[kind] = obj
            self._listed[kind].set()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass    # a wake-up is already pending

    def _watch(self, kind: str, name: str) -> None:
        resource = self.kube.resource("v1", kind)
        selector = f"metadata.name={name}"
        version, backoff = None, 1.0
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = resource.get(namespace=self.opts.namespace, field_selector=selector)
                    items = listed.to_dict().get("items") or []
                    self._set(kind, items[0] if items else None)
                    version = listed.metadata.resourceVersion
                for event in self.kube.dyn.watch(resource, namespace=self.opts.namespace,
                                                 field_selector=selector, resource_version=version,
                                                 timeout=WATCH_TIMEOUT_S, allow_watch_bookmarks=True):
                    raw = event["raw_object"]
                    if event["type"] == "ERROR":
                        if raw.get("code") == 410:   # too old: list again
                            version = None
                        break
                    version = raw["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._set(kind, None if event["type"] == "DELETED" else raw)
                backoff = 1.0
            except Exception as err:  # the API server being away must never end the agent
                status = getattr(err, "status", None)
                if status == 410:
                    version = None
                    continue
                log.warning("watch failed; retrying", extra={"kind": kind, "name": name,
                                                              "error": str(err), "retry_s": backoff})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def wait_synced(self, timeout: float) -> bool:
        """Whether every watched object was listed once within `timeout`
        (an agent starting while the API server is away does not wait longer)."""
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._listed.values())

    def retirement(self) -> str | None:
        with self._lock:
            return contract.configmap_retirement(self._objects.get("ConfigMap"))

    def read(self) -> str:
        with self._lock:
            cm, secret = self._objects.get("ConfigMap"), self._objects.get("Secret")
        self.version = contract.configmap_version(cm)
        document = contract.configmap_document(cm, f"{self.opts.namespace}/{self.opts.configmap}")
        keys = None
        if self.opts.secret:
            if secret is None:
                raise ConfigError(f"Secret {self.opts.namespace}/{self.opts.secret} does not exist (yet)")
            keys = contract.secret_salt_keys(secret)
        return yamltext.dump_compact(contract.node_document(document, contract.node_addresses(self._addresses), keys))

    def close(self) -> None:
        self._stop.set()
        os.close(self._wake_r)
        os.close(self._wake_w)
