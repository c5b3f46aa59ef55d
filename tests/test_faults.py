"""Faults as users and platforms cause them: two trainers on one job-dir, garbage and damaged files, a full
disk, hostile HTTP clients and images, a killed export's litter, and odd data folders. Real processes where
the process is the contract (a second trainer, a file-size limit, the server's log), real HTTP for the server.
"""

import base64
import http.client
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import h5py
import numpy as np
import pytest

from tests.conftest import (
    ROOT,
    assert_user_error,
    encode,
    run_main,
    run_trainer,
    tiny_flags,
    tiny_image,
    write_folder,
    write_tfrecords,
)
from trainer import files, lock, rundir, sources
from trainer.cli import UserError
from trainer.serving import batching, predict, serve

# SGD without momentum keeps no optimizer slots: 45 MB checkpoints instead of 134 MB.
LIGHT = dict(optimizer_type="momentum", optimizer_arguments="momentum=0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_tfrecords(root / "train", per_class=16), write_tfrecords(root / "val", per_class=4, seed=1, shards=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A job-dir trained to step 4, with checkpoints at steps 2 and 4 (tests damage copies of it)."""
    job_dir = str(tmp_path_factory.mktemp("trained") / "run")
    result = run_trainer(tiny_flags(*data, job_dir, **LIGHT))
    assert result.returncode == 0, result.stderr[-3000:]
    return job_dir


def _copy(trained, tmp_path):
    job_dir = str(tmp_path / "run")
    shutil.copytree(trained, job_dir)
    return job_dir


def _state(job_dir):
    with open(os.path.join(job_dir, "checkpoints", "state.json")) as f:
        return json.load(f)


def _wait_for(condition, timeout_s, what):
    """Polls condition() until it is true; fails naming what was awaited after timeout_s seconds."""
    deadline, pause = time.monotonic() + timeout_s, threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        pause.wait(0.05)


class Output:
    """A process's stdout, read line by line in a thread, so a test can wait for a line."""

    def __init__(self, stream):
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True).start()

    def count(self, fragment):
        return sum(fragment in line for line in list(self.lines))


# --- One trainer per job-dir -----------------------------------------------------------------------------------


def test_a_second_trainer_refuses_naming_the_first_and_a_killed_ones_lease_is_taken_over(tmp_path, data,
                                                                                         trainer_main):
    job_dir = str(tmp_path / "run")
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer.task",
         *tiny_flags(*data, job_dir, max_steps=100_000, eval_frequency=1_000, log_frequency=1, **LIGHT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "first.metrics")))
    try:
        out = Output(first.stdout)
        _wait_for(lambda: out.count(" 1/100000 ") or first.poll() is not None, 180, "the first trainer's first step")
        assert first.poll() is None, first.stderr.read()[-3000:]

        second = trainer_main(tiny_flags(*data, job_dir, max_steps=2, **LIGHT))
        assert second.returncode == 2
        assert_user_error(second, f"--job-dir={job_dir} is in use by another trainer",
                          f"pid {first.pid} on {socket.gethostname()}")
        assert not os.path.exists(os.path.join(job_dir, "model"))
    finally:
        first.kill()  # SIGKILL: no handler runs, the lease stays behind
        first.communicate(timeout=60)
    assert os.path.exists(os.path.join(job_dir, lock.NAME))

    rerun = trainer_main(tiny_flags(*data, job_dir, max_steps=2, **LIGHT))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"taking over --job-dir={job_dir} from the trainer pid {first.pid} on" in rerun.stdout
    assert "which is no longer running" in rerun.stdout
    assert not os.path.exists(os.path.join(job_dir, lock.NAME))  # released at the end


def _foreign_lease(path, heartbeat):
    """A lease written by a trainer on another machine."""
    files.write_json(path, {"host": "other-host", "pid": 4242, "machine": "another-boot/pid:[1]",
                            "process_start": 1, "started": "2026-01-01 00:00:00 UTC", "heartbeat": heartbeat,
                            "token": "theirs"})


def test_a_lease_from_another_machine_is_held_while_its_heartbeat_moves(tmp_path):
    path = str(tmp_path / lock.NAME)
    _foreign_lease(path, time.time())
    stop = threading.Event()

    def beat():  # the other machine's heartbeat thread
        while not stop.wait(0.05):
            _foreign_lease(path, time.time())

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(UserError, match="is in use by another trainer, pid 4242 on other-host"):
            lock.Lease(path, heartbeat_s=0.05, stale_s=30).acquire("--job-dir=x")
    finally:
        stop.set()


def test_a_lease_from_another_machine_is_taken_over_once_stale(tmp_path, capsys):
    path = str(tmp_path / lock.NAME)
    _foreign_lease(path, time.time() - 3600)  # a preempted VM's lease: an hour without a heartbeat
    lease = lock.Lease(path)
    lease.acquire("--job-dir=x")
    assert "taking over --job-dir=x from the trainer pid 4242 on other-host" in capsys.readouterr().out
    assert json.load(open(path))["pid"] == os.getpid()
    lease.release()
    assert not os.path.exists(path)

    _foreign_lease(path, time.time())  # fresh, but it never moves again: watched until stale
    lease = lock.Lease(path, heartbeat_s=0.05, stale_s=0.3)
    lease.acquire("--job-dir=x")
    assert "has not renewed it" in capsys.readouterr().out
    lease.release()


def test_the_lease_on_object_storage_refuses_a_second_holder(tmp_path):
    # gs:// has no hard links or exclusive creates: write, then read back whose write stayed (tf.io.gfile here).
    path = str(tmp_path / lock.NAME)
    first = lock.Lease(path, remote=True, confirm_s=0, heartbeat_s=0.05)
    first.acquire("--job-dir=gs://b/run")
    with pytest.raises(UserError, match=f"pid {os.getpid()} on"):
        lock.Lease(path, remote=True, confirm_s=0).acquire("--job-dir=gs://b/run")
    beat = json.load(open(path))["heartbeat"]
    _wait_for(lambda: json.load(open(path))["heartbeat"] != beat, 30, "a heartbeat")
    first.release()
    assert not os.path.exists(path)


# --- Garbage and damaged files ---------------------------------------------------------------------------------


def _zip_without_weights(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")


@pytest.mark.parametrize("name, write", [
    ("random.weights.h5", lambda path: open(path, "wb").write(os.urandom(5000))),
    ("random.keras", lambda path: open(path, "wb").write(os.urandom(5000))),
    ("empty.keras", _zip_without_weights),
])
def test_garbage_pretrained_weights_are_one_error_line(tmp_path, data, trainer_main, name, write):
    path = str(tmp_path / name)
    write(path)
    result = trainer_main(tiny_flags(*data, str(tmp_path / "run"), pretrained_checkpoint_path=path, **LIGHT))
    assert result.returncode == 2
    assert_user_error(result, f"--pretrained_checkpoint_path: {path} is not")


def test_an_empty_state_json_resumes_from_the_checkpoint_that_records_it(tmp_path, trained, data, trainer_main):
    job_dir = _copy(trained, tmp_path)
    state = _state(job_dir)
    open(os.path.join(job_dir, "checkpoints", "state.json"), "w").close()  # what a crash without fsync leaves
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=6, **LIGHT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/state.json is damaged (" in result.stdout
    assert "resuming instead from the newest intact checkpoint, step 4 (ckpt-4.weights.h5)" in result.stdout
    assert "resuming from the checkpoint at step 4" in result.stdout
    assert [e["step"] for e in _state(job_dir)["evaluations"]] == [e["step"] for e in state["evaluations"]] + [6]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, trained, data, trainer_main):
    job_dir = _copy(trained, tmp_path)
    latest = os.path.join(job_dir, "checkpoints", "ckpt-4.weights.h5")
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)  # an interrupted copy or upload
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=6, **LIGHT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: {latest} is damaged (" in result.stdout
    assert "resuming instead from the newest intact checkpoint, step 2 (ckpt-2.weights.h5)" in result.stdout
    assert "resuming from the checkpoint at step 2" in result.stdout
    assert [e["step"] for e in _state(job_dir)["evaluations"]] == [2, 4, 6]
    assert os.path.exists(os.path.join(job_dir, "model", "saved_model.pb"))


def test_a_damaged_only_checkpoint_is_one_error_line(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    assert trainer_main(tiny_flags(*data, job_dir, max_steps=2, **LIGHT)).returncode == 0
    only = os.path.join(job_dir, "checkpoints", "ckpt-2.weights.h5")
    with open(only, "wb") as f:
        f.write(os.urandom(4096))
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=4, **LIGHT))
    assert result.returncode == 2
    assert_user_error(result, f"{only} is damaged", "no other checkpoint", "to start over")


def _file_size_limit(limit_bytes):
    """preexec_fn: writes past limit_bytes fail with EFBIG, as on a full disk (SIGXFSZ would kill instead)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_while_checkpointing_is_one_error_line_and_the_commit_stays(tmp_path, trained, data):
    job_dir = _copy(trained, tmp_path)
    before = open(os.path.join(job_dir, "checkpoints", "state.json"), "rb").read()
    result = subprocess.run([sys.executable, "-m", "trainer.task", *tiny_flags(*data, job_dir, max_steps=6, **LIGHT)],
                            capture_output=True, text=True, cwd=ROOT, preexec_fn=_file_size_limit(20 << 20),
                            env=dict(os.environ, PYTHONPATH=ROOT, CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "h")))
    assert result.returncode == 2
    error = assert_user_error(result, "cannot write ", "-6.weights.h5: File too large",
                              f"the checkpoint at step 4 in {job_dir}/checkpoints is intact")
    assert "free some space and rerun the same command" in error
    assert open(os.path.join(job_dir, "checkpoints", "state.json"), "rb").read() == before
    names = os.listdir(os.path.join(job_dir, "checkpoints"))
    assert not [name for name in names if ".tmp-" in name or name.endswith("-6.weights.h5")], names
    with h5py.File(os.path.join(job_dir, "checkpoints", "ckpt-4.weights.h5")) as h5:  # readable, and its own commit
        assert json.loads(bytes(h5["trainer_state"][()]))["step"] == 4
    assert not os.path.exists(os.path.join(job_dir, lock.NAME))


def _private_mount_command():
    """unshare's arguments for a mount namespace of this test's own (a tmpfs mounted there vanishes with it)."""
    for command in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*command, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return command
    return None


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_really_full_disk_is_one_error_line_not_a_crash(tmp_path, data):
    # ENOSPC, unlike a file-size limit, left HDF5 holding unwritable data: a traceback at exit, then a segfault.
    command = _private_mount_command()
    if command is None:
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
    disk = tmp_path / "disk"
    disk.mkdir()
    job_dir = str(disk / "run")
    # 70 MB: room for the checkpoint at step 2 (ckpt, 45 MB, best a second name of it), not for step 4's.
    train = shlex.join([sys.executable, "-m", "trainer.task", *tiny_flags(*data, job_dir, **LIGHT)])
    check = shlex.join([sys.executable, "-c", "import json, os, sys, h5py; folder = sys.argv[1]; "
                        "state = json.load(open(os.path.join(folder, 'state.json'))); "
                        "h5py.File(os.path.join(folder, state['weights'])).close(); "
                        "print('COMMIT', state['step'], sorted(os.listdir(folder)))", f"{job_dir}/checkpoints"])
    result = subprocess.run([*command, "sh", "-c", f"mount -t tmpfs -o size=70m tmpfs {disk} && {train}; "
                             f"echo STATUS $?; {check}"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "h")))
    assert "STATUS 2" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]  # the trainer's exit status
    trainer = subprocess.CompletedProcess(result.args, 2, result.stdout, result.stderr)
    assert_user_error(trainer, "-4.weights.h5: No space left on device", "the checkpoint at step 2")
    commit = next(line for line in result.stdout.splitlines() if line.startswith("COMMIT"))
    assert commit.startswith("COMMIT 2 ") and ".tmp-" not in commit and "-4.weights.h5" not in commit


def test_a_full_disk_in_an_atomic_write_names_the_file_and_keeps_the_old_version(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}\n')
    script = (f"from trainer import cli, files\ntry:\n    files.write_json({str(path)!r}, {{'big': 'x' * 100_000}})\n"
              "except cli.UserError as e:\n    cli.fail(str(e))")  # as every entry point's main does
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            preexec_fn=_file_size_limit(10_000), env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 2
    assert_user_error(result, f"cannot write {path}: File too large", "what was written before it is intact")
    assert path.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


# --- The server under hostile clients and images ---------------------------------------------------------------


def _png_header(width, height):
    """A 60-byte PNG whose header claims width x height (its pixel data is missing)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _black_png(width, height):
    """A real, decodable all-black PNG: it compresses about 1000:1."""
    compressor, row = zlib.compressobj(), b"\x00" * (1 + 3 * width)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = _png_header(width, height)
    ihdr = header[:33]
    idat = struct.pack(">I", len(pixels)) + b"IDAT" + pixels + struct.pack(">I", zlib.crc32(b"IDAT" + pixels))
    return ihdr + idat + header[-12:]


def _post(port, body, timeout=60):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/models/tiny:predict", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _instances(*encoded):
    return json.dumps({"instances": [{"b64": base64.b64encode(e).decode()} for e in encoded]}).encode()


def _picture():
    return encode(tiny_image(0, np.random.default_rng(0), size=16), "PNG")


@pytest.fixture
def server_process(model_dir):
    """`python -m trainer.serve` with its default limits; yields (port, process, stdout lines)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.serve", f"--model_dir={model_dir}", "--port=0", "--model_name=tiny",
         "--request_timeout_s=300"],  # idle clients are not dropped during the test: they must not matter
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    banner = process.stdout.readline()
    if "serving tiny" not in banner:
        process.kill()
        pytest.fail(f"server did not start: {banner}{process.stderr.read()}")
    yield int(banner.rsplit(":", 1)[1].split("/")[0]), process, Output(process.stdout)
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


def _threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def test_hostile_bodies_get_a_4xx_json_answer(server_process):
    port, process, _ = server_process
    nested = b'{"instances": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # 3 KB
    assert _post(port, nested) == (400, {"error": "malformed JSON: nested too deeply"})
    status, body = _post(port, _instances(_png_header(23000, 23000)))  # 1.6 GB once decoded
    assert status == 413
    assert body["error"] == ("instance 0 is too large to decode: its header says 23000x23000 pixels, more than "
                             "--max_image_pixels=40000000")
    assert _post(port, _instances(_picture()))[0] == 200  # still serving
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in err, err


def test_200_idle_connections_do_not_hold_up_a_request_and_close_quietly(server_process):
    port, process, out = server_process
    threads = _threads(process.pid)
    idle = []
    for _ in range(200):  # headers that promise a body, then nothing
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n")
        idle.append(connection)
    _wait_for(lambda: _threads(process.pid) >= threads + 200, 60, "a thread for each idle connection")
    started = time.monotonic()
    assert _post(port, _instances(_picture()), timeout=30)[0] == 200
    assert time.monotonic() - started < 10  # the idle clients' timeout is 300 s: nothing waited for them
    for connection in idle:  # still open: the server is waiting for their bodies
        connection.setblocking(False)
        with pytest.raises(BlockingIOError):
            connection.recv(1)
        connection.close()
    _wait_for(lambda: out.count("the client closed the connection after 0 of its 1000 body bytes") == 200, 60,
              "a log line for each closed connection")
    _wait_for(lambda: _threads(process.pid) <= threads + 2, 60, "the idle connections' threads to end")
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-3000:]


@pytest.fixture
def in_process_server(model_dir):
    """A server in this process (real HTTP), built with flags; yields (port, server)."""
    started = []

    def start(*flags):
        serve.FLAGS.unparse_flags()
        serve.FLAGS(["serve", f"--model_dir={model_dir}", "--host=127.0.0.1", "--port=0", "--model_name=tiny", *flags])
        _, server = serve._start(serve.FLAGS, {})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server.server_address[1], server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def test_an_image_above_the_pixel_limit_is_never_decoded(in_process_server):
    port, server = in_process_server("--max_image_pixels=1000000")
    decoded = []
    model_call = server.model.serve_bytes

    def spy(image_bytes):  # the signature decodes: count what reaches it
        decoded.extend(image_bytes.numpy().tolist())
        return model_call(image_bytes=image_bytes)

    server.batcher = batching.Batcher(spy, 4, 0.0)
    bomb = _black_png(2000, 2000)  # 4 megapixels, a 12 KB file
    status, body = _post(port, _instances(_picture(), bomb))
    assert status == 413 and "instance 1 is too large to decode: its header says 2000x2000 pixels" in body["error"]
    assert decoded == []
    assert _post(port, _instances(_picture()))[0] == 200 and len(decoded) == 1


def test_connections_beyond_the_limit_get_503_at_once_and_a_stalled_body_408(in_process_server):
    port, server = in_process_server("--max_connections=3", "--request_timeout_s=1")
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    _wait_for(lambda: server.connection_slots._value == 0, 30, "three connections to hold every slot")
    status, body = _post(port, _instances(_picture()))
    assert status == 503 and "--max_connections=3" in body["error"]
    held[0].sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")  # then it stalls
    held[0].settimeout(30)
    answer = b"".join(iter(lambda: held[0].recv(4096), b"")).decode()  # until the server closes it
    assert answer.startswith("HTTP/1.1 408") and "--request_timeout_s=1" in answer
    for connection in held:
        connection.close()
    _wait_for(lambda: server.connection_slots._value == 3, 30, "the slots to be free again")
    assert _post(port, _instances(_picture()))[0] == 200


def test_predict_gives_an_image_above_the_pixel_limit_an_error_line(tmp_path, model_dir, capsys):
    (tmp_path / "good.png").write_bytes(_picture())
    (tmp_path / "bomb.png").write_bytes(_png_header(23000, 23000))
    (tmp_path / "list.txt").write_text("good.png\nbomb.png\n")
    output = tmp_path / "out.jsonl"
    result = run_main(predict.main, [f"--model_dir={model_dir}", f"--input_path={tmp_path / 'list.txt'}",
                                     f"--output_path={output}", "--output_format=jsonl"], capsys)
    assert result.returncode == 0, result.stderr
    good, bomb = [json.loads(line) for line in output.read_text().splitlines()]
    assert "class_probs" in good
    assert "too large to decode: its header says 23000x23000 pixels" in bomb["error"]


# --- Small holes: litter, fsync, data folders ------------------------------------------------------------------


def test_a_killed_exports_folders_are_removed_by_the_next_run(tmp_path):
    job_dir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for name in (f"model.tmp-{dead_pid}", f"model.old-{dead_pid}", f"report.tmp-{dead_pid}",
                     f"model.tmp-{alive.pid}"):
            (job_dir / name / "variables").mkdir(parents=True)
        out = rundir.open_run_dir(str(job_dir), is_chief=True, environ={"CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "h")})
        rundir.close_run_dir(out)
        # A running process's folder may be in the middle of a write: it stays.
        assert sorted(os.listdir(job_dir)) == ["checkpoints", "logs", f"model.tmp-{alive.pid}"]
    finally:
        alive.communicate(b"")


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    files.write_json(str(tmp_path / "state.json"), {"step": 4})
    assert events[:2] == ["fsync", "rename"]
    assert json.load(open(tmp_path / "state.json")) == {"step": 4}


def test_an_image_list_holds_paths_with_spaces(tmp_path):
    from trainer import data

    (tmp_path / "my photos").mkdir()
    (tmp_path / "my photos" / "cat 1.png").write_bytes(_picture())
    (tmp_path / "list.txt").write_text("my photos/cat 1.png 1\nmy photos/cat 1.png\t0\n")
    source = sources.open_source(str(tmp_path / "list.txt"), "training_data_path")
    assert source.files == (str(tmp_path / "my photos" / "cat 1.png"),) * 2 and source.labels == ((1,), (0,))
    assert len(data.scan(source, 2, sources.RecordFormat(), 0.0).keys) == 2  # both read and decoded
    several = sources.open_source(str(tmp_path / "list.txt"), "training_data_path",
                                  sources.RecordFormat(several_labels=True))
    assert several.labels == ((1,), (0,))
    (tmp_path / "bad.txt").write_text("my photos/cat 1.png\n")  # single-label: the label is missing
    with pytest.raises(UserError, match="line 1: expected 'image_path integer_label'"):
        sources.open_source(str(tmp_path / "bad.txt"), "training_data_path")


def test_hidden_folders_are_not_classes_and_an_empty_class_is_named(tmp_path, trainer_main):
    folder = write_folder(tmp_path / "train", per_class=2, num_classes=2)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / ".ipynb_checkpoints" / "img0-checkpoint.png").write_bytes(_picture())
    (tmp_path / "train" / "class_0" / "._img0.png").write_bytes(b"macOS metadata, not a picture")
    source = sources.open_source(folder, "training_data_path")
    assert source.class_names == ("class_0", "class_1") and len(source.files) == 4

    (tmp_path / "train" / "class_2").mkdir()
    result = trainer_main(tiny_flags(folder, folder, str(tmp_path / "run"), num_classes=3))
    assert result.returncode == 2
    assert_user_error(result, f"--training_data_path: class folder {tmp_path / 'train' / 'class_2'} holds no")
