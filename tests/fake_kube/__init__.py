"""A fake Kubernetes API server for the Kubernetes backend's tests (see server.py)."""

import base64

from .server import ApiError, FakeKube, rfc3339_nano


def start_cluster(tmp_path, monkeypatch, namespace: str, hf_token: str | None = None, tls: bool = False) -> FakeKube:
    """A started fake server that the real client reaches through $KUBECONFIG, holding what a
    team sets up once per namespace: the namespace, a ReadWriteMany claim and, with `hf_token`,
    the token Secret (the token is also put in the submitting environment). Stop it when done."""
    server = FakeKube(tls=tls).start()
    monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "qlaunch-home"))
    server.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    server.add(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "qlaunch-storage", "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}},
        }
    )
    if hf_token is not None:
        monkeypatch.setenv("HF_TOKEN", hf_token)
        server.add(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "hf-token", "namespace": namespace},
                "type": "Opaque",
                "data": {"token": base64.b64encode(hf_token.encode()).decode()},
            }
        )
    return server


__all__ = ["ApiError", "FakeKube", "rfc3339_nano", "start_cluster"]
