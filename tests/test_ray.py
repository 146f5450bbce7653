"""`--executor ray`: a tiny study's stage graph as Ray tasks on a local Ray with
two workers; killed midway it resumes, skips what finished, and gives the
results of the sequential runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml
from helpers import console_script
from test_study import FULL, tiny_study

from metaunlearn.config import StudyConfig
from metaunlearn.study import run_study

pytest.importorskip("ray")
pytest.importorskip("nudenet")  # a built-in detector: Ray's workers import nothing of the tests


def study(source, out, **kw) -> dict:
    data = tiny_study(source, out, seeds=(0,), attacks=(FULL,), **kw)
    data["evaluation"]["concept_rate"]["detector"] = "nudenet"
    return data


def comparable(run) -> dict:
    results = json.loads((run / "results.json").read_text())
    for key in ("cost", "environment"):
        results.pop(key)
    for attack in results["attacks"].values():
        for row in attack["rows"].values():
            row.pop("seconds")
    return results


def test_a_killed_ray_study_resumes_skips_what_finished_and_gives_the_sequential_results(tiny_pipeline_dir,
                                                                                         tmp_path):
    """One Ray study, killed once its first model is trained, then resumed on Ray to the report: it skips
    what finished and its results are the sequential runner's (one test: each Ray start costs seconds)."""
    run = tmp_path / "run"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(tiny_pipeline_dir, run)))
    command = [*console_script(), "run", str(path), "--executor", "ray", "--workers", "2", "--quiet"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and "finish  unlearn/" not in _log(run):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    _end_orphaned_workers()  # a worker mid-task outlives its raylet a moment: it would still write the run folder
    finished = _named(_log(run), "finish")
    assert finished and "report" not in finished

    from metaunlearn.ray_executor import run_study_on_ray

    resumed = run_study_on_ray(StudyConfig.from_dict(study(tiny_pipeline_dir, run)), workers=2, progress=False)
    assert resumed.failures == [] and resumed.report is not None
    last = _log(run).split("stages\n")[-1]
    assert {f"skip    {name} (done)" for name in finished} <= {line[21:] for line in last.splitlines()}
    redone = _named(last, "finish  attack/")
    assert not redone & finished
    # an attack a worker completed after the driver's last log line is skipped as done, not run again
    assert len(redone | _named(last, "skip    attack/")) == 3
    assert "finish  report" in last
    sequential = run_study(StudyConfig.from_dict(study(tiny_pipeline_dir, tmp_path / "seq")), progress=False)
    assert sequential.failures == []
    assert comparable(run) == comparable(tmp_path / "seq")


def _end_orphaned_workers(timeout: float = 30.0) -> None:
    """Ray's worker processes (titled 'ray::...') are no children of the killed driver's group; once it is
    gone they exit on their own, but a stage a worker is running may first finish writing. Wait for them,
    then kill what is left."""
    def workers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::"):
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    deadline = time.time() + timeout
    while workers() and time.time() < deadline:
        time.sleep(0.2)
    for pid in workers():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _named(log: str, prefix: str) -> set[str]:
    """The stage names of the log lines (after their timestamp) that start with `prefix`."""
    return {line.split()[3] for line in log.splitlines() if line[21:].startswith(prefix)}


def _log(run) -> str:
    try:
        return (run / "study.log").read_text()
    except OSError:
        return ""


def test_a_worker_that_dies_fails_its_stage_not_the_study():
    """Ray raises from get() only when the worker itself died (or a stage it needed did): that stage's
    failure, and 'blocked' for stages that needed a failed one, never an exception out of the driver."""
    import types

    from metaunlearn.ray_executor import outcome

    class RayError(Exception):
        pass

    def get(ref):
        if ref == "dead":
            raise RayError("\nThe worker died unexpectedly while executing this task (SIGKILL: out of memory).")
        return {"name": ref, "status": "done", "seconds": 1.0}

    ray = types.SimpleNamespace(get=get, exceptions=types.SimpleNamespace(RayError=RayError))
    assert outcome(ray, "fine", "fine", (), {})["status"] == "done"
    died = outcome(ray, "dead", "unlearn/esd-seed0", ("data/train",), {"data/train": "done"})
    assert died["status"] == "failed" and died["error"] == (
        "its Ray worker died: The worker died unexpectedly while executing this task (SIGKILL: out of memory).")
    after = outcome(ray, "dead", "evaluate/esd-seed0", ("unlearn/esd-seed0",), {"unlearn/esd-seed0": "failed"})
    assert after == {"name": "evaluate/esd-seed0", "status": "blocked", "needs": ["unlearn/esd-seed0"]}


def test_stages_that_finish_together_are_looked_at_in_plan_order():
    """Ray fails a dead worker's dependents along with it, and may hand them back first: looked at before the
    stage they needed, a dependent was counted as a failure of its own instead of 'blocked'."""
    import types

    from metaunlearn.ray_executor import collect

    class RayError(Exception):
        pass

    calls = []

    def wait(pending, num_returns, timeout=None):
        calls.append(list(pending))
        if len(calls) == 1:  # the dependent is ready first, alone
            return [pending[-1]], pending[:-1]
        return list(pending), []  # then everything else

    def get(ref):
        if ref in ("dead", "after"):
            raise RayError("The worker died unexpectedly while executing this task.")
        return {"name": names[ref], "status": "done", "seconds": 1.0}

    ray = types.SimpleNamespace(wait=wait, get=get, exceptions=types.SimpleNamespace(RayError=RayError))
    refs = ["data", "dead", "after"]
    names = {"data": "data/train", "dead": "unlearn/esd-seed0", "after": "evaluate/esd-seed0"}
    needs = {"data/train": (), "unlearn/esd-seed0": ("data/train",), "evaluate/esd-seed0": ("unlearn/esd-seed0",)}
    results = list(collect(ray, refs, names, needs))
    assert [r["name"] for r in results] == ["data/train", "unlearn/esd-seed0", "evaluate/esd-seed0"]
    assert [r["status"] for r in results] == ["done", "failed", "blocked"]
    assert results[2]["needs"] == ["unlearn/esd-seed0"]
