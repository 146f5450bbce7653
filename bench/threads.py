"""Two torch processes on one machine: seconds per training step of a tiny
UNet when each process uses every core (torch's default) against one thread
each, and one process alone, all in one run so the ratios share a machine state.

    .venv/bin/python bench/threads.py [--steps 30]

Prints a Markdown table for bench/RESULTS.md. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import sys, time, json, torch
torch.set_num_threads(int(sys.argv[1]))
from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline
pipe = build_pipeline(TinyPipelineConfig(unet_channels=(64, 128)), ["a", "digit"], seed=0)
unet = pipe.unet.train()
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
x, cond = torch.randn(8, 4, 8, 8), torch.randn(8, 16, 32)
times = []
for step in range(int(sys.argv[2])):
    start = time.perf_counter()
    loss = unet(x, torch.full((8,), 500), encoder_hidden_states=cond).sample.pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps(times[3:]))
"""


def run(threads: int, processes: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(steps)], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    times = [json.loads(w.communicate()[0]) for w in workers]
    return sum(sum(t) / len(t) for t in times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    steps = parser.parse_args().steps
    cores = os.cpu_count()
    cases = [("1 process, every core", cores, 1), ("1 process, 1 thread", 1, 1),
             ("2 processes, every core each", cores, 2), ("2 processes, 1 thread each", 1, 2)]
    start = time.perf_counter()
    results = [(name, run(threads, processes, steps)) for name, threads, processes in cases]
    base = results[0][1]
    print(f"machine: {cores} cores; {steps} steps per process (first 3 dropped); {time.perf_counter() - start:.0f} s\n")
    print("| case | s/step | ratio to 1 process, every core |\n|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
