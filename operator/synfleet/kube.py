"""A small generic Kubernetes client over the official client's DynamicClient:
get, server-side apply, status patch, Events, and informers (list + watch). Shared by the operator and
the agent's cluster mode; it knows nothing of either."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from functools import cache
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: the kubeconfig ($KUBECONFIG)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=kubeconfig)
    return client.ApiClient()


class Kube:
    """`on_request(verb, kind)` is told of every request made (for metrics)."""

    def __init__(self, api: client.ApiClient | None = None, field_manager: str = "synfleet",
                 on_request: Callable[[str, str], None] | None = None) -> None:
        self.api = api or api_client()
        # Informers hold a connection each for their watches; writes want theirs kept alive too.
        self.api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 32
        self.field_manager = field_manager
        self.dyn = DynamicClient(self.api)
        self.on_request = on_request or (lambda verb, kind: None)

    @cache
    def resource(self, api_version: str, kind: str):
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict | None:
        self.on_request("get", kind)
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def apply(self, obj: dict) -> dict:
        """Server-side apply as this client's field manager: idempotent, so a
        restarted writer converges on the same objects instead of duplicating."""
        self.on_request("apply", obj["kind"])
        path = self.resource(obj["apiVersion"], obj["kind"]).path(name=obj["metadata"]["name"],
                                                                   namespace=obj["metadata"].get("namespace"))
        return self._send("PATCH", path, obj, "application/apply-patch+yaml",
                          {"fieldManager": self.field_manager, "force": "true"})

    def raw(self, method: str, path: str, query: dict | None, timeout: tuple[float, float],
            body: dict | None = None, content_type: str | None = None):
        """A request as the client's credentials allow; the urllib3 response, unread."""
        config = self.api.configuration
        headers = {"Accept": "application/json", **({"Content-Type": content_type} if content_type else {})}
        auth = config.auth_settings().get("BearerToken")
        if auth:
            headers["Authorization"] = auth["value"]
        url = config.host + path + ("?" + urlencode(query) if query else "")
        return self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout).response

    def _send(self, method: str, path: str, body: dict, content_type: str, query: dict | None = None) -> dict:
        """A write in raw JSON: the dynamic client's objects cost a large
        ConfigMap tens of milliseconds to build and convert back."""
        resp = self.raw(method, path, query, (10, 60), body, content_type)
        data = resp.data
        if resp.status >= 300:
            err = ApiException(status=resp.status, reason=resp.reason)
            err.body = data.decode(errors="replace")
            raise err
        return json.loads(data)

    def post_event(self, obj: dict, etype: str, reason: str, message: str, component: str) -> None:
        """A core/v1 Event about `obj` (what `kubectl describe` shows), from any thread."""
        meta = obj["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = meta.get("namespace") or "default"     # where Events of cluster-scoped objects go
        self.on_request("create", "Event")
        self.resource("v1", "Event").create(namespace=namespace, body={
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "uid": meta.get("uid"), **({"namespace": meta["namespace"]}
                                                          if meta.get("namespace") else {})},
            "type": etype, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "reportingComponent": component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1})

    def patch_status(self, obj: dict, status: dict) -> None:
        self.on_request("patch_status", obj["kind"])
        meta = obj["metadata"]
        path = self.resource(obj["apiVersion"], obj["kind"]).path(name=meta["name"], namespace=meta.get("namespace"))
        self._send("PATCH", path + "/status", {"status": status}, "application/merge-patch+json")


class Gone(Exception):
    """410: the resourceVersion a watch asked for is too old; list again."""


class Informer:
    """One kind's objects in memory, as client-go's informers keep them: list
    (in pages), then watch from the list's resourceVersion (with bookmarks);
    on 410 Gone list again, on errors back off and retry. Raw JSON, no models:
    an operator keeps tens of thousands of Services this way.

    Keeps `keep(obj)` per (namespace, name) and calls `on_change(old, new)`
    (None for absent) from its own thread whenever what is kept changes;
    `synced` is set once the first list is in."""

    PAGE = 100
    WATCH_S = 300
    MAX_BACKOFF_S = 30.0

    def __init__(self, kube: Kube, api_version: str, kind: str, namespace: str | None = None,
                 label_selector: str | None = None, keep: Callable[[dict], object] = lambda o: o,
                 on_change: Callable[[object, object], None] | None = None) -> None:
        self.kube, self.kind = kube, kind
        self.path = kube.resource(api_version, kind).path(namespace=namespace)
        self.selector = label_selector
        self.keep = keep
        self.on_change = on_change or (lambda old, new: None)
        self.synced = threading.Event()
        self._items: dict[tuple[str | None, str], object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)
        self.log = logging.getLogger("synfleet.kube")

    def start(self) -> "Informer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def items(self) -> dict:
        """A copy of what is kept, by (namespace, name)."""
        with self._lock:
            return dict(self._items)

    def _get(self, query: dict, timeout: tuple[float, float]):
        if self.selector:
            query = {**query, "labelSelector": self.selector}
        self.kube.on_request("watch" if query.get("watch") else "list", self.kind)
        resp = self.kube.raw("GET", self.path, query, timeout)
        if resp.status == 410:
            resp.release_conn()
            raise Gone()
        if resp.status >= 300:
            body = resp.data[:300]
            resp.release_conn()
            raise ApiException(status=resp.status, reason=f"{resp.reason}: {body!r}")
        return resp

    def _list(self) -> str:
        seen: dict = {}
        query: dict = {"limit": self.PAGE}
        while True:
            resp = self._get(query, (10, 60))
            page = json.loads(resp.data)
            for obj in page.get("items") or []:
                seen[_key(obj)] = self.keep(obj)
            cont = page["metadata"].get("continue")
            if not cont:
                version = page["metadata"]["resourceVersion"]
                break
            query = {"limit": self.PAGE, "continue": cont}
        with self._lock:
            before, self._items = self._items, seen
        for key in before.keys() | seen.keys():
            if before.get(key) != seen.get(key):
                self._notify(before.get(key), seen.get(key))
        self.synced.set()
        return version

    def _watch(self, version: str) -> str:
        resp = self._get({"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": version,
                          "timeoutSeconds": self.WATCH_S}, (10, self.WATCH_S + 30))
        try:
            for line in resp:
                if self._stop.is_set():
                    break
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "BOOKMARK":
                    continue
                key, new = _key(obj), None if event["type"] == "DELETED" else self.keep(obj)
                with self._lock:
                    old = self._items.pop(key, None)
                    if new is not None:
                        self._items[key] = new
                if old != new:
                    self._notify(old, new)
        finally:
            resp.release_conn()
        return version

    def _notify(self, old: object, new: object) -> None:
        try:
            self.on_change(old, new)
        except Exception:     # the reaction's failure is not the watch's: it goes on
            self.log.exception("reacting to a %s change failed", self.kind)

    def _run(self) -> None:
        version, backoff = None, 1.0
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                backoff = 1.0
            except Gone:
                version = None
            except Exception as err:  # the API server being away must never end the informer
                self.log.warning("list/watch of %s failed (%s); retrying in %g s", self.kind, err, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)


def _key(obj: dict) -> tuple[str | None, str]:
    return obj["metadata"].get("namespace"), obj["metadata"]["name"]
