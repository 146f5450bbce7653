"""The training engine on a toy module: the optimizer a setting asks for,
clipping, per-step randomness, the callback schedule and the trackers."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from metaunlearn.config import OptimizerSettings
from metaunlearn.engine import Engine, Terms, step_generator
from metaunlearn.errors import TrainingError


def toy(settings: dict, objective=None, accelerator=None) -> tuple[torch.nn.Linear, Engine]:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    params = dict(module.named_parameters())

    def loss(ctx):  # a batch drawn from the step's generator, as every real objective does
        x = torch.randn(ctx.batch_size, 4, generator=ctx.generator)
        return Terms({"mse": 100 * module(x).pow(2).mean()}, {"seen": float(x.sum())})

    settings = OptimizerSettings(**{"lr": 0.1, "steps": 4, "batch_size": 2, "grad_clip": 0.0, **settings})
    return module, Engine(module, params, {"toy": objective or loss}, settings, seed=3,
                          accelerator=accelerator or Accelerator(cpu=True))


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_the_optimizer_and_its_settings():
    _, adamw = toy({"optimizer": "adamw", "weight_decay": 0.01})
    _, sgd = toy({"optimizer": "sgd", "momentum": 0.5, "weight_decay": 0.02})
    inner = [e.optimizer.optimizer for e in (adamw, sgd)]
    assert isinstance(inner[0], torch.optim.AdamW) and inner[0].defaults["weight_decay"] == 0.01
    assert isinstance(inner[1], torch.optim.SGD) and inner[1].defaults["momentum"] == 0.5
    assert inner[1].defaults["weight_decay"] == 0.02


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_clipping_bounds_the_update(clip):
    module, engine = toy({"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "grad_clip": clip})
    before = flat(module)
    record = engine.step(0)
    moved = (flat(module) - before).norm().item()
    if clip:  # SGD with lr 1 moves by the clipped gradient
        assert record.grad_norm > 1 and moved == pytest.approx(clip, rel=1e-4)
    else:  # the norm is not measured without clipping (NaN), and nothing bounds the step
        assert record.grad_norm != record.grad_norm and moved > 1


def test_steps_replay_their_randomness_and_callbacks_see_every_step():
    runs = []
    for _ in range(2):
        module, engine = toy({})
        seen = []
        losses = engine.run(after=seen.append, progress=False)
        runs.append((flat(module), losses))
        assert seen == [0, 1, 2, 3, 4] and len(losses) == 4
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    a, b = step_generator(3, 1), step_generator(3, 2)
    assert not torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_a_non_finite_loss_is_a_training_error():
    _, engine = toy({}, objective=lambda ctx: Terms({"bad": torch.tensor(float("nan"), requires_grad=True)}))
    with pytest.raises(TrainingError, match=r"the loss became nan at step 1 \(bad=nan\).*lower the learning rate"):
        engine.step(0)
    _, empty = toy({}, objective=lambda ctx: Terms())
    with pytest.raises(TrainingError, match="nothing to train"):
        empty.step(0)


class ListTracker(GeneralTracker):
    name, requires_logging_directory = "list", False

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values):
        self.logged.append(("config", values))

    def log(self, values, step, **kwargs):
        self.logged.append((step, values))


def test_training_values_reach_accelerate_trackers():
    tracker = ListTracker()
    _, engine = toy({}, accelerator=Accelerator(cpu=True, log_with=[tracker]))
    engine.run(progress=False, tracker_name="toy", tracker_config={"lr": 0.1})
    assert tracker.logged[0] == ("config", {"lr": 0.1})
    steps = tracker.logged[1:]
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert {"loss", "mse", "seen", "grad_norm", "lr"} <= set(steps[0][1])
