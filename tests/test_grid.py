"""Grid expansion and stable run ids."""

from __future__ import annotations

import textwrap

from launcher.grid import plan
from launcher.job.experiment_file import dump_run_config, load_run_config
from launcher.job.storage import write_run_config

EXPERIMENT = textwrap.dedent("""\
    name: grid-demo
    storage:
      root: runs
    slurm:
      partition: gpu
    grid:
      train.learning_rate: [1e-4, 2e-4, 3e-4]
      lora.r: [16, 64]
""")


def write(tmp_path, text=EXPERIMENT, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_is_the_cartesian_product(tmp_path):
    runs = plan(write(tmp_path)).runs
    assert len(runs) == 6
    points = {(r.train.learning_rate, r.lora.r) for r in runs}
    assert points == {(lr, r) for lr in (1e-4, 2e-4, 3e-4) for r in (16, 64)}
    assert all(r.overrides == {"train.learning_rate": r.train.learning_rate, "lora.r": r.lora.r} for r in runs)
    assert len({r.run_id for r in runs}) == 6


def test_same_file_gives_the_same_ids(tmp_path):
    first = [r.run_id for r in plan(write(tmp_path)).runs]
    # Same content in another order of keys: still the same runs.
    reordered = EXPERIMENT.replace(
        "      train.learning_rate: [1e-4, 2e-4, 3e-4]\n      lora.r: [16, 64]\n",
        "      lora.r: [16, 64]\n      train.learning_rate: [1e-4, 2e-4, 3e-4]\n",
    )
    second = [r.run_id for r in plan(write(tmp_path, reordered, "other.yaml")).runs]
    assert sorted(first) == sorted(second)


def test_a_changed_training_value_gives_new_ids(tmp_path):
    before = {r.run_id for r in plan(write(tmp_path)).runs}
    after = {r.run_id for r in plan(write(tmp_path, EXPERIMENT + "lora:\n  alpha: 32\n", "b.yaml")).runs}
    assert before.isdisjoint(after)


def test_moving_to_another_partition_keeps_the_runs(tmp_path):
    before = [r.run_id for r in plan(write(tmp_path)).runs]
    moved = EXPERIMENT.replace("partition: gpu", "partition: preemptible")
    after = [r.run_id for r in plan(write(tmp_path, moved, "b.yaml")).runs]
    assert before == after


def test_run_folders_live_under_the_storage_root(tmp_path):
    p = plan(write(tmp_path))
    assert p.storage_root == tmp_path / "runs"
    for run in p.runs:
        assert run.run_dir == str(tmp_path / "runs" / "grid-demo" / run.run_id)


def test_run_config_alone_restarts_the_job(tmp_path):
    run = plan(write(tmp_path)).runs[0]
    path = write_run_config(run)
    loaded = load_run_config(path)
    assert loaded == run
    assert dump_run_config(loaded) == path.read_text()  # same run → same bytes


def test_a_run_id_that_reads_as_a_number_survives_its_run_config(tmp_path):
    # `0e52766174` (digits, one e, digits) is a float to the YAML 1.2 loader; written unquoted,
    # the run crashed at start ("run_id: Input should be a valid string"): ~0.7% of hex ids.
    run = plan(write(tmp_path)).runs[0].model_copy(update={"run_id": "0e52766174"})
    path = write_run_config(run)
    loaded = load_run_config(path)
    assert loaded.run_id == "0e52766174"
    assert dump_run_config(loaded) == path.read_text()


def test_find_by_prefix_and_by_experiment(tmp_path):
    p = plan(write(tmp_path))
    run = p.runs[3]
    assert p.find(run.run_id[:6]) == [run]
    assert len(p.find("grid-demo")) == 6


def test_a_value_written_at_its_default_keeps_the_run_id(tmp_path):
    """Ids hash what differs from qlaunch's defaults: spelling a default out (or a qlaunch
    release adding a knob at a default that changes nothing) never makes a new run."""
    base = "name: ids\nmodel: {name_or_path: some/model}\ntrain: {learning_rate: 1.0e-4}\n"
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "b.yaml").write_text(
        base.replace("learning_rate: 1.0e-4", "learning_rate: 1.0e-4, max_grad_norm: 0.3, packing: false")
    )
    (tmp_path / "c.yaml").write_text(base.replace("1.0e-4", "3.0e-4"))
    ids = [plan(tmp_path / f"{name}.yaml").runs[0].run_id for name in "abc"]
    assert ids[0] == ids[1] != ids[2]
