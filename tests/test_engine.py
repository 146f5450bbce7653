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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """These tests build their own Accelerator(cpu=True): a study an earlier test ran on a GPU in this
    process would have left accelerate's one state on it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


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
    for name, kind, lr in [("adafactor", torch.optim.Adafactor, 0.05), ("rmsprop", torch.optim.RMSprop, 0.01),
                           ("adam", torch.optim.Adam, 0.02)]:
        module, engine = toy({"optimizer": name, "lr": lr, "weight_decay": 0.01})
        assert type(engine.optimizer.optimizer) is kind and engine.optimizer.optimizer.defaults["weight_decay"] == 0.01
        before = flat(module)
        losses = engine.run(progress=False)
        assert not torch.equal(flat(module), before) and losses[-1] < losses[0], name  # it trains


def test_adafactor_on_a_torch_without_it_is_a_one_line_error(monkeypatch):
    from metaunlearn.errors import ConfigError

    monkeypatch.delattr(torch.optim, "Adafactor")  # torch before 2.5, which pyproject allows
    with pytest.raises(ConfigError, match="optimizer adafactor needs torch 2.5 or later"):
        toy({"optimizer": "adafactor"})


def test_adam_adds_weight_decay_to_the_gradient_where_adamw_decouples_it():
    """The two differ only there: with decay, Adam's first step is still lr per weight (the decay is inside the
    normalised gradient), AdamW's is lr plus lr x decay x weight."""
    steps = {}
    for name in ("adam", "adamw"):
        module, engine = toy({"optimizer": name, "lr": 0.1, "weight_decay": 0.5})
        before = flat(module)
        engine.step(0)
        steps[name] = (flat(module) - before).abs()
    assert torch.allclose(steps["adam"], torch.full_like(steps["adam"], 0.1), atol=1e-5)
    assert not torch.allclose(steps["adamw"], steps["adam"], atol=1e-3)
    trained = []
    for name in ("adam", "adamw"):  # without decay they are one optimizer
        module, engine = toy({"optimizer": name, "lr": 0.1})
        engine.run(progress=False)
        trained.append(flat(module))
    assert torch.equal(*trained)


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_clipping_bounds_the_update(clip):
    module, engine = toy({"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "grad_clip": clip})
    before = flat(module)
    record = engine.step(0)
    moved = (flat(module) - before).norm().item()
    if clip:  # SGD with lr 1 moves by the clipped gradient
        assert record.grad_norm > 1 and moved == pytest.approx(clip, rel=1e-4)
    else:  # nothing bounds the step: SGD with lr 1 moves by the whole gradient, whose norm is logged
        assert moved > 1 and record.grad_norm == pytest.approx(moved, rel=1e-4)


def test_warmup_applies_to_the_constant_schedule_too():
    # each step's record holds the lr it ran at: diffusers' warmup starts from 0, as its training scripts do
    _, engine = toy({"warmup_steps": 4, "steps": 8})  # diffusers' "constant" alone ignores warmup
    assert [engine.step(i).lr for i in range(6)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    _, linear = toy({"lr_schedule": "linear", "warmup_steps": 2, "steps": 6})
    assert [linear.step(i).lr for i in range(6)] == pytest.approx([0.0, 0.05, 0.1, 0.075, 0.05, 0.025])


def test_a_non_finite_gradient_stops_the_step_before_it_reaches_the_weights():
    """Terms that backpropagate themselves (the in-place meta objective) return no graph: a NaN
    that reaches only .grad is caught before the optimizer steps."""
    module = torch.nn.Linear(4, 3)

    def in_place(ctx):
        module.weight.grad = torch.full_like(module.weight, float("nan"))
        return Terms({"meta_after": torch.zeros(())}, {"meta/forget_after": float("inf")})

    settings = OptimizerSettings(lr=0.1, steps=2, batch_size=2, grad_clip=0.0)
    engine = Engine(module, dict(module.named_parameters()), {"meta": in_place}, settings, 3, Accelerator(cpu=True))
    before = flat(module)
    with pytest.raises(TrainingError, match=r"the gradient became nan at step 1 .*meta/forget_after=inf"):
        engine.step(0)
    assert torch.equal(flat(module), before)


def test_the_fp16_loss_scale_is_checkpointed(tmp_path):
    def scaled():  # what accelerate gives an fp16 run on a GPU: a GradScaler (here growing every step)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
        return accelerator

    _, engine = toy({}, accelerator=scaled())
    engine.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)  # the checkpoint after step 2
    _, resumed = toy({}, accelerator=scaled())
    assert resumed.resume(tmp_path) == 2 and resumed.accelerator.scaler.get_scale() == 32.0
    # without clipping the logged norm is the true one, not times the loss scale
    plain, fp16 = toy({})[1].step(0), toy({}, accelerator=scaled())[1].step(0)
    assert fp16.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


def test_an_fp16_run_whose_every_term_backpropagates_itself_steps():
    """GradScaler makes its scale at its first scale(): with no term through the engine's backward (the
    in-place meta objective alone: method none, no preservation) the step still unscales and steps."""
    module = torch.nn.Linear(4, 3)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)

    def in_place(ctx):
        module.weight.grad = torch.full_like(module.weight, ctx.loss_scale)  # a gradient of one, scaled
        return Terms({"meta_after": torch.zeros(())}, {})

    settings = OptimizerSettings(lr=0.1, steps=2, batch_size=2, grad_clip=0.0)
    engine = Engine(module, dict(module.named_parameters()), {"meta": in_place}, settings, 3, accelerator)
    before = module.weight.detach().clone()
    record = engine.step(0)
    assert record.grad_norm == pytest.approx(12 ** 0.5) and not torch.equal(module.weight, before)


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


def test_float16_weights_are_refused_before_any_step():
    module = torch.nn.Linear(3, 1).half()
    with pytest.raises(TrainingError, match="float16 weights cannot be trained.*model.mixed_precision fp16"):
        Engine(module, dict(module.named_parameters()), {"toy": lambda ctx: Terms()},
               OptimizerSettings(steps=2, batch_size=1), 3, Accelerator(cpu=True))


def test_a_run_with_other_accelerate_settings_in_the_same_process_gets_them(monkeypatch):
    """accelerate keeps one device and precision per process and refuses others: a second study in the
    same process (a notebook; the test suite on a GPU) with other settings gets a fresh state, and one
    with the same settings keeps the state it finds."""
    from accelerate.state import AcceleratorState

    from metaunlearn.config import ModelConfig
    from metaunlearn.engine import make_accelerator

    resets = []
    reset = AcceleratorState._reset_state
    monkeypatch.setattr(AcceleratorState, "_reset_state",
                        staticmethod(lambda *a, **k: (resets.append(1), reset(*a, **k))[1]))
    precisions = []
    for mixed in ("no", "bf16", "bf16", "no"):
        precisions.append(make_accelerator(ModelConfig(source="x", device="cpu", mixed_precision=mixed))
                          .state.mixed_precision)
    assert precisions == ["no", "bf16", "bf16", "no"]
    assert len(resets) == 2  # at each change of settings, never when they are the same


def test_adamw_is_fused_on_cuda_tensors_and_torchs_default_on_the_cpu(monkeypatch):
    """The fused kernel is for CUDA tensors; CPU runs keep the implementation every measured number used."""
    from types import SimpleNamespace

    from metaunlearn.engine import make_optimizer

    _, adamw = toy({"optimizer": "adamw"})
    assert adamw.optimizer.optimizer.defaults["fused"] is None
    asked, real = [], torch.optim.AdamW  # what it asks for CUDA tensors (none here: stand-ins that say so)
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **k: (asked.append(k["fused"]),
                                                                    real([torch.zeros(1, requires_grad=True)]))[1])
    for cuda in ([True, True], [True, False]):
        make_optimizer([SimpleNamespace(is_cuda=c) for c in cuda], OptimizerSettings(steps=2))
    assert asked == [True, None]  # every tensor on CUDA, or torch's default


def fused_adamw(monkeypatch):
    """AdamW as the engine builds it on a GPU (fused), here on the CPU, where torch has the kernel too."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: adamw(*a, **{**k, "fused": True}))


def test_an_fp16_overflow_holds_the_schedule_with_a_fused_optimizer_too(monkeypatch):
    """GradScaler always calls a fused optimizer's step (the kernel skips), so accelerate never marks the
    step skipped: the engine reads the overflow from the scaler backing off instead."""
    fused_adamw(monkeypatch)
    records = []
    for init_scale in (8.0, 2.0 ** 127):  # the second overflows every gradient (the loss stays finite)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        module, engine = toy({}, accelerator=accelerator)
        assert engine.optimizer.optimizer.defaults["fused"] is True
        before = flat(module)
        engine.step(0)
        records.append((engine.scheduler.last_epoch, torch.equal(flat(module), before),
                        accelerator.scaler.get_scale() < init_scale))
    assert records == [(1, False, False), (0, True, True)]


def test_fp16_steps_that_overflow_at_every_scale_stop_the_run_clearly(tmp_path):
    """A gradient that is NaN whatever the loss scale halves the scale at every step, and the scaler would
    skip steps forever. MAX_OVERFLOWS_IN_A_ROW in a row stop the run with the losses named; a step taken
    in between starts the count again (sporadic overflows are the scaler's to handle)."""
    from metaunlearn.engine import MAX_OVERFLOWS_IN_A_ROW

    module, broken = torch.nn.Linear(4, 3), [True]

    def objective(ctx):  # a finite loss; while broken, its gradient is NaN: d sqrt(w^2) / dw at w = 0 is 0 / 0
        with torch.no_grad():
            module.weight[0, 0] = 0.0 if broken[0] else 1.0
        return Terms({"mse": module.weight[0, 0].pow(2).sqrt() + module(torch.ones(1, 4)).pow(2).mean()}, {})

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    engine = Engine(module, dict(module.named_parameters()), {"toy": objective},
                    OptimizerSettings(lr=0.1, steps=100, batch_size=1, grad_clip=0.0), seed=0, accelerator=accelerator)
    for step in range(MAX_OVERFLOWS_IN_A_ROW - 1):  # skipped, not yet an error
        engine.step(step)
    broken[0] = False
    engine.step(MAX_OVERFLOWS_IN_A_ROW - 1)  # taken: the count starts again
    broken[0] = True
    for step in range(MAX_OVERFLOWS_IN_A_ROW, 2 * MAX_OVERFLOWS_IN_A_ROW - 1):
        engine.step(step)
    # a checkpoint keeps the count: resumed, the run gives up where the uninterrupted one would
    engine.save(tmp_path / "checkpoints", 2 * MAX_OVERFLOWS_IN_A_ROW - 1)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    engine = Engine(module, dict(module.named_parameters()), {"toy": objective},
                    OptimizerSettings(lr=0.1, steps=100, batch_size=1, grad_clip=0.0), seed=0, accelerator=accelerator)
    assert engine.resume(tmp_path / "checkpoints") == 2 * MAX_OVERFLOWS_IN_A_ROW - 1
    assert engine.overflows_in_a_row == MAX_OVERFLOWS_IN_A_ROW - 1
    with pytest.raises(TrainingError, match=rf"{MAX_OVERFLOWS_IN_A_ROW} fp16 steps in a row overflowed.*mse="):
        engine.step(2 * MAX_OVERFLOWS_IN_A_ROW - 1)


def test_a_checkpoint_resumes_with_this_runs_optimizer_implementation(tmp_path, monkeypatch):
    """A checkpoint saved on a GPU (fused AdamW) resumed on the CPU runs torch's default there, and the
    other way round: torch's load_state_dict would copy the saved flag over the optimizer's own."""
    with monkeypatch.context() as patch:
        fused_adamw(patch)
        _, gpu_like = toy({})
        gpu_like.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)
    _, resumed = toy({})
    done = resumed.resume(tmp_path)
    assert done > 0 and resumed.optimizer.optimizer.param_groups[0]["fused"] is None
    resumed.step(done)  # and it steps
    fused_adamw(monkeypatch)
    _, fused_again = toy({})
    fused_again.resume(tmp_path)
    assert fused_again.optimizer.optimizer.param_groups[0]["fused"] is True


def test_a_gpu_named_with_or_without_its_index_keeps_accelerates_state(monkeypatch):
    """A single process's state names its GPU "cuda" (no index): cuda:0 or cuda:1 is the same device
    there (torch.cuda.set_device chose it), while the CPU or another precision starts afresh."""
    from accelerate.state import AcceleratorState, PartialState

    from metaunlearn.engine import _forget_other_settings

    resets = []
    monkeypatch.setattr(AcceleratorState, "_reset_state", staticmethod(lambda *a, **k: resets.append(1)))
    monkeypatch.setattr(PartialState, "_shared_state", {"device": torch.device("cuda"), "num_processes": 1})
    monkeypatch.setattr(AcceleratorState, "_shared_state", {"_mixed_precision": "fp16"})
    for device, mixed in (("cuda", "fp16"), ("cuda:0", "fp16"), ("cuda:1", "fp16"), ("cpu", "fp16"),
                          ("cuda", "bf16")):
        _forget_other_settings(device, mixed)
    assert len(resets) == 2
    monkeypatch.setattr(PartialState, "_shared_state", {"device": torch.device("cuda"), "num_processes": 2})
    _forget_other_settings("cpu", "no")  # a distributed launch keeps its state
    assert len(resets) == 2


def test_a_cpu_checkpoint_resumes_under_fused_adamw_and_fp16(tmp_path, monkeypatch):
    """The direction that broke: a checkpoint saved by torch's default AdamW (a CPU run), resumed by a fused
    fp16 run (a GPU). Loaded as saved, the group lost its fused flag and the scaler's step then failed."""
    _, cpu_run = toy({})
    cpu_run.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)
    fused_adamw(monkeypatch)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    _, resumed = toy({}, accelerator=accelerator)
    done = resumed.resume(tmp_path)
    assert done > 0 and resumed.optimizer.optimizer.param_groups[0]["fused"] is True
    resumed.step(done)


def test_mixed_precision_covers_the_modules_forward_passes_only():
    """bf16 autocast on the CPU: the module's matmul runs in bf16 (called directly or functionally), a
    matmul of the objective's own around it in float32, and the module is left as it was."""
    seen = {}
    module = torch.nn.Linear(4, 3)

    def objective(ctx):
        x = torch.randn(ctx.batch_size, 4, generator=ctx.generator)
        out = module(x)
        around = x @ torch.randn(4, 4, generator=ctx.generator)
        inside_functional = torch.func.functional_call(module, dict(module.named_parameters()), (x,))
        seen.update(out=out.dtype, around=around.dtype, functional=inside_functional.dtype)
        return Terms({"mse": out.float().pow(2).mean()})

    engine = Engine(module, dict(module.named_parameters()), {"toy": objective},
                    OptimizerSettings(lr=0.1, steps=1, batch_size=2), seed=3,
                    accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    before = flat(module)
    engine.step(0)
    assert seen == {"out": torch.bfloat16, "around": torch.float32, "functional": torch.bfloat16}
    assert "forward" not in module.__dict__ and module(torch.ones(1, 4)).dtype == torch.float32
    assert not torch.equal(flat(module), before) and flat(module).dtype == torch.float32  # it trained


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_one_steps_forward_passes_share_autocasts_weight_casts():
    """As under one autocast region: a weight moved in place between two forward passes is read from the
    cast made before (why meta.py clears the cache after moving weights) until the cache is cleared."""
    from metaunlearn.precision import forward_autocast

    module, x = torch.nn.Linear(4, 4, bias=False), torch.ones(1, 4)
    with forward_autocast(module, _bf16, "cpu"):
        first = module(x)
        with torch.no_grad():
            module.weight.mul_(2)
        assert torch.equal(module(x), first)
        torch.clear_autocast_cache()
        assert torch.allclose(module(x).float(), 2 * first.float(), rtol=1e-2)


def test_the_forward_autocast_leaves_an_instances_own_forward_and_a_callers_autocast_as_they_were():
    import copy

    from metaunlearn.precision import forward_autocast

    module = torch.nn.Linear(4, 3)
    own = module.forward = lambda x: x @ x.T  # noqa: E731 (another wrapper, e.g. accelerate's)
    with _bf16():
        with forward_autocast(module, _bf16, "cpu"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # the caller's is off here
            assert module(torch.ones(2, 2)).dtype == torch.bfloat16  # the wrapper runs under the engine's
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # and back on after
    assert module.forward is own

    plain = torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError), forward_autocast(plain, _bf16, "cpu"):
        twin = copy.deepcopy(plain)  # a copy made meanwhile runs its own weights
        with torch.no_grad():
            twin.weight.zero_()
            twin.bias.zero_()
        assert torch.equal(twin(torch.ones(1, 4)), torch.zeros(1, 3, dtype=torch.bfloat16))
        raise RuntimeError("an objective fails")
    assert "forward" not in plain.__dict__ and not torch.is_autocast_enabled("cpu")
    with forward_autocast(plain, None, "cpu"):  # no mixed precision: nothing changes
        assert "forward" not in plain.__dict__
