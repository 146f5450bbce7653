"""kill -9 at a random moment of `metaunlearn run`, then resume: does the study
end with the same results.json as one that was never interrupted?

Runs a small digits study (bench/kill_resume.yaml) once uninterrupted, then N
trials that each start it in a fresh folder, kill the whole process group with
SIGKILL after a random delay, run it again to the end and compare results.json
with the reference (timings and the environment left out). One thread per
process, so a resumed step computes what an uninterrupted one does.

    python bench/kill_resume.py --trials 10 --out bench/out/kill_resume
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STUDY = Path(__file__).with_name("kill_resume.yaml")
VOLATILE = {"cost", "environment", "seconds"}  # wall-clock numbers and the machine differ between runs


def command(out: Path) -> list[str]:
    script = Path(sys.executable).with_name("metaunlearn")
    return [str(script), "run", str(STUDY), "--set", f"output.dir={out}"]


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def run(out: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command(out), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/kill_resume")
    args = parser.parse_args()
    root, rng = Path(args.out), random.Random(args.seed)
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    reference_s = run(root / "reference", env)
    reference = stable(json.loads((root / "reference" / "results.json").read_text()))
    print(f"reference: {reference_s:.1f} s", flush=True)
    same = 0
    for trial in range(args.trials):
        out = root / f"trial-{trial}"
        delay = rng.uniform(0.05, 0.95) * reference_s
        child = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            child.wait(timeout=delay)
            killed = "finished before the kill"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            log = (out / "study.log").read_text().splitlines() if (out / "study.log").is_file() else []
            killed = f"killed at {delay:.1f} s during {log[-1].split(maxsplit=3)[-1] if log else 'start-up'}"
        resume_s = run(out, env)
        result = stable(json.loads((out / "results.json").read_text()))
        match = result == reference
        same += match
        print(f"trial {trial}: {killed}; resumed in {resume_s:.1f} s; results.json "
              f"{'identical' if match else 'DIFFERS'}", flush=True)
    print(f"{same} of {args.trials} resumed studies match the uninterrupted one")
    sys.exit(0 if same == args.trials else 1)


if __name__ == "__main__":
    main()
