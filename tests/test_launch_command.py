"""The command a multi-node Kubernetes Job renders is one `training.launch` accepts."""

from __future__ import annotations

from launcher.backends.k8s_manifests import train_command
from launcher.grid import plan
from training import launch


def test_multi_node_command_reaches_accelerate(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("name: mn\nbackend: kubernetes\nstorage: {root: /mnt/q}\nresources: {nodes: 2, gpus_per_node: 4}\n")
    p = plan(path)
    command = train_command(p, p.runs[0])
    assert command[1:4] == ["-m", "training.launch", "/config/run.yaml"]
    extra = command[command.index("--") + 1 :]
    assert extra[:2] == ["--num_machines", "2"] and "$(JOB_COMPLETION_INDEX)" in extra
    # Parsed in full; it stops only because /config/run.yaml exists inside the pod, not here.
    assert launch.main(command[3:]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "/config/run.yaml: cannot read run config" in err
