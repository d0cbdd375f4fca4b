"""The fake cluster's kubelet for bare pods and `pods/exec`, at the wire.

Opt in with `Kubelet(fake, volumes={claim: folder})` (it sets `fake.kubelet`): a Pod applied
without an owner (qlaunch's staging pod) is scheduled and runs, and an exec into a running pod
is served over a WebSocket as the API server does: the RFC 6455 handshake (Sec-WebSocket-Accept,
subprotocol v5.channel.k8s.io or v4), masked client frames, one channel byte per frame (0 stdin,
1 stdout, 2 stderr, 3 the exit Status, 255 = v5 "close channel"). The exec'd command runs as a
local subprocess with the claim's mountPath in its arguments translated to the claim's folder
on this machine, so the real script runs and a test reads the bytes it left "on the claim".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, CLOSE = 0, 1, 2, 3, 255


class Kubelet:
    def __init__(
        self, fake, volumes: dict[str, Path], protocols: tuple[str, ...] = (V5, V4), start_delay: float = 0.05
    ):
        self.fake = fake
        self.volumes = {claim: Path(folder) for claim, folder in volumes.items()}
        self.protocols = protocols
        self.start_delay = start_delay
        self.execs: list[list[str]] = []  # every exec'd command, as the pod would see it
        self.stdin_bytes = 0  # bytes received on stdin over all execs
        # A test's hook: (argv as run here) → argv to run instead (e.g. a corrupting upload).
        self.rewrite = None
        self.pull_error: str | None = None  # set: bare pods never start (ErrImagePull with this message)
        self.exec_forbidden = False  # RBAC without create on pods/exec
        fake.kubelet = self

    # -- bare pods -----------------------------------------------------------------------------

    def admit(self, pod: dict) -> None:
        """A new Pod (caller holds fake.cond): an unowned one is scheduled, then runs shortly."""
        if pod["metadata"].get("ownerReferences"):
            return
        spec = pod["spec"]
        pod["status"] = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "ready": False,
                    "restartCount": 0,
                    "image": c["image"],
                    "imageID": "",
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }
                for c in spec["containers"]
            ],
        }
        spec["nodeName"] = "gke-cpu-pool-node-1"
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        if self.pull_error is not None:
            for status in pod["status"]["containerStatuses"]:
                status["state"] = {"waiting": {"reason": "ErrImagePull", "message": self.pull_error}}
            return

        def start():
            if self.fake.get("pods", namespace, name) is not None:
                self.fake.run_pod(namespace, name)

        threading.Timer(self.start_delay, start).start()

    # -- exec ----------------------------------------------------------------------------------

    def serve(self, handler) -> None:
        """Answer one Upgrade request on `handler` (the server's BaseHTTPRequestHandler)."""
        url = urlsplit(handler.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            if handler.headers.get("Authorization") != f"Bearer {self.fake.token}":
                return _refuse(handler, 401, "Unauthorized")
            parts = [p for p in url.path.split("/") if p]
            if parts[:3] != ["api", "v1", "namespaces"] or len(parts) != 7 or parts[4:7:2] != ["pods", "exec"]:
                return _refuse(handler, 404, "the server could not find the requested resource")
            namespace, name = parts[3], parts[5]
            if self.exec_forbidden:
                return _refuse(
                    handler,
                    403,
                    f'pods "{name}" is forbidden: User "{self.fake.user}" cannot create '
                    f'resource "pods/exec" in API group "" in the namespace "{namespace}"',
                )
            self.fake.requests.append(
                {
                    "method": "GET",
                    "path": url.path,
                    "query": {k: v[-1] for k, v in query.items()},
                    "headers": dict(handler.headers),
                    "body": "",
                }
            )
            pod = self.fake.get("pods", namespace, name)
            if pod is None:
                return _refuse(handler, 404, f'pods "{name}" not found')
            if pod["status"].get("phase") != "Running":
                return _refuse(handler, 400, f"unable to upgrade connection: pod {name} is not running")
            offered = [p.strip() for p in (handler.headers.get("Sec-WebSocket-Protocol") or "").split(",")]
            protocol = next((p for p in self.protocols if p in offered), None)
            if protocol is None:
                return _refuse(handler, 400, f"none of the offered subprotocols {offered} is supported")
            command = query.get("command") or []
            argv = self._translate(pod, query.get("container", [None])[0], command)
        except _Refused:
            return
        accept = base64.b64encode(
            hashlib.sha1((handler.headers["Sec-WebSocket-Key"] + GUID).encode()).digest()
        ).decode()
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept)
        handler.send_header("Sec-WebSocket-Protocol", protocol)
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True
        self.execs.append(command)
        _Session(self, handler.connection, protocol, argv).run()

    def _translate(self, pod: dict, container: str | None, command: list[str]) -> list[str]:
        """The command with each claim's mountPath (in pod `container`) replaced by its folder here."""
        spec = pod["spec"]
        chosen = next((c for c in spec["containers"] if c["name"] == container), spec["containers"][0])
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes") or []
            if "persistentVolumeClaim" in v
        }
        mounts = [
            (m["mountPath"].rstrip("/"), self.volumes[claims[m["name"]]])
            for m in chosen.get("volumeMounts") or []
            if m["name"] in claims and claims[m["name"]] in self.volumes
        ]

        def here(arg: str) -> str:
            for mount, folder in mounts:
                if arg == mount or arg.startswith(mount + "/"):
                    return str(folder) + arg[len(mount) :]
            return arg

        argv = [here(arg) for arg in command]
        return self.rewrite(argv) if self.rewrite else argv


class _Refused(Exception):
    pass


def _refuse(handler, code: int, message: str) -> None:
    body = json.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    ).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    raise _Refused


class _Session:
    """One exec: frames in → the process's stdin; its stdout/stderr → frames out; then its exit Status."""

    def __init__(self, kubelet: Kubelet, sock: socket.socket, protocol: str, argv: list[str]):
        self.kubelet, self.sock, self.protocol, self.argv = kubelet, sock, protocol, argv
        self.send_lock = threading.Lock()

    def run(self) -> None:
        try:
            process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self._status(126, f"exec failed: {exc}")
            return self._close()
        reader = threading.Thread(target=self._feed, args=(process,), daemon=True)
        reader.start()
        pumps = [
            threading.Thread(target=self._pump, args=(stream, channel), daemon=True)
            for stream, channel in ((process.stdout, STDOUT), (process.stderr, STDERR))
        ]
        for pump in pumps:
            pump.start()
        code = process.wait()
        for pump in pumps:
            pump.join()
        self._status(code)
        self._close()
        # The client's close (or EOF) before the socket closes: what it sends meanwhile is
        # drained, so it reads the exit status instead of a reset connection.
        reader.join(timeout=10)

    def _feed(self, process: subprocess.Popen) -> None:
        """Client frames → the process's stdin until the client closes stdin or the stream."""
        stdin = process.stdin
        try:
            while True:
                opcode, payload = self._frame()
                if opcode is None or opcode == 0x8:
                    break
                if opcode in (0x1, 0x2) and payload:
                    channel, data = payload[0], payload[1:]
                    if channel == CLOSE and self.protocol == V5 and data[:1] == bytes([STDIN]):
                        process.stdin.close()  # end of input; keep reading until the client closes
                        stdin = None
                        continue
                    if channel == STDIN and stdin is not None:
                        self.kubelet.stdin_bytes += len(data)
                        try:
                            stdin.write(data)
                            stdin.flush()
                        except (OSError, ValueError):
                            stdin = None  # the process stopped reading: drain the rest
        except OSError:
            pass
        finally:
            try:
                process.stdin.close()
            except (OSError, ValueError):
                pass

    def _frame(self) -> tuple[int | None, bytes]:
        """One whole (defragmented) client message: (opcode, payload); (None, b"") at EOF."""
        opcode, message = None, b""
        while True:
            head = self._read(2)
            if head is None:
                return None, b""
            fin, op = head[0] & 0x80, head[0] & 0x0F
            masked, length = head[1] & 0x80, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if masked else b"\0\0\0\0"
            data = self._read(length) if length else b""
            if data is None or mask is None:
                return None, b""
            if masked:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data)) if length < 64 else _unmask(data, mask)
            if op == 0x9:  # ping
                self._send(0xA, data)
                continue
            if op == 0xA:
                continue
            if op != 0:
                opcode = op
            message += data
            if fin:
                return opcode, message

    def _read(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _pump(self, stream, channel: int) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            self._send(0x2, bytes([channel]) + chunk)

    def _send(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            head = struct.pack(">BB", 0x80 | opcode, length)
        elif length < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 126, length)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, length)
        with self.send_lock:
            try:
                self.sock.sendall(head + payload)
            except OSError:
                pass

    def _status(self, code: int, message: str | None = None) -> None:
        if code == 0:
            status = {"metadata": {}, "status": "Success"}
        else:
            status = {
                "metadata": {},
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "message": message or f"command terminated with non-zero exit code: exit status {code}",
                "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
            }
        self._send(0x2, bytes([ERROR]) + json.dumps(status).encode())

    def _close(self) -> None:
        self._send(0x8, struct.pack(">H", 1000))
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _unmask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, fast enough for megabytes (one big-integer XOR)."""
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")
