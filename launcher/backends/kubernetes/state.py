"""Jobs and pods (API JSON) → the shared State vocabulary. Pure functions, no API calls."""

from __future__ import annotations

from typing import Any

from ...job.progress import EXIT_PREEMPTED
from ...job.requeue import EXIT_REQUEUES_EXHAUSTED
from ..base import State

Obj = dict[str, Any]
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# status.reason of a pod the node or the scheduler took away.
_DISRUPTED_REASONS = {"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated", "NodeLost"}


def condition(obj: Obj, kind: str) -> Obj | None:
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and item.get("status") == "True":
            return item
    return None


def created(obj: Obj) -> tuple[str, int, str]:
    """Oldest first. Creation times have one-second resolution: within a second, a pod that
    has ended (or is being taken away) came before the one that replaced it."""
    meta = obj.get("metadata") or {}
    live = 0 if is_terminal(obj) or meta.get("deletionTimestamp") else 1
    return (meta.get("creationTimestamp") or "", live, meta.get("name") or "")


def owned_by(pod: Obj, job: Obj) -> bool:
    uid = (job.get("metadata") or {}).get("uid")
    meta = pod.get("metadata") or {}
    if any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []):
        return True
    labels = meta.get("labels") or {}
    return uid is not None and uid in (labels.get("batch.kubernetes.io/controller-uid"), labels.get("controller-uid"))


def completion_index(pod: Obj) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(COMPLETION_INDEX)


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _terminated(pod: Obj) -> list[Obj]:
    states = [s.get("state") or {} for s in (pod.get("status") or {}).get("containerStatuses") or []]
    states += [s.get("lastState") or {} for s in (pod.get("status") or {}).get("containerStatuses") or []]
    return [s["terminated"] for s in states if s.get("terminated")]


def disruption(pod: Obj) -> str | None:
    """Why the cluster took this pod away (preemption, eviction, drain), or None."""
    target = condition(pod, "DisruptionTarget")
    if target:
        return target.get("reason") or "DisruptionTarget"
    reason = (pod.get("status") or {}).get("reason")
    if reason in _DISRUPTED_REASONS:
        return reason
    if any(t.get("exitCode") == EXIT_PREEMPTED for t in _terminated(pod)):
        return "checkpointed and stopped (exit 75)"
    return None


def exit_detail(pod: Obj) -> str:
    for terminated in _terminated(pod):
        code = terminated.get("exitCode")
        reason = terminated.get("reason")
        if code not in (None, 0):
            return f"exit code {code}" + (f", {reason}" if reason and reason != "Error" else "")
    return (pod.get("status") or {}).get("reason") or ""


def _guarded(pod: Obj) -> bool:
    return any(t.get("exitCode") == EXIT_REQUEUES_EXHAUSTED for t in _terminated(pod))


def _oom(pod: Obj) -> bool:
    return any(t.get("reason") == "OOMKilled" for t in _terminated(pod))


def _pending_reason(pod: Obj) -> str:
    status = pod.get("status") or {}
    for init in status.get("initContainerStatuses") or []:
        if (init.get("state") or {}).get("running"):
            return f"init {init.get('name')}"
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing"):
            message = waiting.get("message") or ""
            return f"{waiting['reason']}: {message[:120]}" if message else waiting["reason"]
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if scheduled and scheduled.get("status") == "False":
        return f"{scheduled.get('reason') or 'unschedulable'}: {(scheduled.get('message') or '')[:160]}".rstrip(": ")
    return "starting" if scheduled else "waiting for a node"


def _running(pod: Obj) -> bool:
    if (pod.get("status") or {}).get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return not disruption(pod)


def job_state(job: Obj | None, pods: list[Obj]) -> tuple[State, str, int]:
    """(state, detail, restarts) of one Job from its pods (any order)."""
    if job is None:
        return State.UNKNOWN, "", 0
    pods = sorted((p for p in pods if owned_by(p, job)), key=created)
    spec = job.get("spec") or {}
    slots = int(spec.get("parallelism") or 1)
    # Every pod beyond one per index replaced an earlier one (evicted, preempted or failed).
    restarts = max(0, len(pods) - slots)
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return State.CANCELLED, "deleting", restarts
    if condition(job, "Complete") or condition(job, "SuccessCriteriaMet"):
        return State.COMPLETED, "", restarts
    failed = condition(job, "Failed") or condition(job, "FailureTarget")
    if failed:
        reason = failed.get("reason") or "Failed"
        if reason == "DeadlineExceeded":
            return State.TIMEOUT, "time limit reached (activeDeadlineSeconds)", restarts
        last_failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        if last_failed and _oom(last_failed[-1]):
            return State.OUT_OF_MEMORY, "OOMKilled: raise resources.memory", restarts
        detail = exit_detail(last_failed[-1]) if last_failed else ""
        if last_failed and _guarded(last_failed[-1]):
            detail = (
                "the requeue guard stopped it: resources.max_requeues reached, or "
                "resources.max_requeues_without_progress stops in a row without a newer checkpoint "
                "(its log says which); `qlaunch submit` resumes it"
            )
        return State.FAILED, f"{reason}" + (f", {detail}" if detail else ""), restarts
    if spec.get("suspend"):
        return State.PENDING, "suspended", restarts
    # The newest pod of each completion index is what runs now (one index unless multi-node);
    # the older ones were replaced.
    newest: dict[str | None, Obj] = {}
    for pod in pods:
        newest[completion_index(pod)] = pod
    current = list(newest.values())
    done = [p for p in current if (p.get("status") or {}).get("phase") == "Succeeded"]
    running = [p for p in current if _running(p)]
    needed = max(slots - len(done), 1)
    if running and len(running) >= needed:
        node = (running[0].get("spec") or {}).get("nodeName")
        detail = f"{len(running)}/{slots} pods" if slots > 1 else (node or "")
        return State.RUNNING, detail, restarts
    ranks = f"{len(running)}/{slots} pods running; " if running else ""
    for pod in current:
        why = disruption(pod)
        if why:
            stage = "saving a checkpoint" if not is_terminal(pod) else "replacement pending"
            return State.REQUEUED, f"{ranks}preempted ({why}), {stage}", restarts
    for pod in current:
        if (pod.get("status") or {}).get("phase") == "Failed":
            return State.REQUEUED, f"{ranks}retrying after {exit_detail(pod) or 'a failure'}", restarts
    waiting = [p for p in current if not is_terminal(p) and not _running(p)]
    if not waiting:
        return State.PENDING, f"{ranks}waiting for a pod", restarts
    reason = _pending_reason(waiting[0])
    replaced = [p for p in pods if p not in current and completion_index(p) == completion_index(waiting[0])]
    if replaced:
        before = disruption(replaced[-1])
        cause = f"preempted ({before})" if before else f"retrying after {exit_detail(replaced[-1]) or 'a failure'}"
        return State.REQUEUED, f"{ranks}{cause}; {reason}", restarts
    return State.PENDING, f"{ranks}{reason}", restarts
