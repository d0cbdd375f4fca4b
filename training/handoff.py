"""The training pod's hand-off to inference on Kubernetes: once the final adapter is written,
rank 0 starts the run's suspended inference Job with one JSON merge patch, so that no GPU waits
for training and no controller has to be installed.

The manifests (launcher/backends/kubernetes/manifests.py) give the training container what it needs:
QLAUNCH_RELEASE_JOB (the Job), QLAUNCH_RELEASE_PATCH (resume it, or under Kueue give it the
queue label) and QLAUNCH_RELEASE_CREDENTIALS (a projected volume with a ServiceAccount token,
the cluster CA and the namespace), and a Role that lets that token patch that one Job and
nothing else. Standard library only: the image needs no Kubernetes client for this.

A failed hand-off never fails training: the adapter is saved, and `qlaunch status` or `qlaunch
submit` starts the inference Job themselves once they see training completed.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from launcher.job.protocol import RELEASE_CREDENTIALS_ENV, RELEASE_JOB_ENV, RELEASE_PATCH_ENV

JOB_ENV, PATCH_ENV, CREDENTIALS_ENV = RELEASE_JOB_ENV, RELEASE_PATCH_ENV, RELEASE_CREDENTIALS_ENV
ATTEMPTS = 4  # a moment of API-server unavailability (or the Job not created yet) is retried
RETRY_SECONDS = 5.0


class HandoffError(Exception):
    pass


def requested(env: dict[str, str]) -> bool:
    return bool(env.get(JOB_ENV))


def _say(message: str) -> None:
    print(f"[qlaunch] {message}", file=sys.stderr, flush=True)


def _api_base(env: dict[str, str]) -> str:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise HandoffError("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def release_request(env: dict[str, str]) -> urllib.request.Request:
    """The PATCH that starts the inference Job, from the container's env and credentials."""
    credentials = Path(env[CREDENTIALS_ENV])
    try:
        token = (credentials / "token").read_text().strip()  # read now: the kubelet rotates it
        namespace = (credentials / "namespace").read_text().strip()
    except OSError as exc:
        raise HandoffError(f"cannot read the hand-off credentials in {credentials}: {exc.strerror}") from None
    url = f"{_api_base(env)}/apis/batch/v1/namespaces/{namespace}/jobs/{env[JOB_ENV]}"
    body = env[PATCH_ENV].encode()
    json.loads(body)  # a broken patch is a rendering bug: fail here, not at the server
    return urllib.request.Request(
        url,
        data=body,
        method="PATCH",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
            "User-Agent": "qlaunch-training-handoff",
        },
    )


def release(env: dict[str, str], attempts: int = ATTEMPTS, retry_seconds: float = RETRY_SECONDS) -> None:
    """Start the inference Job; HandoffError says why not after `attempts` tries."""
    credentials = Path(env[CREDENTIALS_ENV])
    try:
        context = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise HandoffError(f"cannot read the cluster CA in {credentials}: {exc}") from None
    last = ""
    for attempt in range(1, attempts + 1):
        request = release_request(env)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                response.read()
            return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {_message(exc)}"
            if exc.code not in (404, 409, 429) and exc.code < 500:
                break  # 401/403/422: trying again will not help
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            time.sleep(retry_seconds)
    raise HandoffError(f"could not start inference Job {env[JOB_ENV]}: {last}")


def _message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read() or b"{}").get("message") or error.reason
    except ValueError:
        return str(error.reason)


def release_after_training(env: dict[str, str] | None = None) -> bool:
    """training.launch calls this on rank 0 after training exited 0. True when released."""
    env = dict(os.environ if env is None else env)
    if not requested(env):
        return False
    try:
        release(env)
    except HandoffError as exc:
        _say(f"{exc}; `qlaunch status` starts it once it sees training completed")
        return False
    _say(f"training done: started inference Job {env[JOB_ENV]}")
    return True
