"""Where a run writes: the job-dir layout, Vertex AI's overrides, and the hypertune file's lifetime."""

from trainer import rundir


def test_the_default_hypertune_file_is_started_afresh_by_each_run(tmp_path, monkeypatch):
    default = tmp_path / "hypertune" / "output.metrics"
    default.parent.mkdir()
    default.write_text('{"top_1_accuracy": "0.5", "global_step": "10"}\n')  # an earlier, unrelated run's line
    monkeypatch.setattr(rundir, "HYPERTUNE_FILE_DEFAULT", str(default))
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ={})
    assert out.hypertune_file == str(default) and not default.exists()


def test_a_hypertune_file_a_platform_names_is_left_as_it_is(tmp_path):
    named = tmp_path / "named.metrics"
    named.write_text("a line the platform keeps\n")
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ={"CLOUD_ML_HP_METRIC_FILE": str(named)})
    assert out.hypertune_file == str(named) and named.read_text() == "a line the platform keeps\n"


def test_vertex_ai_variables_move_the_model_checkpoints_and_logs(tmp_path):
    environ = {"AIP_MODEL_DIR": str(tmp_path / "m"), "AIP_CHECKPOINT_DIR": str(tmp_path / "c"),
               "AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "t"), "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "h")}
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ=environ)
    assert (out.model, out.checkpoints, out.logs) == (str(tmp_path / "m"), str(tmp_path / "c"), str(tmp_path / "t"))
    assert out.file("metrics.json") == str(tmp_path / "job" / "metrics.json")
    worker = rundir.open_run_dir(str(tmp_path / "job"), is_chief=False, worker_index=1, environ=environ)
    assert worker.checkpoints == str(tmp_path / "c") and worker.own_checkpoints.startswith(worker.root)
    rundir.close_run_dir(worker)
    assert not (tmp_path / worker.root).exists()
