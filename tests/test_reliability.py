"""A hostile environment, as it really happens: real signals to real trainer processes (as a plain
process and as a container's PID 1), and training that diverges."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, assert_user_error, tiny_flags, write_tfrecords


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return write_tfrecords(root / "train", per_class=16), write_tfrecords(root / "val", per_class=4, seed=1, shards=1)


def _state(job_dir):
    return json.load(open(os.path.join(job_dir, "checkpoints", "state.json")))


def _start_and_signal(command, job_dir, number, after_step=3):
    """Starts command, waits for its progress line at after_step, sends signal `number`; returns (code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, CLOUD_ML_HP_METRIC_FILE=os.path.join(job_dir + ".metrics"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        progress = re.match(r"step\s+(\d+)/", line)
        if progress and int(progress.group(1)) >= after_step:
            break
    target = proc.pid
    if command[0] == "unshare":  # the trainer is unshare's child, PID 1 of its namespace
        target = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
    os.kill(target, number)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out, err


def _long_run(data, job_dir):
    # Evaluations every 1000 steps: a signal must not lose the steps since the last one.
    return tiny_flags(*data, job_dir, max_steps=100_000, eval_frequency=1_000, log_frequency=1)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_at_the_step_and_a_rerun_resumes_there(tmp_path, data, number):
    job_dir = str(tmp_path / "run")
    code, out, err = _start_and_signal([sys.executable, "-m", "trainer.task", *_long_run(data, job_dir)], job_dir, number)
    assert code == 128 + number, err[-2000:]
    step = _state(job_dir)["step"]
    assert step >= 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stopped by {signal.Signals(number).name} at step {step}, after saving a checkpoint there; "
                      f"rerun the same command to resume from step {step}"]
    assert "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "trainer.task",
                              *tiny_flags(*data, job_dir, max_steps=step + 2, eval_frequency=1_000)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the checkpoint at step {step}" in resumed.stdout
    assert os.path.exists(os.path.join(job_dir, "model", "saved_model.pb"))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_sigterm_reaches_the_trainer_as_pid_1(tmp_path, data):
    # The kernel drops signals to a PID namespace's init that has no handler for them: what a
    # container's exec-form entrypoint is. The trainer's own handler is what makes SIGTERM land.
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here (needs root or user namespaces)")
    job_dir = str(tmp_path / "run")
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "trainer.task", *_long_run(data, job_dir)]
    code, out, err = _start_and_signal(command, job_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at step" in err
    assert _state(job_dir)["step"] >= 3


@pytest.mark.parametrize("flags", [dict(initial_learning_rate=1e6, optimizer_type="momentum"),
                                   dict(weight_decay=1e300)])
def test_a_diverging_run_stops_at_once_and_exports_nothing(tmp_path, data, trainer_main, flags):
    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=40, eval_frequency=20, log_frequency=1, **flags))
    assert result.returncode == 3
    error = assert_user_error(result, "the training loss became")
    assert "Lower --initial_learning_rate or --weight_decay" in error
    assert not os.path.exists(os.path.join(job_dir, "model"))
    metrics = open(os.path.join(job_dir, "metrics.json")).read()
    assert "NaN" not in metrics and "Infinity" not in metrics
    assert not [line for line in result.stdout.splitlines() if line.startswith("step 40/")]  # it did not train on


def test_divergence_after_a_checkpoint_names_it(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    # A stepwise schedule that jumps to an absurd rate at step 4, after the checkpoint at step 2.
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=40, eval_frequency=2, log_frequency=1,
                                     optimizer_type="momentum", learning_rate_decay_type="stepwise",
                                     stepwise_learning_rate_steps="4", stepwise_learning_rate_levels="1e12"))
    assert result.returncode == 3
    error = assert_user_error(result, "the training loss became")
    assert "rerun to resume from the checkpoint at step" in error
    state = _state(job_dir)
    assert state["step"] >= 2 and all(e["step"] <= state["step"] for e in state["evaluations"])
    json.loads(open(os.path.join(job_dir, "metrics.json")).read(), parse_constant=pytest.fail)  # strict JSON


def test_a_decompression_bomb_in_the_training_data_is_left_out_undecoded(tmp_path):
    from PIL import Image

    from tests.conftest import write_folder

    train = write_folder(tmp_path / "train", per_class=8)
    # 64 KB on disk, 529 million pixels once decoded (1.6 GB as RGB; the scan once peaked at 7.4 GB on one).
    Image.new("1", (23000, 23000)).save(os.path.join(train, "class_0", "bomb.png"))
    job_dir = str(tmp_path / "run")
    # The trainer's own peak memory, measured by a parent of its own (this test process has had other children).
    measure = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "trainer.task",
                             *tiny_flags(train, train, job_dir, max_steps=2, eval_frequency=2, max_corrupt_fraction=0.1)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    corrupt = json.load(open(os.path.join(job_dir, "metrics.json")))["corrupt_images"]
    assert corrupt["training"] == 1 and corrupt["examples"][0].endswith("bomb.png")
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 3 << 20  # far below one decoded copy (1.6 GB) plus TensorFlow's own
    report = subprocess.run([sys.executable, "-m", "trainer.check_data", f"--training_data_path={train}", "--num_classes=2",
                             "--max_corrupt_fraction=0.1"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert "its header declares 529,000,000 pixels, more than --max_image_pixels=40,000,000" in report.stdout


def test_an_export_that_waited_for_slow_storage_says_so():
    from trainer.export import Exported

    # Measured on a disk throttled to 4 MB/s (docs/BENCHMARKS.md): 12.7 s, 1.7 s of it computing.
    assert Exported(12.7, 1.7, 44_700_000).line() == (
        "exported in 12.7 s (45 MB); the CPU was idle for 11.0 s of it, waiting for the disk (or, for gs://, the "
        "network) to take the files: 3.5 MB/s")
    assert Exported(1.4, 2.9, 44_700_000).line() == "exported in 1.4 s (45 MB)"  # threads: more CPU than wall time
    assert Exported(4.0, 1.5, 44_700_000).line() == "exported in 4.0 s (45 MB)"  # a short wait is not worth a word


def test_a_stalled_export_leaves_the_threads_stacks_beside_it(tmp_path, monkeypatch, capsys):
    from trainer import export, models

    weights = str(tmp_path / "w.weights.h5")
    models.build_model("resnet-18", 3, 16).save_weights(weights)
    exported = export.export_saved_model(weights, "resnet-18", "classification", 3, 16, ["a", "b", "c"],
                                         str(tmp_path / "fast" / "model"))
    assert os.listdir(tmp_path / "fast") == ["model"]  # a normal export leaves nothing else
    size = sum(f.stat().st_size for f in (tmp_path / "fast" / "model").rglob("*") if f.is_file())
    assert exported.size == size and 0 < exported.cpu_seconds
    assert exported.line() == f"exported in {exported.seconds:.1f} s ({size / 1e6:.0f} MB)"  # it computed: no wait
    monkeypatch.setattr(export, "STALL_SECONDS", 0.01)  # any export is "stalled" after 10 ms
    export.export_saved_model(weights, "resnet-18", "classification", 3, 16, ["a", "b", "c"], str(tmp_path / "slow" / "model"))
    stacks = (tmp_path / "slow" / "export-stall-stacks.txt").read_text()
    assert "(most recent call last)" in stacks and "export.py" in stacks
    assert f"the threads' stacks at that moment are in {tmp_path / 'slow' / 'export-stall-stacks.txt'}" in capsys.readouterr().out
