"""The one training loop: unlearning, the meta stage, every attack and the
benchmarks run their optimizer steps here.

Per step: every objective returns `Terms` (loss terms and log-only values),
with mixed precision on the trained module's forward passes only (precision.py);
each objective's terms are checked finite and backpropagated as soon as it
returns, so no objective's graph is alive while the next one runs (the first-
order meta objective adds its gradients to .grad itself); gradients are
averaged across accelerate processes and clipped, the optimizer and the lr
schedule step, and stateful hooks (an EMA teacher) update. Each step draws its
randomness from a generator seeded by (seed, step), so a run resumed from a
checkpoint replays exactly the steps an uninterrupted run would have taken.
`run` adds checkpoints, resume, logging (JSONL, and accelerate's trackers)
and a callback after every step (evaluation during attacks).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch

from .checkpoint import load_newest_intact, save_checkpoint, set_aside_after
from .config import ModelConfig, OptimizerSettings
from .errors import ConfigError, TrainingError
from .layout import write_text
from .params import kept_out
from .precision import forward_autocast


@dataclass
class StepContext:
    step: int
    generator: torch.Generator  # the only source of randomness of a step: resumes replay it exactly
    batch_size: int
    # what the engine multiplies a loss by before its backward pass (fp16 mixed precision's loss scale):
    # an objective that adds gradients to .grad itself scales them by it too
    loss_scale: float = 1.0


@dataclass
class Terms:
    """What an objective returns for one step."""

    # added up into the loss and backpropagated by the engine; a term with no graph is only logged (an
    # objective that backpropagated it itself: first-order meta in place)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)  # logged only


Objective = Callable[[StepContext], Terms]


class Stateful(Protocol):
    """Something that changes with training besides the trained tensors (an EMA teacher)."""

    def after_step(self) -> None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


# fp16 steps skipped in a row before a run stops: GradScaler halves its scale at each, 65536 to 1/16 in 20
MAX_OVERFLOWS_IN_A_ROW = 20


def _shown(*values: dict[str, float]) -> str:
    """Named values for an error message: 'name=value, ...' (a later dict's value wins a shared name)."""
    merged: dict[str, float] = {}
    for part in values:
        merged.update(part)
    return ", ".join(f"{k}={v:.4g}" for k, v in merged.items())


def check_finite(module: torch.nn.Module, what: str, hint: str) -> None:
    """Refuse to save weights that are not finite (an lr that overflowed without the loss noticing yet)."""
    bad = [name for name, param in module.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise TrainingError(f"{what} has non-finite weights in {len(bad)} tensors (first: {bad[0]}); "
                            f"nothing was saved; {hint}")


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + process)


def available_device(device: str) -> str:
    """`device` ('auto': CUDA if torch sees one, else CPU), or a one-line error when torch here
    cannot use it (a CUDA device on a machine or torch build without one, an index past the count)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device)
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (kind.index or 0) >= count:
            raise TrainingError(f"model.device '{device}' is not available here (torch sees {count} CUDA "
                                f"device{'s' * (count != 1)}); use model.device=auto or cpu")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"model.device '{device}' is not available here; use model.device=auto or cpu")
    return device


def rank_zeros(tensors) -> None:
    """Every process's `tensors` set to the main process's (a collective: every process calls it)."""
    from accelerate.utils import broadcast

    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(broadcast(tensor.detach().clone(), from_process=0))


PROCESS_WAIT = timedelta(hours=2)  # how long a process waits in a collective (torch's NCCL default: 10 minutes)


def make_accelerator(model: ModelConfig, trackers: list[str] | None = None, project_dir: Path | None = None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    device = available_device(model.device)
    cpu = torch.device(device).type == "cpu"  # "cpu:0" too
    if device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))  # a single-process run on a chosen GPU
    _forget_other_settings(device, model.mixed_precision)
    # the processes wait on the main one while it alone samples (a closed form's verdicts on its candidate
    # edits, one per round): NCCL's default 10 minutes is less than sampling a large prompt set takes
    wait = InitProcessGroupKwargs(timeout=PROCESS_WAIT)
    return Accelerator(mixed_precision=model.mixed_precision, cpu=cpu, log_with=trackers or None,
                       project_dir=str(project_dir) if project_dir else None, kwargs_handlers=[wait])


def _forget_other_settings(device: str, mixed_precision: str) -> None:
    """accelerate keeps one device and precision per process: an Accelerator asking for others raises
    ("AcceleratorState has already been initialized"), or, asking for a GPU after a CPU run, silently gets
    the CPU. A single-process run may follow one with other settings (two studies in one notebook; the test
    suite on a GPU machine): its state starts afresh. A distributed launch keeps its state (one config)."""
    from accelerate.state import AcceleratorState, PartialState

    state, partial = AcceleratorState._shared_state, PartialState._shared_state
    if not state and not partial:
        return
    if partial.get("num_processes", 1) > 1:
        return
    have, wanted = partial.get("device"), torch.device(device)
    # a single process's state names "cuda" without an index (torch.cuda.set_device picked the GPU)
    same_device = have is not None and have.type == wanted.type and \
        (have.index is None or wanted.index is None or have.index == wanted.index)
    if not (same_device and state.get("_mixed_precision") == mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=True)


def make_optimizer(params: list[torch.Tensor], settings: OptimizerSettings):
    from diffusers.optimization import get_scheduler

    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    elif settings.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):  # pyproject allows torch 2.1; Adafactor came in 2.5
            raise ConfigError(f"optimizer adafactor needs torch 2.5 or later (this is torch {torch.__version__})")
        optimizer = torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)
    elif settings.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        # on a GPU, the fused kernel: foreach's temporaries cost about one copy of the trained weights at the
        # step's peak (SD-1.4, bench/RESULTS.md "On a GPU"); the CPU keeps its default, bit for bit
        fused = bool(params) and all(p.is_cuda for p in params) or None
        adam = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
        optimizer = adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    # diffusers' "constant" ignores num_warmup_steps: its warmup form is "constant_with_warmup"
    name = "constant_with_warmup" if settings.lr_schedule == "constant" and settings.warmup_steps else \
        settings.lr_schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=settings.steps)
    return optimizer, scheduler


class JsonlLog:
    """Append-only JSON-lines log of per-step values. On resume, lines past the
    checkpoint are dropped: those steps are about to be replayed."""

    def __init__(self, path: Path, keep_until_step: int = 0):
        self.path = Path(path)
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        kept = [line for line, step in zip(lines, map(_step_of, lines)) if step is not None and step <= keep_until_step]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a line a kill -9 cut short."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return None


@dataclass
class StepRecord:
    step: int  # steps done after this one
    loss: float
    terms: dict[str, float]
    logs: dict[str, float]
    grad_norm: float
    lr: float
    seconds: float

    def as_log(self) -> dict:
        return {"step": self.step, "loss": self.loss, **self.terms, **self.logs, "grad_norm": self.grad_norm,
                "lr": self.lr, "seconds": round(self.seconds, 4)}


def total_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of all `grads` together: one fused kernel per dtype and device where torch has it."""
    if not grads:
        return 0.0
    foreach = getattr(torch, "_foreach_norm", None)
    norms = foreach(grads) if foreach is not None else [torch.linalg.vector_norm(g) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([n.float().to(grads[0].device) for n in norms])))


def _destroy_process_group() -> None:
    """At exit of a process of a distributed run. One that exits with its process group alive can abort
    in interpreter shutdown ("terminate called without an active exception": gloo's threads still hold
    tensors; pytorch/pytorch PR 179291), so a finished run's exit code would say it failed. atexit runs
    on a normal end, SystemExit and uncaught exceptions alike."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def leave(code: int | str | None = 0) -> None:
    """Exit with `code`. A process of a multi-process run destroys its process group and then skips
    interpreter finalization (os._exit): the atexit teardown above was not always enough, and a rank of
    a finished run still aborted there now and then (SIGABRT, "terminate called without an active
    exception", its results already written), which made the whole launch fail."""
    if isinstance(code, str):  # SystemExit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else code
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


class Engine:
    """Optimizer steps over `params` (name -> trainable tensor of `module`) for the
    objectives' summed loss. `hint` ends the message of a non-finite loss."""

    def __init__(self, module: torch.nn.Module, params: Mapping[str, torch.nn.Parameter],
                 objectives: Mapping[str, Objective], settings: OptimizerSettings, seed: int, accelerator,
                 stateful: tuple[Stateful, ...] = (), hint: str = "lower the learning rate"):
        self.module, self.params, self.objectives = module, dict(params), dict(objectives)
        if any(p.dtype == torch.float16 for p in self.params.values()):  # before any step, not NaN at step 2
            raise TrainingError("float16 weights cannot be trained (AdamW's eps underflows to 0/0, and fp16 mixed "
                                "precision cannot unscale fp16 gradients): set model.dtype float32 and "
                                "model.mixed_precision fp16")
        self.settings, self.seed, self.accelerator, self.stateful, self.hint = settings, seed, accelerator, \
            stateful, hint
        optimizer, self.scheduler = make_optimizer(list(self.params.values()), settings)
        # the scheduler stays unprepared: accelerate's steps it num_processes times per step (it assumes a
        # sharded data loader and so fewer steps); here every process takes all `steps`, each its own batch
        self.optimizer = accelerator.prepare(optimizer)
        self.last_good = "none (the run had not checkpointed yet)"
        self.losses: list[float] = []  # every step's loss, in this process's run
        self.overflows_in_a_row = 0  # fp16 steps the scaler skipped since the last one it took
        # seconds of training steps, the checkpointed run's included (so a resumed run's time is the whole
        # run's); `resumed_seconds`: the part a checkpoint brought
        self.seconds = self.resumed_seconds = 0.0
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:  # its scale is made by the first scale(): a run whose every term backpropagates
            scaler.scale(torch.zeros((), device=accelerator.device))  # itself (meta in place) never calls it
        if accelerator.num_processes > 1:
            atexit.unregister(_destroy_process_group)  # registered once per process
            atexit.register(_destroy_process_group)

    def context(self, step: int) -> StepContext:
        scaler = getattr(self.accelerator, "scaler", None)
        return StepContext(step, step_generator(self.seed, step, self.accelerator.process_index),
                           self.settings.batch_size, float(scaler.get_scale()) if scaler is not None else 1.0)

    def step(self, step: int) -> StepRecord:
        """One optimizer step (0-based index `step`)."""
        begin, acc = time.perf_counter(), self.accelerator
        lr = self.scheduler.get_last_lr()[0]  # this step's (the scheduler's step below sets the next one's)
        ctx = self.context(step)
        self.module.train()
        losses: dict[str, float] = {}
        logs: dict[str, float] = {}
        for objective in self.objectives.values():
            with kept_out(objective):
                with forward_autocast(self.module, acc.autocast if acc.native_amp else None, acc.device.type):
                    terms = objective(ctx)
                logs.update(terms.logs)
                if terms.losses:
                    # backpropagated now: this objective's graph is freed before the next one builds its own
                    self._check_finite(terms.losses, losses, step)
                    total = sum(terms.losses.values())
                    # no graph: every part capped, or the objective backpropagated its terms itself (meta in place)
                    if total.requires_grad:
                        acc.backward(total)
                    losses.update({k: v.item() for k, v in terms.losses.items()})
        if not losses:
            raise TrainingError("nothing to train: no objective returned a loss term")
        if acc.num_processes > 1:  # the logged losses are every process's batch, as the gradient is
            keys = list(losses)  # the same objectives, in the same order, on every process
            mean = acc.reduce(torch.tensor([losses[k] for k in keys], device=acc.device), "mean")
            losses = dict(zip(keys, mean.tolist()))
        value = sum(losses.values())
        if acc.num_processes > 1:  # the UNet is not DDP-wrapped (functional calls): average by hand
            for param in self.params.values():
                if param.grad is not None:
                    param.grad = acc.reduce(param.grad, "mean")
        clip, scaler = self.settings.grad_clip, getattr(acc, "scaler", None)
        if clip > 0:
            grad_norm = float(acc.clip_grad_norm_(self.params.values(), clip))
        else:
            if scaler is not None:  # the true norm, not times the fp16 loss scale (the optimizer step knows)
                scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))
            grad_norm = total_norm([p.grad for p in self.params.values() if p.grad is not None])
        if not math.isfinite(grad_norm) and scaler is None:  # fp16's scaler skips such a step itself
            # terms that backpropagate themselves (meta in place) leave only their gradients to check
            raise TrainingError(f"the gradient became {grad_norm} at step {step + 1} (losses: "
                                f"{_shown(losses, logs)}); last good checkpoint: {self.last_good}; {self.hint}")
        scale = scaler.get_scale() if scaler is not None else None
        self.optimizer.step()
        # an fp16 overflow skipped the step exactly when the scaler backed off (accelerate's step_was_skipped
        # misses it when the optimizer is fused: GradScaler then always calls step() and the kernel skips)
        taken = scaler is None or scaler.get_scale() >= scale
        if taken:
            self.scheduler.step()
            self.overflows_in_a_row = 0
        else:
            self.overflows_in_a_row += 1
            if self.overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
                # the scale halves at each: this many in a row is no range problem the scaler can fix, and it
                # would skip every step from now on without a word (as a NaN the simulated attack made once did)
                raise TrainingError(f"{self.overflows_in_a_row} fp16 steps in a row overflowed, up to step "
                                    f"{step + 1} (loss scale now {scaler.get_scale():g}): the gradient is not "
                                    f"finite at any scale (losses: {_shown(losses, logs)}); last good "
                                    f"checkpoint: {self.last_good}; {self.hint}, or try bf16")
        self.optimizer.zero_grad(set_to_none=True)
        for hook in self.stateful if taken else ():  # a skipped step moved no weight (SDD's teacher follows them)
            hook.after_step()
        self.module.eval()
        return StepRecord(step + 1, value, losses, logs, grad_norm, lr, time.perf_counter() - begin)

    def _check_finite(self, terms: dict[str, torch.Tensor], earlier: dict[str, float], step: int) -> None:
        values = {k: v.item() for k, v in terms.items()}
        bad = not all(map(math.isfinite, values.values()))
        if self.accelerator.num_processes > 1:  # every process stops, not one while the others wait on it
            bad = bool(self.accelerator.reduce(torch.tensor(float(bad), device=self.accelerator.device), "sum"))
        if bad:
            shown = _shown(earlier, values)
            raise TrainingError(f"the loss became {sum(values.values()) + sum(earlier.values())} at step {step + 1} "
                                f"({shown}); last good checkpoint: {self.last_good}; {self.hint}")

    # --------------------------------------------------------------- checkpoints
    def save(self, folder: Path, done: int) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "seconds": self.seconds}
        if getattr(self.accelerator, "scaler", None) is not None:  # fp16: a resumed run keeps its loss scale
            state["scaler"] = self.accelerator.scaler.state_dict()
            state["overflows_in_a_row"] = self.overflows_in_a_row  # and its count toward giving up
        extra = {f"{i}.{k}": v for i, hook in enumerate(self.stateful) for k, v in hook.state_dict().items()}
        self.last_good = save_checkpoint(folder, done, self.params, state, extra).name

    def resume(self, folder: Path) -> int:
        """Load the newest intact checkpoint in `folder`, if any (warning about damaged newer
        ones, set aside for a post-mortem); returns the steps it had done."""
        state, skipped = load_newest_intact(folder, set(self.params))
        for line in skipped:
            warnings.warn(f"{line}; resuming from {state['path'].name if state else 'the start'}", stacklevel=2)
        if skipped and self.accelerator.is_main_process:  # the one process that writes checkpoints
            set_aside_after(folder, state["path"] if state else None)
        if state is None:
            return 0
        checkpoint = state["path"]
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["params"][name])
        saved = state["training_state"]["optimizer"]
        # the implementation is this run's (fused on a GPU, torch's default on the CPU), not the one the
        # checkpoint was saved with: torch's load would copy it over (and fp16's scaler then fails the step)
        for group, current in zip(saved["param_groups"], self.optimizer.param_groups):
            group.update({k: current[k] for k in ("fused", "foreach") if k in current})
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state["training_state"]["scheduler"])
        if "scaler" in state["training_state"] and getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.load_state_dict(state["training_state"]["scaler"])
            self.overflows_in_a_row = int(state["training_state"].get("overflows_in_a_row", 0))
        for i, hook in enumerate(self.stateful):
            prefix = f"{i}."
            hook.load_state_dict({k[len(prefix):]: v for k, v in state["extra"].items() if k.startswith(prefix)})
        self.seconds = self.resumed_seconds = float(state["training_state"].get("seconds", 0.0))
        self.last_good = checkpoint.name
        return state["step"]

    def _agree(self, start: int) -> None:
        """Processes of one run resume from one checkpoint and hold the same weights (gradients are averaged
        by hand, nothing else keeps them equal): a process that saw another folder, or whose closed-form edit
        sampled otherwise, is caught or brought in line before the first step."""
        from accelerate.utils import gather_object

        starts = gather_object([start])
        if len(set(starts)) > 1:
            raise TrainingError(f"the processes found different checkpoints to resume from (steps {starts}): "
                                "keep the run folder on a filesystem every process sees")
        rank_zeros(self.params.values())

    # --------------------------------------------------------------- the loop
    def run(self, *, checkpoints: Path | None = None, checkpoint_every: int = 0, log: Path | None = None,
            log_every: int = 1, after: Callable[[int], None] | None = None, desc: str = "train",
            progress: bool = True, tracker_name: str = "", tracker_config: dict | None = None) -> list[float]:
        """All steps: resumes from `checkpoints` (when given), checkpoints every
        `checkpoint_every` steps, logs to `log` (JSONL) and the trackers, and calls
        `after(done)` before the first step and after each. Returns every step's loss."""
        from tqdm.auto import tqdm

        acc, steps = self.accelerator, self.settings.steps
        start = self.resume(checkpoints) if checkpoints is not None else 0
        if acc.num_processes > 1:
            self._agree(start)
        jsonl = JsonlLog(log, keep_until_step=start) if log is not None and acc.is_main_process else None
        tracking = bool(acc.log_with)
        if tracking:
            acc.init_trackers(tracker_name or desc, config=tracker_config)
        if after is not None:
            after(start)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, leave=False,
                   disable=not progress or not acc.is_main_process)
        for step in bar:
            record = self.step(step)
            self.losses.append(record.loss)
            self.seconds += record.seconds
            done = record.step
            if acc.is_main_process:
                if done % log_every == 0 or done == steps:
                    if jsonl is not None:
                        jsonl.write(record.as_log())
                    if tracking:
                        acc.log({k: v for k, v in record.as_log().items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{record.loss:.4f}", refresh=False)
                if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                    self.save(checkpoints, done)
            if after is not None:
                after(done)
        bar.close()
        if tracking:  # not end_training(): that also destroys the process group the rest of the run needs
            for tracker in acc.trackers:
                tracker.finish()
        return self.losses
