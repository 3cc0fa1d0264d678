"""A small generic Kubernetes client over the official client's DynamicClient:
get, list, watch, server-side apply, status patch. Shared by the operator and
the agent's cluster mode; it knows nothing of either."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

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

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict]:
        self.on_request("list", kind)
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return found.to_dict().get("items") or []

    def apply(self, obj: dict) -> dict:
        """Server-side apply as this client's field manager: idempotent, so a
        restarted writer converges on the same objects instead of duplicating."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        self.on_request("apply", obj["kind"])
        return self.dyn.server_side_apply(res, body=obj, name=obj["metadata"]["name"],
                                          namespace=obj["metadata"].get("namespace"),
                                          field_manager=self.field_manager, force_conflicts=True).to_dict()

    def patch_status(self, obj: dict, status: dict) -> None:
        res = self.resource(obj["apiVersion"], obj["kind"]).subresources["status"]
        self.on_request("patch_status", obj["kind"])
        meta = obj["metadata"]
        res.patch(body={"status": status}, name=meta["name"], namespace=meta.get("namespace"),
                  content_type="application/merge-patch+json")
