"""Pod logs: progress events for the status table, and `logs -f` that follows a run across the
pods its Job replaces.

The laptop cannot read the PVC, so progress comes from the `QLAUNCH_PROGRESS {...}` lines the
trainer prints. A pod's log is read once in full, then only what was added since the previous
read (sinceSeconds + timestamps, deduplicated); a finished pod's events are kept and never read
again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable

import urllib3

from ...job.progress import PROGRESS_PREFIX, parse_lines
from .client import Kube, KubeApiError
from .state import created, is_terminal

Obj = dict[str, Any]
# Seconds of overlap between incremental reads (request latency; duplicates are dropped).
_OVERLAP = 10


def _ts_key(stamp: str) -> tuple[str, int]:
    """Order RFC3339Nano stamps (the kubelet trims trailing zeros, so strings do not sort)."""
    main, _, fraction = stamp.rstrip("Z").partition(".")
    return main, int((fraction + "000000000")[:9] or 0)


def split_timestamp(line: str) -> tuple[str, str]:
    stamp, _, text = line.partition(" ")
    return stamp, text


@dataclass
class _PodEvents:
    created: tuple[str, str]
    events: list[dict] = field(default_factory=list)
    last_key: tuple[str, int] | None = None
    at_last_key: set[str] = field(default_factory=set)  # lines with exactly last_key
    read_at: float | None = None  # monotonic time of the last read
    final: bool = False  # the pod had ended when read: nothing more will come


class ProgressReader:
    """Per-run progress events from pod logs, cached across refreshes."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self._pods: dict[str, _PodEvents] = {}  # pod uid → what was read
        self._runs: dict[str, list[str]] = {}  # run id → pod uids (train, then infer)

    def events(self, namespace: str, run_pods: dict[str, list[Obj]]) -> dict[str, list[dict]]:
        """run id → events, for pods given in reading order (training pods, then inference)."""
        result = {}
        for run_id, pods in run_pods.items():
            uids = self._runs.setdefault(run_id, [])
            for pod in pods:
                uid = pod["metadata"]["uid"]
                if uid not in uids:
                    uids.append(uid)
                self._refresh(namespace, pod)
            # Pods that no longer exist (deleted by a preemption) keep the events read earlier.
            known = [self._pods[uid] for uid in uids if uid in self._pods]
            result[run_id] = [event for pod in known for event in pod.events]
        return result

    def _refresh(self, namespace: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        entry = self._pods.setdefault(uid, _PodEvents(created(pod)))
        if entry.final:
            return
        ended = is_terminal(pod)
        kwargs: dict[str, Any] = {"timestamps": True, "container": pod_container(pod)}
        now = time.monotonic()
        if entry.read_at is not None:
            kwargs["since_seconds"] = math.ceil(now - entry.read_at) + _OVERLAP
        try:
            response = self.kube.open(
                self.kube.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                namespace,
                _request_timeout=(10, 60),
                **kwargs,
            )
            text = response.data.decode("utf-8", errors="replace")
        except KubeApiError as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                entry.final = ended or exc.status == 404
                return
            raise
        entry.read_at = now
        lines = []
        for line in text.splitlines():
            stamp, body = split_timestamp(line)
            if PROGRESS_PREFIX.strip() not in body:
                continue
            key = _ts_key(stamp)
            if entry.last_key is not None and (
                key < entry.last_key or (key == entry.last_key and body in entry.at_last_key)
            ):
                continue
            if key != entry.last_key:
                entry.last_key, entry.at_last_key = key, set()
            entry.at_last_key.add(body)
            lines.append(body)
        entry.events.extend(parse_lines(lines))
        entry.final = ended


def pod_container(pod: Obj) -> str:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return containers[0].get("name") or "train"


def _started(pod: Obj) -> bool:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if state.get("running") or state.get("terminated"):
            return True
    return False


class LogFollower:
    """Prints one role's pod logs of a run, oldest pod first; with follow, keeps printing as the
    Job replaces pods, until the Job has finished (or is gone)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        selector: str,
        out: IO[str],
        job_finished: Callable[[], bool],
        wait_seconds: int = 30,
    ):
        self.kube, self.namespace, self.selector, self.out = kube, namespace, selector, out
        self.job_finished = job_finished
        self.wait_seconds = wait_seconds
        self.printed: dict[str, int] = {}  # pod uid → lines printed
        self.done: set[str] = set()  # pods printed to their end

    def _pods(self) -> tuple[list[Obj], str]:
        listing = self.kube.call(
            self.kube.core.list_namespaced_pod,
            self.namespace,
            label_selector=self.selector,
            what="listing the run's pods",
        )
        pods = [p for p in listing.get("items") or [] if _rank_zero(p)]
        return sorted(pods, key=created), (listing.get("metadata") or {}).get("resourceVersion") or ""

    def _header(self, pod: Obj, note: str = "") -> None:
        self.out.write(f"──── pod {pod['metadata']['name']}{note} ────\n")
        self.out.flush()

    def _print(self, pod: Obj, follow: bool) -> None:
        uid = pod["metadata"]["uid"]
        skip = self.printed.get(uid, 0)
        try:
            response = self.kube.open(
                self.kube.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self.namespace,
                container=pod_container(pod),
                follow=follow,
                # A quiet trainer may print nothing for minutes; a timed-out stream is resumed.
                _request_timeout=(10, 600) if follow else (10, 120),
            )
        except KubeApiError as exc:
            if exc.status in (400, 404):  # not started, or deleted meanwhile
                return
            raise
        try:
            from kubernetes.watch.watch import iter_resp_lines

            for count, line in enumerate(iter_resp_lines(response), start=1):
                if count <= skip:
                    continue  # printed before the stream broke
                self.out.write(line + "\n")
                self.out.flush()
                self.printed[uid] = count
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            if not follow:
                raise self.kube.unreachable(TimeoutError("the log stream broke off")) from None
        finally:
            response.release_conn()

    def _wait_for_change(self, resource_version: str) -> None:
        """Until a pod of the run changes (or wait_seconds pass): the caller lists again."""
        try:
            for _ in self.kube.watch(
                self.kube.core.list_namespaced_pod,
                self.namespace,
                label_selector=self.selector,
                resource_version=resource_version,
                timeout_seconds=self.wait_seconds,
                what="watching the run's pods",
            ):
                return
        except KeyError:
            # An ERROR event (e.g. 410 Gone: the version expired) that the client cannot unpack
            # without deserializing; listing again is the remedy either way.
            time.sleep(1)

    def run(self, follow: bool) -> None:
        while True:
            pods, version = self._pods()
            if not pods:
                if not follow:
                    self.out.write("(no pod yet)\n")
                    return
                if self.job_finished():
                    return
                self._wait_for_change(version)
                continue
            several = len(pods) > 1 or bool(self.printed)
            for pod in pods[:-1]:
                uid = pod["metadata"]["uid"]
                if uid not in self.done and _started(pod):
                    if uid not in self.printed:
                        self._header(pod, " (replaced)")
                    self._print(pod, follow=False)
                self.done.add(uid)
            newest = pods[-1]
            uid = newest["metadata"]["uid"]
            if uid in self.done:
                if not follow or self.job_finished():
                    return
                self._wait_for_change(version)
                continue
            if not _started(newest):
                if not follow:
                    self.out.write(f"(pod {newest['metadata']['name']} has not started yet)\n")
                    return
                if is_terminal(newest):
                    self.done.add(uid)
                    continue
                self._wait_for_change(version)
                continue
            if several and uid not in self.printed:
                self._header(newest)
            self._print(newest, follow=follow)
            if not follow:
                return
            # The stream ended: the container stopped (or the connection broke; then we resume).
            current = next((p for p in self._pods()[0] if p["metadata"]["uid"] == uid), None)
            if current is None or is_terminal(current):
                self.done.add(uid)


def _rank_zero(pod: Obj) -> bool:
    from .state import completion_index

    index = completion_index(pod)
    return index in (None, "0")
