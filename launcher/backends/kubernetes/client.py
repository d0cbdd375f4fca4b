"""The official Kubernetes client, configured from a kubeconfig or from inside a pod, with every
failure turned into one BackendError a user can act on.

Calls return plain JSON dicts (`_preload_content=False`): the backend reads a few fields, and
the manifests it sends are dicts already.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import urllib3

from ...job.errors import BackendError

FIELD_MANAGER = "qlaunch"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
# (connect, read) seconds for ordinary calls; streams set their own.
REQUEST_TIMEOUT = (10, 60)


class KubeApiError(BackendError):
    """The API server answered with an error Status; `status` is its HTTP code."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


def kubeconfig_paths(explicit: str | None) -> list[Path]:
    raw = explicit or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part]


def _refuse_unknown_context(context: str, paths: list[Path]) -> None:
    """--context that no kubeconfig file defines: say so, and which contexts there are."""
    import yaml

    known: list[str] = []
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return  # the client's own loader reports a broken file
        known += [c.get("name") for c in data.get("contexts") or [] if isinstance(c, dict) and c.get("name")]
    if context not in known:
        files = ", ".join(str(p) for p in paths)
        raise BackendError(
            f"context {context!r} is not in the kubeconfig {files} (its contexts: "
            f"{', '.join(known) or 'none'}); see `kubectl config get-contexts`"
        )


class Kube:
    """A lazily connected API client: rendering and validation never need a cluster."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None):
        self.kubeconfig = kubeconfig
        self.context = context
        self._client = None
        self.host = "?"

    # -- connection ------------------------------------------------------------------------

    def _connect(self):
        from kubernetes import client, config  # a login node without the client can still render

        configuration = client.Configuration()
        configuration.retries = 2
        paths = kubeconfig_paths(self.kubeconfig)
        existing = [p for p in paths if p.is_file()]
        try:
            if existing:
                if self.context:
                    _refuse_unknown_context(self.context, existing)
                config.load_kube_config(
                    config_file=os.pathsep.join(str(p) for p in existing),
                    context=self.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST") and not self.kubeconfig:
                config.load_incluster_config(client_configuration=configuration)
            else:
                shown = ", ".join(str(p) for p in paths)
                raise BackendError(
                    f"no kubeconfig found at {shown} and not running inside a cluster: set KUBECONFIG "
                    "(or log in with your cloud's `get-credentials` command) to reach the cluster"
                )
        except config.ConfigException as exc:
            where = ", ".join(str(p) for p in existing) or "in-cluster config"
            raise BackendError(f"cannot use the Kubernetes configuration ({where}): {exc}") from None
        self.host = configuration.host
        self._client = client.ApiClient(configuration)
        return self._client

    @property
    def api_client(self):
        return self._client or self._connect()

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def batch(self):
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @property
    def rbac(self):
        from kubernetes import client

        return client.RbacAuthorizationV1Api(self.api_client)

    # -- calls -----------------------------------------------------------------------------

    def call(self, fn: Callable, *args, missing_ok: bool = False, what: str = "", **kwargs) -> Any:
        """`fn(*args, **kwargs)` as parsed JSON; None for a 404 when `missing_ok`."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        response = self.open(fn, *args, missing_ok=missing_ok, what=what, **kwargs)
        if response is None:
            return None
        try:
            return json.loads(response.data or b"null")
        finally:
            response.release_conn()

    def open(self, fn: Callable, *args, missing_ok: bool = False, what: str = "", **kwargs):
        """The raw urllib3 response (for streams: watch, log follow)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise self.error(exc, what) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.unreachable(exc) from None

    def watch(self, fn: Callable, *args, timeout_seconds: int, what: str = "", **kwargs) -> Iterator[dict]:
        """Watch events ({"type", "object"} dicts) until the server ends the stream."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        try:
            yield from watch.Watch().stream(
                fn,
                *args,
                timeout_seconds=timeout_seconds,
                deserialize=False,
                _request_timeout=(REQUEST_TIMEOUT[0], timeout_seconds + 30),
                **kwargs,
            )
        except ApiException as exc:
            raise self.error(exc, what) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: Exception) -> BackendError:
        reason = getattr(exc, "reason", None) or exc
        return BackendError(f"cannot reach the Kubernetes API at {self.host}: {reason}")

    def error(self, exc, what: str) -> KubeApiError:
        status = getattr(exc, "status", None)
        message = _status_message(getattr(exc, "body", None)) or getattr(exc, "reason", "") or str(exc)
        doing = f" while {what}" if what else ""
        if status == 0:
            text = f"cannot reach the Kubernetes API at {self.host}{doing}: {message}"
        elif status == 401:
            text = (
                f"the Kubernetes API at {self.host} rejected your credentials{doing} "
                f"(401 Unauthorized): refresh your kubeconfig login. {message}"
            )
        elif status == 403:
            text = f"forbidden{doing}: {message}"
        else:
            text = f"Kubernetes API error {status}{doing}: {message}"
        return KubeApiError(text, status)


def _status_message(body: Any) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return str(body).strip()[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("reason") or "")
    return ""
