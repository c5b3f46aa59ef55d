"""The Dockerfile installs this package and starts trainer.container, the three roles' entrypoint, in exec form.
(The roles themselves, driven as each platform drives them: test_container_contracts.py.)"""

import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def dockerfile_instructions():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_entrypoint_is_exec_form_and_plain_flags_run_the_trainer():
    entrypoints = [args for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    command = json.loads(entrypoints[0])  # exec form is a JSON array: signals reach Python directly
    assert command == ["python", "-m", "trainer.container"]
    # The entrypoint is a program: run it as the container would, with a Vertex AI custom job's arguments.
    started = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True, text=True, cwd=ROOT)
    assert started.returncode == 0 and started.stdout.startswith("usage: python -m trainer.task"), started.stderr
    refused = subprocess.run([sys.executable, *command[1:], "--num_classes=3"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --training_data_path")


def test_image_installs_this_package_on_a_tensorflow_gpu_base():
    instructions = dockerfile_instructions()
    assert re.fullmatch(r"tensorflow/tensorflow:[\d.]+-gpu", instructions[0][1])
    copied = {args.split()[0] for op, args in instructions if op == "COPY"} | {
        name for op, args in instructions if op == "COPY" for name in args.split()[:-1]}
    for needed in ("setup.py", "trainer", "hptuning"):
        assert needed in copied, needed
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs and installs[0].rstrip().endswith(" ."), installs
    workdir = [args for op, args in instructions if op == "WORKDIR"]
    assert workdir and instructions.index(("WORKDIR", workdir[0])) < instructions.index(("RUN", installs[0]))
