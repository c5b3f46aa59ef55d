"""Where a run writes: the job-dir layout, Vertex AI's overrides, SageMaker's layout, and the hypertune file's lifetime."""

import json

from trainer import rundir, sagemaker


def test_the_default_hypertune_file_is_started_afresh_by_each_run(tmp_path, monkeypatch):
    default = tmp_path / "hypertune" / "output.metrics"
    default.parent.mkdir()
    default.write_text('{"top_1_accuracy": "0.5", "global_step": "10"}\n')  # an earlier, unrelated run's line
    monkeypatch.setattr(rundir, "HYPERTUNE_FILE_DEFAULT", str(default))
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ={})
    rundir.close_run_dir(out)
    assert out.hypertune_file == str(default) and not default.exists()


def test_a_hypertune_file_a_platform_names_is_left_as_it_is(tmp_path):
    named = tmp_path / "named.metrics"
    named.write_text("a line the platform keeps\n")
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ={"CLOUD_ML_HP_METRIC_FILE": str(named)})
    rundir.close_run_dir(out)
    assert out.hypertune_file == str(named) and named.read_text() == "a line the platform keeps\n"


def test_vertex_ai_variables_move_the_model_checkpoints_and_logs(tmp_path):
    environ = {"AIP_MODEL_DIR": str(tmp_path / "m"), "AIP_CHECKPOINT_DIR": str(tmp_path / "c"),
               "AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "t"), "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "h")}
    out = rundir.open_run_dir(str(tmp_path / "job"), is_chief=True, environ=environ)
    rundir.close_run_dir(out)
    assert (out.model, out.checkpoints, out.logs) == (str(tmp_path / "m"), str(tmp_path / "c"), str(tmp_path / "t"))
    assert out.file("metrics.json") == str(tmp_path / "job" / "metrics.json")
    worker = rundir.open_run_dir(str(tmp_path / "job"), is_chief=False, worker_index=1, environ=environ)
    assert worker.checkpoints == str(tmp_path / "c") and worker.own_checkpoints.startswith(worker.root)
    rundir.close_run_dir(worker)
    assert not (tmp_path / worker.root).exists()


def test_a_sagemaker_job_writes_where_sagemaker_collects(tmp_path):
    """model.tar.gz is made of model/, output.tar.gz of output/data/; checkpoints/ is synced for spot restarts."""
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"num_classes": "2"}))
    job = sagemaker.training_job(str(tmp_path), environ={})
    job_dir = next(flag.split("=", 1)[1] for flag in job.flags if flag.startswith("--job-dir="))
    out = rundir.open_run_dir(job_dir, is_chief=True, environ={**job.environ, "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "h")})
    rundir.close_run_dir(out)
    assert (out.model, out.checkpoints) == (str(tmp_path / "model" / "1"), str(tmp_path / "checkpoints"))
    assert (out.file("metrics.json"), out.logs) == (str(tmp_path / "output" / "data" / "metrics.json"),
                                                    str(tmp_path / "output" / "data" / "logs"))
