"""One run across processes with accelerate (2 CPU processes, gloo): gradients
averaged, the result equal to one process with the same global batch,
checkpoints and logs written once, resume after an interruption, every process
starting from process 0's weights and resuming from the same checkpoint; and an
unlearning run of the CLI launched the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

SCRIPT = Path(__file__).parent / "scripts" / "engine_run.py"
VERDICT_SCRIPT = Path(__file__).parent / "scripts" / "shared_verdict.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
PORT = iter(range(29650, 29700))


def launch(*args, processes: int = 2, module: bool = False, timeout: int = 300, script: Path = SCRIPT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < processes:  # a rank per GPU, or all on the CPU: never two ranks on one GPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    target = ["-m", *args] if module else [str(script), *args]
    # --multi_gpu: torch.distributed's launcher; on a machine without CUDA the processes join over gloo
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(next(PORT)), *target]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_average_gradients_checkpoint_once_and_resume(tmp_path):
    ddp, resumed, single = tmp_path / "ddp", tmp_path / "resumed", tmp_path / "single"
    done = launch("ddp", str(ddp), "4", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ddp / "processes.txt").read_text() == "2"
    alone = subprocess.run([sys.executable, str(SCRIPT), "emulate", str(single), "4", "0"], capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    a, b = torch.load(ddp / "final.pt"), torch.load(single / "final.pt")
    for name in a:  # the mean of the two processes' gradients is the gradient of their union
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    alone = subprocess.run([sys.executable, str(SCRIPT), "ddp", str(tmp_path / "alone"), "4", "0"],
                           capture_output=True, text=True, timeout=300)  # process 0's batches only
    assert alone.returncode == 0 and not torch.allclose(a["0.weight"], torch.load(tmp_path / "alone" / "final.pt")[
        "0.weight"], atol=1e-6)  # so the two processes' gradients were both used
    # written once: one log line per step, one checkpoint per checkpoint step
    assert [json.loads(line)["step"] for line in (ddp / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-000002"]

    stopped = launch("ddp", str(resumed), "4", "3")  # interrupted after step 3 (checkpoint at 2)
    assert stopped.returncode != 0 and not (resumed / "final.pt").exists()
    again = launch("ddp", str(resumed), "4", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    c = torch.load(resumed / "final.pt")
    for name in a:
        assert torch.equal(a[name], c[name]), name
    assert [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    # process 1 starting from other weights (a closed-form edit that sampled otherwise) is brought in line:
    # both end where the run from equal weights did, which they would not if each kept its own start
    perturbed = launch("perturbed", str(tmp_path / "perturbed"), "4", "0")
    assert perturbed.returncode == 0, perturbed.stderr[-3000:]
    for rank in (0, 1):
        d = torch.load(tmp_path / "perturbed" / f"final-{rank}.pt")
        for name in a:
            assert torch.equal(a[name], d[name]), (rank, name)


def test_processes_that_would_resume_from_different_checkpoints_stop(tmp_path):
    """A run folder each process sees otherwise (not shared): process 0 finds the checkpoint of step 2,
    process 1 none. Resuming them apart would train on different weights under averaged gradients."""
    apart = tmp_path / "apart"
    assert launch("apart", str(apart), "4", "3").returncode != 0  # interrupted after the checkpoint at 2
    assert (apart / "checkpoints-0" / "step-000002").is_dir() and not (apart / "checkpoints-1").exists()
    again = launch("apart", str(apart), "4", "0")
    assert again.returncode != 0 and not (apart / "final-0.pt").exists()
    assert "the processes found different checkpoints to resume from (steps [2, 0])" in again.stderr


@pytest.mark.parametrize("mode", ["own", "replay", "fail"])
def test_every_process_takes_the_main_process_verdict_on_a_candidate_edit(tmp_path, mode):
    """RECE keeps the round its judge scores best. Each process's judge here gives its own verdict (as
    sampling that differs by process would): every process must take the main one's, judged by it alone;
    an interrupted run's verdicts are the main process's to replay; a judge that fails stops every process."""
    done = launch(str(tmp_path), mode, script=VERDICT_SCRIPT, timeout=120)
    if mode == "fail":
        assert done.returncode != 0
        assert (tmp_path / "error-0.txt").read_text() == "ConfigError: no detector for this concept"
        assert (tmp_path / "error-1.txt").read_text() == ("TrainingError: the main process could not judge a "
                                                          "candidate edit (ConfigError: no detector for this concept)")
        return
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"verdicts-{rank}.json").read_text()) for rank in (0, 1))
    expected = [0.5, 1.0] if mode == "own" else [7.0, 0.5]  # replayed, then judged afresh
    assert main["seen"] == main["recorded"] == other["seen"] == expected and other["recorded"] == []
    assert (main["judged"], other["judged"]) == (2 if mode == "own" else 1, 0)


@pytest.mark.parametrize("method", ["esd", "rece"])
def test_an_unlearning_run_of_the_cli_across_two_processes(tiny_pipeline_dir, tmp_path, method):
    """rece: a closed form that judges its rounds by sampling, on the main process only, then a meta stage."""
    from helpers import clean_exit
    from test_study import tiny_study
    from typer.testing import CliRunner

    from metaunlearn.cli import app

    run = tmp_path / "run"
    study = tiny_study(tiny_pipeline_dir, run, seeds=(0,), variants=("meta",), attacks=())
    study["method"].update(steps=4, checkpoint_every=2)
    study["evaluation"]["concept_rate"]["detector"] = "nudenet"  # the CLI processes import nothing of the tests
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    clean_exit(CliRunner().invoke(app, ["data", str(path)]))  # in this process: one torch start less
    done = launch("metaunlearn", "unlearn", str(path), "--seed", "0", "--set", "meta.enabled=true", "--set",
                  f"method.name={method}", module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run / "unlearn" / f"{method}-meta-seed0"
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "done"
    if method == "rece":  # every round judged (by the main process, every process taking its verdicts)
        assert len(record["rece"]["forget_rate_by_round"]) == 3 and record["rece"]["kept_round"] in (0, 1, 2)
    assert (folder / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the main process logs, once
    assert [p.name for p in (folder / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
