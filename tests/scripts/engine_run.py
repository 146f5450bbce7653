"""Run by tests/test_multiprocess.py, under `accelerate launch` (2 CPU processes) or alone:
a few engine steps on a small regression, tracked, then a barrier (as the CLI does).
argv: mode (ddp | emulate | apart | perturbed), out folder, steps, stop-after (0: none).
apart: each process keeps its checkpoints in a folder of its own (as if the run folder were not shared);
perturbed: process 1 starts from other weights (as a closed-form edit that sampled otherwise would)."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from metaunlearn.config import OptimizerSettings
from metaunlearn.engine import Engine, Terms, leave, step_generator

mode, out, steps, stop = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
data = torch.Generator().manual_seed(1)
X, Y = torch.randn(256, 8, generator=data), torch.randn(256, 4, generator=data)
SEED, BATCH, PROCESSES = 3, 4, 2


def loss_on(generator):
    idx = torch.randint(0, len(X), (BATCH,), generator=generator)
    return torch.nn.functional.mse_loss(model(X[idx]), Y[idx])


def objective(ctx):
    if mode == "emulate":  # one process, both processes' batches: the same global batch
        return Terms({"mse": sum(loss_on(step_generator(SEED, ctx.step, p)) for p in range(PROCESSES)) / PROCESSES})
    return Terms({"mse": loss_on(ctx.generator)})


def stop_at(done):
    if stop and done == stop:
        raise SystemExit(3)  # interrupted after the checkpoint at step 2


class CountingTracker(GeneralTracker):
    """Counts logged steps: a tracked run must keep its process group after the loop (the CLI syncs then)."""
    name, requires_logging_directory, tracker = "counting", False, None

    def __init__(self):
        super().__init__()
        self.steps = 0

    def store_init_configuration(self, values):
        pass

    def log(self, values, step, **kwargs):
        self.steps += 1


tracker = CountingTracker()
accelerator = Accelerator(cpu=True, log_with=[tracker])
if mode == "perturbed" and accelerator.process_index == 1:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
checkpoints = out / (f"checkpoints-{accelerator.process_index}" if mode == "apart" else "checkpoints")
settings = OptimizerSettings(lr=1e-2, steps=steps, batch_size=BATCH, grad_clip=1.0,
                             lr_schedule="linear")  # one schedule step per step, whatever the processes
engine = Engine(model, dict(model.named_parameters()), {"fit": objective}, settings, SEED, accelerator)
try:
    engine.run(checkpoints=checkpoints, checkpoint_every=2, log=out / "log.jsonl", after=stop_at,
               progress=False)
    accelerator.wait_for_everyone()  # as unlearn does after its loop: the process group outlives a tracked run
    final = {k: v.detach() for k, v in model.state_dict().items()}
    torch.save(final, out / f"final-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(final, out / "final.pt")
        (out / "processes.txt").write_text(str(accelerator.num_processes))
except SystemExit as done:  # as the CLI's main ends
    leave(done.code)
leave(0)
