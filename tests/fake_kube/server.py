"""A stateful Kubernetes API server on 127.0.0.1 for tests, spoken to by the real `kubernetes`
client through a kubeconfig the test writes.

It implements what qlaunch uses, with Kubernetes semantics: server-side apply (PATCH
application/apply-patch+yaml: create or update, fieldManager required, immutable Job
templates, dryRun=All, conflicts without force), GET, list with labelSelector, watch (chunked
stream of JSON events, resumable from a resourceVersion), pod logs (tailLines, sinceSeconds,
timestamps, follow until the container stops), DELETE with propagationPolicy (a Job's default
is Orphan, as in the real API), metadata-only GETs, and errors as Status objects
(401/403/404/409/415/422). Every applied object is checked against the official JSON schema.

A test plays the Job controller and the kubelet with the methods under "controller": start a
pod for a Job, run it, append log lines, finish or evict it, fail or complete the Job.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

RESOURCES = {
    # resource: (apiVersion, kind, namespaced)
    "namespaces": ("v1", "Namespace", False),
    "configmaps": ("v1", "ConfigMap", True),
    "services": ("v1", "Service", True),
    "pods": ("v1", "Pod", True),
    "secrets": ("v1", "Secret", True),
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim", True),
    "jobs": ("batch/v1", "Job", True),
    "serviceaccounts": ("v1", "ServiceAccount", True),
    "roles": ("rbac.authorization.k8s.io/v1", "Role", True),
    "rolebindings": ("rbac.authorization.k8s.io/v1", "RoleBinding", True),
}
GROUP = {"jobs": "batch", "roles": "rbac.authorization.k8s.io", "rolebindings": "rbac.authorization.k8s.io"}
MERGE_PATCH = "application/merge-patch+json"
VERBS = {"GET": "get", "PATCH": "patch", "DELETE": "delete", "POST": "create", "PUT": "update"}
SCHEMA_VERSION = "1.37"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def now_rfc3339(when: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if when is None else when))


def rfc3339_nano(when: float) -> str:
    """Go's RFC3339Nano: trailing zeros of the fraction trimmed (as the kubelet writes it)."""
    seconds = int(when)
    nanos = int(round((when - seconds) * 1e9))
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + fraction + "Z"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _qualified(resource: str) -> str:
    return f"{resource}.{GROUP[resource]}" if resource in GROUP else resource


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(resource)} "{name}" not found', {"name": name, "kind": resource})


# -- label selectors ------------------------------------------------------------------------


def parse_selector(text: str) -> list[tuple[str, str, list[str]]]:
    requirements = []
    for part in re.findall(r"[^,(]+(?:\([^)]*\))?", text or ""):
        part = part.strip().strip(",").strip()
        if not part:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            requirements.append((m[1], m[2], [v.strip() for v in m[3].split(",") if v.strip()]))
        elif m := re.fullmatch(r"(\S+?)\s*(==|!=|=)\s*(\S*)", part):
            requirements.append((m[1], "!=" if m[2] == "!=" else "=", [m[3]]))
        elif part.startswith("!"):
            requirements.append((part[1:], "!", []))
        else:
            requirements.append((part, "exists", []))
    return requirements


def matches(labels: dict, requirements) -> bool:
    for key, op, values in requirements:
        value = labels.get(key)
        if op == "=" and value != values[0]:
            return False
        if op == "!=" and value == values[0]:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and value in values:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True


# -- the server -----------------------------------------------------------------------------


class FakeKube:
    def __init__(self, token: str = "qlaunch-test-token", user: str = "qlaunch-tester", tls: bool = False):
        self.token, self.user = token, user
        # ServiceAccount tokens the "kubelet" handed to pods: token → (namespace, account). Their
        # requests are authorized by the namespace's Roles and RoleBindings, like the real RBAC.
        self.service_account_tokens: dict[str, tuple[str, str]] = {}
        self.cond = threading.Condition()
        self.rv = 0
        self.store: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name)
        self.managers: dict[tuple[str, str, str], str] = {}
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, resource, type, object)
        self.logs: dict[str, list[tuple[float, str]]] = {}  # pod uid → (time, line)
        self.forbidden: set[str] = set()  # namespaces where this user may do nothing
        self.requests: list[dict] = []  # every request: method, path, query, headers, body
        self.responses: list[bytes] = []  # every non-streamed response body
        # Called with (resource, object, dry_run) before an apply is accepted; may raise ApiError
        # (an admission webhook or a quota saying no).
        self.admission = None
        self.foreground_delay = 0.0  # seconds a foreground-deleted Job lingers (pods terminating)
        self.kubelet = None  # exec_stream.Kubelet: runs bare pods and serves pods/exec (opt-in)
        self.closing = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        # HTTPS as in a pod (https://$KUBERNETES_SERVICE_HOST): a self-signed CA for 127.0.0.1.
        self.ca_path: Path | None = None
        if tls:
            self.ca_path = _self_signed(self.httpd)
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_path else 'http'}://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "FakeKube":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def write_kubeconfig(self, path: Path, namespace: str = "default", token: str | None = None) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        **({"certificate-authority": str(self.ca_path)} if self.ca_path else {}),
                    },
                }
            ],
            "users": [{"name": self.user, "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": self.user, "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- storage ----------------------------------------------------------------------------

    def _bump(self, resource: str, kind: str, obj: dict) -> None:
        """Record a change (caller holds the lock) and wake watchers and log followers."""
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, resource, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def _new_meta(self, obj: dict, namespace: str | None) -> None:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}-{secrets.token_hex(6)}"
        meta["creationTimestamp"] = now_rfc3339()
        meta.setdefault("generation", 1)
        if namespace:
            meta["namespace"] = namespace

    def add(self, obj: dict) -> dict:
        """Create any object directly (a Namespace, Secret or PVC the cluster admin made)."""
        resource = next(r for r, (_, kind, _) in RESOURCES.items() if kind == obj["kind"])
        namespaced = RESOURCES[resource][2]
        obj = copy.deepcopy(obj)
        namespace = obj["metadata"].get("namespace", "default") if namespaced else ""
        with self.cond:
            self._new_meta(obj, namespace or None)
            self.store[(resource, namespace, obj["metadata"]["name"])] = obj
            self._bump(resource, "ADDED", obj)
        return obj

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        with self.cond:
            obj = self.store.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def list(self, resource: str, namespace: str, selector: str = "") -> list[dict]:
        with self.cond:
            return [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self.store.items())
                if r == resource
                and ns == namespace
                and matches(o["metadata"].get("labels") or {}, parse_selector(selector))
            ]

    # -- controller (the test plays the Job controller and the kubelet) ---------------------

    def service_account_token(self, namespace: str, account: str) -> str:
        """The token the kubelet projects into a pod running as `account`."""
        token = f"sa-{secrets.token_hex(16)}"
        with self.cond:
            self.service_account_tokens[token] = (namespace, account)
        return token

    def pods_of(self, namespace: str, job: str) -> list[dict]:
        return sorted(
            self.list("pods", namespace, f"batch.kubernetes.io/job-name={job}"),
            key=lambda p: int(p["metadata"]["resourceVersion"]),
        )

    def start_pod(self, namespace: str, job_name: str, index: int | None = None, scheduled: bool = True) -> str:
        with self.cond:
            job = self.store[("jobs", namespace, job_name)]
            if job["spec"].get("suspend"):
                raise AssertionError(f"Job {job_name} is suspended: the Job controller creates no pod for it")
            template = copy.deepcopy(job["spec"]["template"])
            meta = template.get("metadata") or {}
            indexed = job["spec"].get("completionMode") == "Indexed"
            if indexed and index is None:
                index = 0
            stem = f"{job_name}-{index}" if indexed else job_name
            name = f"{stem}-{secrets.token_hex(3)[:5]}"
            labels = dict(meta.get("labels") or {})
            annotations = dict(meta.get("annotations") or {})
            if indexed:
                labels["batch.kubernetes.io/job-completion-index"] = str(index)
                annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            spec = template["spec"]
            if indexed and spec.get("subdomain"):
                spec["hostname"] = f"{job_name}-{index}"
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": annotations,
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": job_name,
                            "uid": job["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": spec,
                "status": {
                    "phase": "Pending",
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "True" if scheduled else "False",
                            **(
                                {}
                                if scheduled
                                else {
                                    "reason": "Unschedulable",
                                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                                }
                            ),
                        }
                    ],
                },
            }
            if scheduled:
                pod["spec"]["nodeName"] = "gke-t4-pool-node-1"
                if spec.get("initContainers"):  # the first init container runs (waits)
                    pod["status"]["initContainerStatuses"] = [
                        {
                            "name": c["name"],
                            "ready": False,
                            "restartCount": 0,
                            "image": c["image"],
                            "imageID": "",
                            "state": {"running": {"startedAt": now_rfc3339()}}
                            if i == 0
                            else {"waiting": {"reason": "PodInitializing"}},
                        }
                        for i, c in enumerate(spec["initContainers"])
                    ]
                pod["status"]["containerStatuses"] = [
                    {
                        "name": c["name"],
                        "ready": False,
                        "restartCount": 0,
                        "image": c["image"],
                        "imageID": "",
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                    for c in spec["containers"]
                ]
            self._new_meta(pod, namespace)
            self.store[("pods", namespace, name)] = pod
            self.logs[pod["metadata"]["uid"]] = []
            self._bump("pods", "ADDED", pod)
            self._sync_job(namespace, job_name)
            return name

    def _pod(self, namespace: str, name: str) -> dict:
        return self.store[("pods", namespace, name)]

    def _owner(self, pod: dict) -> str | None:
        refs = pod["metadata"].get("ownerReferences") or []
        return refs[0]["name"] if refs else None

    def run_pod(self, namespace: str, name: str) -> None:
        with self.cond:
            pod = self._pod(namespace, name)
            started = now_rfc3339()
            pod["spec"]["nodeName"] = "gke-t4-pool-node-1"
            pod["status"]["phase"] = "Running"
            pod["status"]["conditions"] = [
                {"type": t, "status": "True"} for t in ("PodScheduled", "Initialized", "Ready")
            ]
            if pod["spec"].get("initContainers"):
                pod["status"]["initContainerStatuses"] = [
                    {
                        "name": c["name"],
                        "ready": True,
                        "restartCount": 0,
                        "image": c["image"],
                        "imageID": "",
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                    }
                    for c in pod["spec"]["initContainers"]
                ]
            pod["status"]["containerStatuses"] = [
                {
                    "name": c["name"],
                    "ready": True,
                    "restartCount": 0,
                    "image": c["image"],
                    "imageID": "",
                    "state": {"running": {"startedAt": started}},
                }
                for c in pod["spec"]["containers"]
            ]
            self._bump("pods", "MODIFIED", pod)
            self._sync_job(namespace, self._owner(pod))

    def log(self, namespace: str, name: str, *lines: str) -> None:
        with self.cond:
            uid = self._pod(namespace, name)["metadata"]["uid"]
            for line in lines:
                self.logs[uid].append((time.time(), line))
            self.cond.notify_all()

    def _terminate(self, pod: dict, exit_code: int, reason: str) -> None:
        pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        pod["status"]["conditions"] = [c for c in pod["status"].get("conditions") or [] if c["type"] != "Ready"]
        for status in pod["status"].get("containerStatuses") or []:
            status["ready"] = False
            status["state"] = {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now_rfc3339()}}

    def finish_pod(self, namespace: str, name: str, exit_code: int = 0, reason: str | None = None) -> None:
        with self.cond:
            pod = self._pod(namespace, name)
            self._terminate(pod, exit_code, reason or ("Completed" if exit_code == 0 else "Error"))
            self._bump("pods", "MODIFIED", pod)
            self._sync_job(namespace, self._owner(pod))

    def evict_pod(
        self, namespace: str, name: str, reason: str = "PreemptionByScheduler", terminate: bool = True
    ) -> None:
        """The scheduler or the eviction API takes the pod away: DisruptionTarget, SIGTERM; the
        trainer checkpoints and exits 75 (with terminate=False it is still saving)."""
        with self.cond:
            pod = self._pod(namespace, name)
            pod["status"].setdefault("conditions", []).append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": reason,
                    "message": "Kubernetes: preempted by a higher-priority pod",
                    "lastTransitionTime": now_rfc3339(),
                }
            )
            pod["metadata"]["deletionTimestamp"] = now_rfc3339()
            if terminate:
                self._terminate(pod, 75, "Error")
            self._bump("pods", "MODIFIED", pod)
            self._sync_job(namespace, self._owner(pod))

    def complete_job(self, namespace: str, name: str) -> None:
        with self.cond:
            self._set_job_condition(namespace, name, "Complete", "CompletionsReached")

    def fail_job(self, namespace: str, name: str, reason: str = "BackoffLimitExceeded") -> None:
        with self.cond:
            self._set_job_condition(namespace, name, "Failed", reason)

    def _set_job_condition(self, namespace: str, name: str, kind: str, reason: str) -> None:
        job = self.store[("jobs", namespace, name)]
        conditions = job["status"].setdefault("conditions", [])
        if kind == "Complete":
            conditions.append({"type": "SuccessCriteriaMet", "status": "True", "reason": reason})
        conditions.append({"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now_rfc3339()})
        job["status"]["completionTime" if kind == "Complete" else "terminatingTime"] = now_rfc3339()
        self._bump("jobs", "MODIFIED", job)

    def _sync_job(self, namespace: str, name: str | None) -> None:
        job = self.store.get(("jobs", namespace, name or ""))
        if job is None:
            return
        pods = [p for (r, ns, _), p in self.store.items() if r == "pods" and ns == namespace and self._owner(p) == name]
        phases = [p["status"]["phase"] for p in pods]
        status = job["status"]
        status["active"] = sum(1 for p in phases if p in ("Pending", "Running"))
        status["succeeded"] = phases.count("Succeeded")
        # podFailurePolicy: a DisruptionTarget pod is ignored, not counted as failed.
        status["failed"] = sum(
            1
            for p in pods
            if p["status"]["phase"] == "Failed"
            and not any(c["type"] == "DisruptionTarget" for c in p["status"].get("conditions") or [])
        )
        completions = job["spec"].get("completions") or 1
        if status["succeeded"] >= completions and not any(
            c["type"] == "Complete" for c in status.get("conditions") or []
        ):
            self._set_job_condition(namespace, name, "Complete", "CompletionsReached")
            return
        self._bump("jobs", "MODIFIED", job)

    # -- request handling -------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes):
        """Returns (code, payload dict) or ("stream", generator of bytes) for watch/follow."""
        self.requests.append(
            {
                "method": method,
                "path": path,
                "query": query,
                "headers": dict(headers),
                "body": body.decode("utf-8", "replace"),
            }
        )
        route = self._route(path)
        resource, namespace, name, sub = route
        bearer = (headers.get("Authorization") or "").removeprefix("Bearer ")
        if bearer in self.service_account_tokens:
            verb = VERBS.get(method, method.lower()) if name is not None or method != "GET" else "list"
            verb = "watch" if query.get("watch") in ("true", "True", "1") else verb
            self._authorize(bearer, verb, resource, sub, namespace, name)
        elif bearer != self.token:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if resource == "namespaces" and name in self.forbidden:
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: User "{self.user}" cannot get '
                'resource "namespaces" in API group "" at the cluster scope',
            )
        if namespace in self.forbidden:
            verb = {"GET": "list" if name is None else "get", "PATCH": "patch", "DELETE": "delete"}.get(
                method, method.lower()
            )
            verb = "watch" if query.get("watch") in ("true", "True", "1") else verb
            shown = resource if sub is None else f"{resource}/{sub}"
            group = GROUP.get(resource, "")
            raise ApiError(
                403,
                "Forbidden",
                f'{_qualified(resource)} is forbidden: User "{self.user}" cannot {verb} resource '
                f'"{shown}" in API group "{group}" in the namespace "{namespace}"',
                {"kind": resource},
            )
        if method == "GET" and sub == "log":
            return self._log(namespace, name, query)
        if method == "GET" and name is None:
            if query.get("watch") in ("true", "True", "1"):
                return self._watch(resource, namespace, query)
            return self._list(resource, namespace, query)
        if method == "GET":
            obj = self.get(resource, namespace, name)
            if obj is None:
                raise not_found(resource, name)
            if "as=PartialObjectMetadata" in headers.get("Accept", ""):
                return 200, {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            return 200, obj
        if method == "PATCH" and headers.get("Content-Type", "").startswith(MERGE_PATCH):
            return self._merge_patch(resource, namespace, name, query, body)
        if method == "POST" and sub == "eviction":
            return self._evict(namespace, name)
        if method == "PATCH":
            return self._apply(resource, namespace, name, query, headers, body)
        if method == "DELETE":
            return self._delete(resource, namespace, name, query, body)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported by the fake API server")

    def _authorize(
        self, token: str, verb: str, resource: str, sub: str | None, namespace: str, name: str | None
    ) -> None:
        """RBAC for a ServiceAccount token: allowed when a RoleBinding of the namespace binds the
        account to a Role with a rule matching the group, resource, verb and resourceName."""
        account_ns, account = self.service_account_tokens[token]
        user = f"system:serviceaccount:{account_ns}:{account}"
        with self.cond:
            if ("serviceaccounts", account_ns, account) not in self.store:
                raise ApiError(401, "Unauthorized", "Unauthorized")  # the token's account was deleted
            bindings = [b for (r, ns, _), b in self.store.items() if r == "rolebindings" and ns == namespace]
            roles = {n: o for (r, ns, n), o in self.store.items() if r == "roles" and ns == namespace}
        shown = resource if sub is None else f"{resource}/{sub}"
        group = GROUP.get(resource, "")
        for binding in bindings:
            bound = any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == account
                and s.get("namespace", namespace) == account_ns
                for s in binding.get("subjects") or []
            )
            if not bound or binding["roleRef"].get("kind") != "Role":
                continue
            for rule in (roles.get(binding["roleRef"]["name"]) or {}).get("rules") or []:
                if (
                    (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
                    and (shown in rule.get("resources", []) or "*" in rule.get("resources", []))
                    and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
                    and (not rule.get("resourceNames") or name in rule["resourceNames"])
                ):
                    return
        target = f'{_qualified(resource)} "{name}"' if name else _qualified(resource)
        raise ApiError(
            403,
            "Forbidden",
            f'{target} is forbidden: User "{user}" cannot {verb} resource "{shown}" '
            f'in API group "{group}" in the namespace "{namespace}"',
            {"name": name or "", "kind": resource},
        )

    def _route(self, path: str) -> tuple[str, str, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest, group = parts[2:], ""
        elif len(parts) >= 3 and parts[0] == "apis" and parts[2] == "v1":
            rest, group = parts[3:], parts[1]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rest[:1] == ["namespaces"] and len(rest) <= 2 and not group:
            return "namespaces", "", rest[1] if len(rest) == 2 else None, None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in RESOURCES:
            resource = rest[2]
            if GROUP.get(resource, "") != group:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return resource, rest[1], rest[3] if len(rest) > 3 else None, rest[4] if len(rest) > 4 else None
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _list(self, resource: str, namespace: str, query: dict):
        api_version, kind, _ = RESOURCES[resource]
        items = self.list(resource, namespace, query.get("labelSelector", ""))
        with self.cond:
            version = str(self.rv)
        return 200, {
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    def _watch(self, resource: str, namespace: str, query: dict):
        requirements = parse_selector(query.get("labelSelector", ""))
        timeout = float(query.get("timeoutSeconds") or 1800)
        since = query.get("resourceVersion")

        def wanted(obj: dict) -> bool:
            meta = obj.get("metadata") or {}
            return meta.get("namespace", "") == namespace and matches(meta.get("labels") or {}, requirements)

        def events():
            deadline = time.monotonic() + timeout
            with self.cond:
                if since in (None, "", "0"):
                    # No version: the current state as ADDED events first, as the real server does.
                    start = self.rv
                    initial = [o for (r, ns, _), o in sorted(self.store.items()) if r == resource and wanted(o)]
                    pending = [("ADDED", copy.deepcopy(o)) for o in initial]
                else:
                    start = int(since)
                    pending = []
            for kind, obj in pending:
                yield json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            position = start
            while True:
                with self.cond:
                    while not self.closing and (not self.history or self.history[-1][0] <= position):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return
                        self.cond.wait(min(left, 0.5))
                    if self.closing or not self.history:
                        return
                    fresh = [(rv, kind, obj) for rv, r, kind, obj in self.history if rv > position and r == resource]
                    position = self.history[-1][0]
                for _, kind, obj in fresh:
                    if wanted(obj):
                        yield json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                if time.monotonic() >= deadline:
                    return

        return "stream", events(), "application/json"

    def _log(self, namespace: str, name: str, query: dict):
        pod = self.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container")
        if container is None and len(names) > 1:
            raise ApiError(
                400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: {names}"
            )
        container = container or names[0]
        if container not in names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        state = next((s["state"] for s in pod["status"].get("containerStatuses") or [] if s["name"] == container), {})
        if not (state.get("running") or state.get("terminated")):
            waiting = (state.get("waiting") or {}).get("reason", "PodInitializing")
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {waiting}')
        uid = pod["metadata"]["uid"]
        follow = query.get("follow") in ("true", "True", "1")
        stamps = query.get("timestamps") in ("true", "True", "1")
        since = float(query["sinceSeconds"]) if query.get("sinceSeconds") else None
        tail = int(query["tailLines"]) if query.get("tailLines") else None

        def render(entries):
            return b"".join(((rfc3339_nano(t) + " " if stamps else "") + line + "\n").encode() for t, line in entries)

        def chunks():
            with self.cond:
                entries = list(self.logs.get(uid, []))
            if since is not None:
                cutoff = time.time() - since
                entries = [e for e in entries if e[0] >= cutoff]
            if tail is not None:
                entries = entries[-tail:] if tail else []
            sent = len(self.logs.get(uid, []))
            if entries:
                yield render(entries)
            while follow:
                with self.cond:
                    while True:
                        current = self.store.get(("pods", namespace, name))
                        lines = self.logs.get(uid, [])
                        alive = (
                            current is not None
                            and current["metadata"]["uid"] == uid
                            and current["status"]["phase"] in ("Pending", "Running")
                        )
                        if len(lines) > sent or not alive or self.closing:
                            break
                        self.cond.wait(0.5)
                    fresh = lines[sent:]
                    sent = len(lines)
                if fresh:
                    yield render(fresh)
                if not alive or self.closing:
                    return

        if follow:
            return "stream", chunks(), "text/plain"
        return 200, b"".join(chunks())

    def _evict(self, namespace: str, name: str):
        """POST pods/<name>/eviction (the Eviction API, no PodDisruptionBudget in the way): the pod
        gets DisruptionTarget with reason EvictionByEvictionAPI and SIGTERM, as on a real cluster."""
        if self.get("pods", namespace, name) is None:
            raise not_found("pods", name)
        self.evict_pod(namespace, name, reason="EvictionByEvictionAPI", terminate=False)
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    # -- apply ------------------------------------------------------------------------------

    def _invalid(self, kind: str, name: str, field: str, message: str) -> ApiError:
        group = GROUP.get(_plural(kind))
        qualified = f"{kind}.{group}" if group else kind
        return ApiError(
            422,
            "Invalid",
            f'{qualified} "{name}" is invalid: {field}: {message}',
            {"name": name, "kind": kind, "causes": [{"field": field, "message": message}]},
        )

    def _validate(self, resource: str, obj: dict) -> None:
        import jsonschema

        kind, name = obj.get("kind"), obj["metadata"].get("name", "")
        pattern = _DNS_1035 if resource == "services" else _DNS_LABEL if resource == "namespaces" else _SUBDOMAIN
        limit = 63 if resource in ("services", "namespaces", "jobs") else 253
        if len(name) > limit or not pattern.match(name):
            raise self._invalid(
                kind,
                name,
                "metadata.name",
                f'Invalid value: "{name}": must be a valid DNS name of at most {limit} characters',
            )
        for where in ("metadata.labels", "spec.template.metadata.labels"):
            node = obj
            for part in where.split("."):
                node = (node or {}).get(part) if isinstance(node, dict) else None
            for key, value in (node or {}).items():
                if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                    raise self._invalid(
                        kind, name, f"{where}", f'Invalid value: "{value}": a valid label must be 63 characters or less'
                    )
        try:
            _schema_validator(obj["kind"], obj["apiVersion"]).validate(obj)
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise self._invalid(kind, name, path or "(root)", exc.message) from None

    def _apply(self, resource: str, namespace: str, name: str | None, query: dict, headers: dict, body: bytes):
        api_version, kind, namespaced = RESOURCES[resource]
        if not headers.get("Content-Type", "").startswith("application/apply-patch+yaml"):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the fake API server only speaks server-side apply, not {headers.get('Content-Type')}",
            )
        manager = query.get("fieldManager")
        if not manager:
            raise ApiError(
                400, "BadRequest", "fieldManager is required for apply requests (PATCH application/apply-patch+yaml)"
            )
        force = query.get("force") in ("true", "True", "1")
        dry_run = query.get("dryRun") == "All"
        try:
            obj = json.loads(body)  # what the Python client sends: JSON is YAML too
        except ValueError:
            obj = yaml.safe_load(body)
        if obj.get("apiVersion") != api_version or obj.get("kind") != kind:
            raise ApiError(
                400, "BadRequest", f"expected {api_version} {kind}, got {obj.get('apiVersion')} {obj.get('kind')}"
            )
        meta = obj.setdefault("metadata", {})
        if meta.get("name") != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if namespaced and meta.setdefault("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        self._validate(resource, obj)
        if self.admission is not None:
            self.admission(resource, obj, dry_run)
        key = (resource, namespace, name)
        with self.cond:
            if namespaced and ("namespaces", "", namespace) not in self.store:
                raise not_found("namespaces", namespace)
            existing = self.store.get(key)
            if existing is None:
                created = copy.deepcopy(obj)
                self._new_meta(created, namespace if namespaced else None)
                if resource == "jobs":
                    self._job_defaults(created)
                if resource == "pods" and self.kubelet is not None and not dry_run:
                    self.kubelet.admit(created)
                if not dry_run:
                    self.store[key] = created
                    self.managers[key] = manager
                    self._bump(resource, "ADDED", created)
                else:
                    created["metadata"]["resourceVersion"] = ""
                return 201, copy.deepcopy(created)
            if existing["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": object is being deleted',
                    {"name": name, "kind": resource},
                )
            owner = self.managers.get(key)
            if owner not in (None, manager) and not force:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Apply failed with 1 conflict: conflict with "{owner}": .metadata.labels',
                    {"name": name, "kind": resource},
                )
            updated = copy.deepcopy(existing)
            if resource == "jobs":
                applied_template = copy.deepcopy(obj["spec"]["template"])
                applied_template.setdefault("metadata", {}).setdefault("labels", {}).update(
                    {
                        k: v
                        for k, v in existing["spec"]["template"]["metadata"]["labels"].items()
                        if k not in (obj["spec"]["template"].get("metadata") or {}).get("labels", {})
                    }
                )
                for field in ("template", "completions", "completionMode"):
                    new = (
                        applied_template if field == "template" else obj["spec"].get(field, existing["spec"].get(field))
                    )
                    if new != existing["spec"].get(field):
                        raise self._invalid(kind, name, f"spec.{field}", "field is immutable")
            for section, value in obj.items():
                if section not in ("metadata", "status", "apiVersion", "kind"):
                    if resource == "jobs" and section == "spec":
                        updated["spec"] = {
                            **existing["spec"],
                            **value,
                            "template": existing["spec"]["template"],
                            "selector": existing["spec"]["selector"],
                        }
                    else:
                        updated[section] = value
            for field in ("labels", "annotations"):
                if field in meta:
                    updated["metadata"][field] = meta[field]
            changed = updated != existing
            if changed and not dry_run:
                if updated.get("spec") != existing.get("spec"):
                    updated["metadata"]["generation"] = existing["metadata"].get("generation", 1) + 1
                self.store[key] = updated
                self.managers[key] = manager
                self._bump(resource, "MODIFIED", updated)
            return 200, copy.deepcopy(updated if not dry_run else updated)

    def _merge_patch(self, resource: str, namespace: str, name: str | None, query: dict, body: bytes):
        """PATCH application/merge-patch+json (RFC 7386) of an existing object."""
        try:
            patch = json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format") from None
        key = (resource, namespace, name or "")
        dry_run = query.get("dryRun") == "All"
        with self.cond:
            existing = self.store.get(key)
            if existing is None:
                raise not_found(resource, name or "")
            updated = _merged(copy.deepcopy(existing), patch)
            if resource == "jobs":
                for field in ("template", "selector", "completions", "completionMode"):
                    if updated["spec"].get(field) != existing["spec"].get(field):
                        raise self._invalid("Job", name, f"spec.{field}", "field is immutable")
            checked = {k: v for k, v in updated.items() if k != "status"}
            self._validate(resource, checked)
            if updated != existing and not dry_run:
                if updated.get("spec") != existing.get("spec"):
                    updated["metadata"]["generation"] = existing["metadata"].get("generation", 1) + 1
                self.store[key] = updated
                self._bump(resource, "MODIFIED", updated)
            return 200, copy.deepcopy(updated)

    def _job_defaults(self, job: dict) -> None:
        uid = job["metadata"]["uid"]
        spec = job["spec"]
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        labels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": job["metadata"]["name"],
                "controller-uid": uid,
                "job-name": job["metadata"]["name"],
            }
        )
        job["status"] = {"startTime": now_rfc3339(), "active": 0}

    # -- delete -----------------------------------------------------------------------------

    def _delete(self, resource: str, namespace: str, name: str, query: dict, body: bytes):
        options = json.loads(body) if body.strip() else {}
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        dry_run = query.get("dryRun") == "All" or "All" in (options.get("dryRun") or [])
        key = (resource, namespace, name)
        with self.cond:
            obj = self.store.get(key)
            if obj is None:
                raise not_found(resource, name)
            if dry_run:
                return 200, copy.deepcopy(obj)
            if resource != "jobs":
                self._remove(key)
                if resource == "pods":
                    self._sync_job(namespace, self._owner(obj))
                return 200, copy.deepcopy(obj)
            policy = policy or "Orphan"  # the batch/v1 Job default: pods are left behind
            dependents = [
                k
                for k, p in self.store.items()
                if k[0] == "pods"
                and k[1] == namespace
                and any(r.get("uid") == obj["metadata"]["uid"] for r in p["metadata"].get("ownerReferences") or [])
            ]
            if policy == "Orphan":
                for k in dependents:
                    self.store[k]["metadata"]["ownerReferences"] = []
                    self._bump("pods", "MODIFIED", self.store[k])
                self._remove(key)
                return 200, copy.deepcopy(obj)
            if policy == "Background":
                self._remove(key)
                for k in dependents:
                    self._remove(k)
                return 200, copy.deepcopy(obj)
            # Foreground: the Job stays (deletionTimestamp, finalizer) until its pods are gone.
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
            self._bump("jobs", "MODIFIED", obj)
            answer = copy.deepcopy(obj)

        def finish():
            with self.cond:
                for k in dependents:
                    if k in self.store:
                        self._remove(k)
                if self.store.get(key) is obj:
                    self._remove(key)

        if self.foreground_delay:
            threading.Timer(self.foreground_delay, finish).start()
        else:
            finish()
        return 200, answer

    def _remove(self, key: tuple[str, str, str]) -> None:
        obj = self.store.pop(key)
        self.managers.pop(key, None)
        self._bump(key[0], "DELETED", obj)


def _merged(target, patch):
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merged(target.get(key), value)
    return target


def _self_signed(httpd: ThreadingHTTPServer) -> Path:
    """Serve HTTPS with a fresh self-signed certificate for 127.0.0.1; returns the CA file."""
    folder = Path(tempfile.mkdtemp(prefix="fake-kube-tls-"))
    key, cert = folder / "server.key", folder / "ca.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=fake-kube",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return cert


@functools.lru_cache(maxsize=None)
def _schema_validator(kind: str, api_version: str):
    """kubernetes-validate's strict schema for a kind, loaded once (its validate() re-reads the
    schema files on every call)."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{SCHEMA_VERSION}.0-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = json.loads((folder / f"{kind.lower()}-{group_version}.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _plural(kind: str) -> str:
    return next((r for r, (_, k, _) in RESOURCES.items() if k == kind), "")


def _handler(fake: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):  # quiet
            pass

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                result = fake.handle(method, url.path, query, self.headers, body)
            except ApiError as exc:
                result = (exc.code, exc.status())
            if result[0] == "stream":
                self._stream(result[1], result[2])
                return
            code, payload = result
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            fake.responses.append(data)
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, chunks, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in chunks:
                    if chunk:
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def do_GET(self):
            if self.headers.get("Upgrade", "").lower() == "websocket" and fake.kubelet is not None:
                fake.kubelet.serve(self)  # pods/exec (tests/fake_kube/exec_stream.py)
                return
            self._serve("GET")

        def do_PATCH(self):
            self._serve("PATCH")

        def do_DELETE(self):
            self._serve("DELETE")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler
