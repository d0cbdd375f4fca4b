"""Staging local data files onto the claim: a short-lived pod that mounts it, and each file
streamed through `pods/exec` (the same channel `kubectl cp` uses), before any Job of the run exists.

Per claim: apply one bare Pod (the Jobs' image, user and security context; `sleep`, bounded by
activeDeadlineSeconds, so a launcher that dies leaves nothing running for long) → wait until it
runs → per file: ask whether the target already holds those bytes (then nothing is sent); else
send them to a script that writes `<target>.part.<pid>`, checks the sha256 and renames it into
place, so a half-written file never looks complete → delete the pod (also after an error).
Paths travel as arguments ($1), never inside the script text.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ...grid import Plan
from ...job.config import RunConfig
from ...job.errors import BackendError
from .client import APPLY_PATCH, FIELD_MANAGER, Kube
from .manifests import pull_policy
from .naming import EXPERIMENT_LABEL
from .staging import LocalFile, describe_size

CONTAINER = "stage"
POD_SECONDS = 3600  # how long a staging pod may live, whatever happens to the launcher
START_TIMEOUT = 300.0  # scheduling and pulling the image
CHUNK = 256 * 1024
_STUCK = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}

# stdout "present" when $1 already holds the bytes whose sha256 is $2.
CHECK_SCRIPT = (
    'if [ -f "$1" ] && [ "$(sha256sum < "$1" | cut -d " " -f 1)" = "$2" ]; then echo present; else echo absent; fi'
)
# Reads exactly $2 bytes from stdin (so a v4 exec stream, which cannot signal end of input, works
# too), checks them against $3, then renames them to $1.
UPLOAD_SCRIPT = """set -eu
target=$1 size=$2 want=$3
mkdir -p "$(dirname "$target")"
part="$target.part.$$"
trap 'rm -f "$part"' EXIT
head -c "$size" > "$part"
got=$(sha256sum < "$part" | cut -d " " -f 1)
if [ "$got" != "$want" ]; then
  echo "the claim received bytes with sha256 $got, expected $want" >&2
  exit 3
fi
mv -f "$part" "$target"
trap - EXIT
echo staged"""


def stage_pod(plan: Plan, run: RunConfig, name: str) -> dict[str, Any]:
    """The staging pod for `run`'s claim: the Jobs' image and security context, no GPU, no node
    selector (any node can mount a ReadWriteMany claim), small requests."""
    k8s, root = run.kubernetes, str(plan.storage_root)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": POD_SECONDS,
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    if k8s.tolerations:  # a cluster whose every node is tainted still runs it
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    # Same as the Jobs' (manifests._job): files on the claim belong to the user training reads them as.
    pod["securityContext"] = {
        "fsGroup": k8s.run_as_user,
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsGroup": k8s.run_as_user,
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["containers"] = [
        {
            "name": CONTAINER,
            "image": k8s.image,
            "imagePullPolicy": pull_policy(run),
            "command": ["sleep", str(POD_SECONDS)],
            "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "64Mi"}},
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "runAsNonRoot": True,
            },
            "volumeMounts": [{"name": "storage", "mountPath": root}],
        }
    ]
    pod["volumes"] = [{"name": "storage", "persistentVolumeClaim": {"claimName": k8s.pvc}}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": k8s.namespace,
            "labels": {
                "app.kubernetes.io/component": "stage",
                "app.kubernetes.io/managed-by": "qlaunch",
                "app.kubernetes.io/name": "qlaunch",
                EXPERIMENT_LABEL: plan.experiment.name,
            },
        },
        "spec": pod,
    }


def stage_pod_name() -> str:
    # Random: two submitters staging at once each delete only their own pod.
    return f"qlaunch-stage-{secrets.token_hex(4)}"


@dataclass
class _Exec:
    code: int
    stdout: str
    stderr: str
    message: str


class Stager:
    """Stages files onto one claim through one pod. `say` gets one line per file."""

    def __init__(self, kube: Kube, poll_seconds: float = 2.0, start_timeout: float = START_TIMEOUT):
        self.kube = kube
        self.poll_seconds = poll_seconds
        self.start_timeout = start_timeout

    def stage(self, plan: Plan, run: RunConfig, files: list[LocalFile], say: Callable[[str], None]) -> None:
        k8s = run.kubernetes
        name, namespace = stage_pod_name(), k8s.namespace
        doc = stage_pod(plan, run, name)
        self.kube.call(
            self.kube.core.patch_namespaced_pod,
            name,
            namespace,
            doc,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY_PATCH,
            what=f"creating staging Pod {name}",
        )
        try:
            self._wait_running(namespace, name, k8s.pvc)
            for local in files:
                self._stage_one(namespace, name, k8s.pvc, local, say)
        finally:
            self.kube.call(
                self.kube.core.delete_namespaced_pod,
                name,
                namespace,
                grace_period_seconds=0,
                missing_ok=True,
                what=f"deleting staging Pod {name}",
            )

    def _wait_running(self, namespace: str, name: str, pvc: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        why = "not scheduled yet"
        while True:
            pod = self.kube.call(
                self.kube.core.read_namespaced_pod, name, namespace, what=f"reading staging Pod {name}"
            )
            status = pod.get("status") or {}
            phase = status.get("phase")
            running = any("running" in (s.get("state") or {}) for s in status.get("containerStatuses") or [])
            if phase == "Running" and running:
                return
            if phase in ("Succeeded", "Failed"):
                raise BackendError(
                    f"staging Pod {name} (claim {pvc!r}) ended ({phase}) before the files were "
                    f"staged: {status.get('message') or status.get('reason') or 'see kubectl describe pod'}"
                )
            for container in status.get("containerStatuses") or []:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in _STUCK:
                    detail = (
                        f"{waiting['reason']}: {waiting['message']}" if waiting.get("message") else waiting["reason"]
                    )
                    raise BackendError(
                        f"staging Pod {name} cannot start ({detail}); check kubernetes.image "
                        "(the staging pod uses the Jobs' image); nothing was submitted"
                    )
                if waiting.get("reason"):
                    why = waiting["reason"]
            for condition in status.get("conditions") or []:
                if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                    why = f"unschedulable: {condition.get('message') or condition.get('reason')}"
            if time.monotonic() > deadline:
                raise BackendError(
                    f"staging Pod {name} did not start within {self.start_timeout:.0f}s ({why}); "
                    f"nothing was submitted. It mounts claim {pvc!r}: check `kubectl -n {namespace} "
                    f"describe pod {name}`"
                )
            time.sleep(self.poll_seconds)

    def _stage_one(self, namespace: str, pod: str, pvc: str, local: LocalFile, say: Callable[[str], None]) -> None:
        shown = f"{local.source} ({describe_size(local.size)})"
        check = self._exec(namespace, pod, ["sh", "-c", CHECK_SCRIPT, "qlaunch-check", local.pod_path, local.sha256])
        if check.code == 0 and check.stdout.strip() == "present":
            say(f"already on claim {pvc}: {shown} at {local.pod_path}")
            return
        if check.code != 0:
            raise self._failed(local, pvc, check)
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        progress = Progress(
            TextColumn("staging {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        )
        with progress:
            task = progress.add_task(local.source.name, total=local.size)
            result = self._exec(
                namespace,
                pod,
                ["sh", "-c", UPLOAD_SCRIPT, "qlaunch-stage", local.pod_path, str(local.size), local.sha256],
                stdin=_chunks(local),
                sent=lambda n: progress.advance(task, n),
                timeout=120 + local.size / 1e6,
            )
        if result.code != 0 or result.stdout.strip() != "staged":
            raise self._failed(local, pvc, result)
        say(f"staged onto claim {pvc}: {shown} at {local.pod_path}")

    @staticmethod
    def _failed(local: LocalFile, pvc: str, result: _Exec) -> BackendError:
        detail = (result.stderr.strip() or result.message or result.stdout.strip() or "no output").splitlines()[-1]
        return BackendError(
            f"staging {local.source} onto claim {pvc!r} at {local.pod_path} failed "
            f"(exit code {result.code}): {detail}; no Job was submitted"
        )

    def _exec(
        self,
        namespace: str,
        pod: str,
        command: list[str],
        stdin: Iterator[bytes] | None = None,
        sent: Callable[[int], None] | None = None,
        timeout: float = 120,
    ) -> _Exec:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream
        from websocket import WebSocketException

        try:
            ws = stream(
                self.kube.core.connect_get_namespaced_pod_exec,
                pod,
                namespace,
                container=CONTAINER,
                command=command,
                stdin=stdin is not None,
                stdout=True,
                stderr=True,
                tty=False,
                _preload_content=False,
                binary=True,
            )
        except ApiException as exc:
            # A refused WebSocket upgrade comes back as status 0 with the HTTP status in its reason.
            reason = str(exc.reason or exc).split(" -+-+- ")[0]
            if "403" in reason:
                raise BackendError(
                    f"forbidden to exec into staging Pod {pod} in namespace {namespace!r} ({reason}): "
                    "staging local data files needs `create` on pods/exec (and on pods); "
                    "nothing was submitted"
                ) from None
            raise BackendError(
                f"cannot open an exec stream to staging Pod {pod} at {self.kube.host}: {reason}; nothing was submitted"
            ) from None
        broken: Exception | None = None
        try:
            for chunk in stdin or ():
                ws.update(timeout=0)
                if not ws.is_open():
                    break  # the script ended early: its exit status says why
                ws.write_stdin(chunk)
                if sent:
                    sent(len(chunk))
            if stdin is not None and ws.is_open():
                ws.close_channel(0)  # end of input (v5 only; the script counts bytes anyway)
            ws.run_forever(timeout=timeout)
        except (WebSocketException, OSError) as exc:
            broken = exc  # the connection went away: what arrived before may say why
            try:
                ws.run_forever(timeout=2)
            except (WebSocketException, OSError):
                pass
        finally:
            still_open = ws.is_open() and broken is None
            ws.close()
        out = ws.read_channel(1).decode("utf-8", "replace")
        err = ws.read_channel(2).decode("utf-8", "replace")
        status = ws.read_channel(3)
        if still_open:
            return _Exec(124, out, err, f"no answer within {timeout:.0f}s")
        if broken is not None and not status:
            return _Exec(1, out, err, f"the exec stream broke: {broken}")
        code, message = _exit_status(status)
        return _Exec(code, out, err, message)


def _exit_status(raw: bytes) -> tuple[int, str]:
    """The exec's exit code and message from its status channel (a metav1.Status)."""
    try:
        status = json.loads(raw or b"{}")
    except ValueError:
        return 1, raw.decode("utf-8", "replace")
    if status.get("status") == "Success":
        return 0, ""
    if not status:
        return 1, "the exec stream closed without an exit status"
    causes = (status.get("details") or {}).get("causes") or []
    code = next((c.get("message") for c in causes if c.get("reason") == "ExitCode"), None)
    return (int(code) if code and code.isdigit() else 1), str(status.get("message") or "")


def _chunks(local: LocalFile) -> Iterator[bytes]:
    with local.source.open("rb") as handle:
        yield from iter(lambda: handle.read(CHUNK), b"")
