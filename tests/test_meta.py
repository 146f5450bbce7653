"""The meta objective on a tiny random pipeline: exact second-order gradients
(checked against finite differences), first-order gradients equal to a
hand-built detached copy, gradients that reach every trained weight and no
frozen one, every term finite and logged in a real run, the inner step forms,
and the errors a user can meet."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metaunlearn import DiffusionModel
from metaunlearn.config import MetaConfig, MethodConfig, StudyConfig
from metaunlearn.errors import MetaunlearnError
from metaunlearn.engine import StepContext
from metaunlearn.layout import unlearn_fingerprint
from metaunlearn.meta import REFERENCE_BATCHES, MetaObjective, inner_direction, linear_surrogate, make_meta
from metaunlearn.methods import make_method, trained_params
from metaunlearn.params import make_trainable, select_names
from metaunlearn.unlearn import unlearn

from helpers import FORGET, RELATED, UNRELATED, concept_data, role  # noqa: F401
BATCH = 2
# A small trainable subset for the exact-gradient checks: one cross-attention
# projection and one convolution (both paths of the UNet: text and image).
SUBSET = ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "down_blocks.1.resnets.0.conv1.weight")




def subset(model: DiffusionModel, names=SUBSET) -> dict[str, torch.nn.Parameter]:
    model.unet.requires_grad_(False)
    params = dict(model.unet.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return {name: params[name] for name in names}


# The paper's objective: one fixed SGD inner step and the denoising loss as the keeping term,
# none of our additions; a test names what it adds.
# First order runs functionally here (in_place off): its gradients come as surrogate terms these tests
# differentiate; test_the_in_place_first_order_step_equals_the_functional_one shows in place is the same.
PAPER = dict(inner_lr=1e-4, inner_steps=1, inner_step="sgd", low_rank=0.0, retain="denoise", unrelated_kept=0.0,
             forget_sharpness=0.0, in_place=False, attacked="trained", forget_after=1.0)


def objective(model, trainable, data, method="none", **meta) -> MetaObjective:
    config = MetaConfig(enabled=True, **{**PAPER, **meta})
    base = make_method(MethodConfig(name=method))
    base.setup(model, trainable, data)
    return make_meta(config, model, trainable, data, base, BATCH)


def evaluate(meta: MetaObjective, seed: int = 7) -> dict:
    """One call with fixed randomness (every evaluation draws the same batches, t and
    noise): its loss terms and log values in one mapping."""
    terms = meta(StepContext(0, torch.Generator().manual_seed(seed), BATCH))
    assert all(torch.is_tensor(v) for v in terms.losses.values())
    assert all(isinstance(v, float) for v in terms.logs.values())
    return {**terms.losses, **terms.logs}


def run(config, model, data, out):
    return unlearn(config, model, data, out, 0, unlearn_fingerprint(config, 0), progress=False)


def gradient(value: torch.Tensor, trainable) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, list(trainable.values())))


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(((x - y) ** 2).sum().item() for x, y in zip(a, b)))
    return num / math.sqrt(sum((y ** 2).sum().item() for y in b))


def make_config(source, *overrides: str) -> StudyConfig:
    study = {"model": {"source": str(source), "device": "cpu"},
             "concepts": {"forget": {"prompts": [FORGET]}, "related": {"prompts": [RELATED]},
                          "unrelated": {"prompts": [UNRELATED]}},
             "method": {"steps": 3, "lr": 1e-3, "batch_size": BATCH, "checkpoint_every": 50,
                        "esd": {"x_t": "noised", "ddim_steps": 4}},
             "meta": {"enabled": True}}
    return StudyConfig.from_dict(study, overrides)


def log_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ----------------------------------------------------------------- building blocks
def test_inner_direction_forms():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g) * 5, torch.randn(7, generator=g) * 1e-3, torch.zeros(2)]
    assert all(a is b for a, b in zip(inner_direction(grads, "sgd"), grads))  # the identity

    unit = inner_direction(grads, "normalized")
    assert math.sqrt(sum((d ** 2).sum().item() for d in unit)) == pytest.approx(1.0, rel=1e-6)
    scale = unit[0].flatten()[0] / grads[0].flatten()[0]
    assert all(torch.allclose(d, scale * x) for d, x in zip(unit, grads))  # same direction, one scale

    rms = inner_direction(grads, "rms")  # the same direction, each coordinate moving 1 on average (Adam's size)
    assert math.sqrt(sum((d ** 2).sum().item() for d in rms) / sum(x.numel() for x in grads)) == pytest.approx(
        1.0, rel=1e-6)
    assert all(torch.allclose(d, u * math.sqrt(sum(x.numel() for x in grads))) for d, u in zip(rms, unit))

    wide = [x.double() for x in grads]  # float64: 5 / (5 + 1e-8) is not rounded up to 1
    adam = inner_direction(wide, "adam")
    for d, x in zip(adam, wide):
        assert (d.abs() < 1).all()
        assert torch.equal(torch.sign(d), torch.sign(x))
    assert torch.allclose(adam[0].abs(), torch.ones(3, 4, dtype=torch.float64))  # |g| >> eps: unit steps
    assert (inner_direction(grads, "adam")[1].abs() <= 1).all()
    with pytest.raises(ValueError, match="unknown inner step form"):
        inner_direction(grads, "rmsprop")


def test_linear_surrogate_is_zero_with_the_given_gradient():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    given = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, generator=g)]
    value = linear_surrogate(params, given)
    assert value.item() == 0.0
    grads = torch.autograd.grad(value, params + [given[0]], allow_unused=True)
    assert all(torch.equal(a, b) for a, b in zip(grads[:2], given))
    assert grads[2] is None  # the given gradients are constants


# ----------------------------------------------------------------- exact gradients
@pytest.fixture
def double_model(tiny_model):
    """The tiny model in float64, for finite differences. The loss itself stays
    float32 (DiffusionModel.denoising_loss casts to float32), which sets the
    accuracy finite differences can reach."""
    tiny_model.unet.double()
    return tiny_model


@pytest.mark.parametrize("inner_step,inner_steps", [("sgd", 1), ("normalized", 1), ("sgd", 2)])
def test_second_order_gradient_matches_finite_differences(double_model, inner_step, inner_steps):
    model = double_model
    data, trainable = concept_data(model), subset(model)
    weights_ = dict(related_before=0.0, unrelated_before=0.0, forget_after=1.0, related_after=1.0)
    meta = objective(model, trainable, data, mode="second_order", inner_step=inner_step, inner_steps=inner_steps,
                     inner_lr=0.5, **weights_)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3 + i), dtype=p.dtype)
         for i, p in enumerate(trainable.values())]

    out = evaluate(meta)
    assert set(out) >= {"meta_after", "meta/forget_after", "meta/related_after"}
    assert "meta_related_before" not in out and "meta_unrelated_before" not in out
    exact = sum((g * d).sum() for g, d in zip(gradient(out["meta_after"], trainable), v)).item()

    def f(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(trainable.values(), v):
                p.add_(h * d)
        value = evaluate(meta)["meta_after"].item()
        with torch.no_grad():
            for p, d in zip(trainable.values(), v):
                p.sub_(h * d)
        return value

    h = 1e-3  # five-point stencil, O(h^4): the float32 loss leaves ~1e-4 relative noise at this h
    numeric = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
    assert abs(exact) > 1e-3
    assert abs(numeric - exact) / abs(exact) < 1e-3, (numeric, exact)

    # first order drops the Jacobian of the inner step: it is not this derivative
    first = objective(model, trainable, data, mode="first_order", inner_step=inner_step, inner_steps=inner_steps,
                      inner_lr=0.5, **weights_)
    approx = sum((g * d).sum() for g, d in zip(gradient(evaluate(first)["meta_after"], trainable), v)).item()
    assert abs(approx - exact) / abs(exact) > 1e-2


@pytest.mark.parametrize("inner_step", ["sgd", "normalized"])
def test_second_order_differs_from_first_order(tiny_model, inner_step):
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    outs, grads = {}, {}
    for mode in ("first_order", "second_order"):
        meta = objective(tiny_model, trainable, data, mode=mode, inner_step=inner_step, inner_lr=0.5,
                         related_before=0.0, unrelated_before=0.0, unrelated_after=0.5)
        outs[mode] = evaluate(meta)
        grads[mode] = gradient(outs[mode]["meta_after"], trainable)
    # same draws, same simulated attack, same post-attack losses...
    for key in ("meta/forget_before", "meta/forget_after", "meta/related_after", "meta/unrelated_after",
                "meta/after_objective"):
        assert outs["first_order"][key] == pytest.approx(outs["second_order"][key], rel=1e-5), key
    assert outs["first_order"]["meta_after"].item() == 0.0  # the surrogate is zero-valued
    # ...but the Hessian term of the second-order gradient matters
    assert rel_diff(grads["first_order"], grads["second_order"]) > 0.05
    assert all(torch.isfinite(g).all() for g in grads["second_order"])


def by_hand_step(g: torch.Tensor, grads: list[torch.Tensor], form: str) -> torch.Tensor:
    if form == "sgd":
        return g
    if form in ("normalized", "rms"):
        norm = torch.sqrt(sum((x * x).sum() for x in grads))
        return g / norm * (math.sqrt(sum(x.numel() for x in grads)) if form == "rms" else 1.0)
    return g / (g.abs() + 1e-8)


@pytest.mark.parametrize("inner_step,inner_steps", [("sgd", 1), ("normalized", 2), ("adam", 1), ("rms", 1)])
def test_first_order_is_the_gradient_at_a_detached_post_attack_copy(tiny_model, inner_step, inner_steps):
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    tau, a, b, e = 0.3, 1.0, 0.7, 0.5
    meta = objective(tiny_model, trainable, data, mode="first_order", inner_step=inner_step, inner_steps=inner_steps,
                     inner_lr=tau, forget_after=a, related_after=b, unrelated_after=e)
    out = evaluate(meta, seed=11)
    assert out["meta_after"].item() == 0.0
    got = gradient(out["meta_after"], trainable)

    # The same draws by hand: forget batch, M inner losses, then forget/related/unrelated after.
    gen, names = torch.Generator().manual_seed(11), list(trainable)
    current = [p.detach().clone().requires_grad_(True) for p in trainable.values()]
    forget = data.forget.sample(BATCH, gen)
    for _ in range(inner_steps):
        loss = tiny_model.denoising_loss(*forget, params=dict(zip(names, current)), generator=gen)
        grads = torch.autograd.grad(loss, current)
        current = [(p - tau * by_hand_step(g, grads, inner_step)).detach().requires_grad_(True)
                   for p, g in zip(current, grads)]
    after = dict(zip(names, current))
    losses = [tiny_model.denoising_loss(*getattr(data, r).sample(BATCH, gen), params=after, generator=gen)
              for r in ("forget", "related", "unrelated")]
    assert losses[0].item() == pytest.approx(out["meta/forget_after"], rel=1e-6)
    assert losses[2].item() == pytest.approx(out["meta/unrelated_after"], rel=1e-6)
    expected = torch.autograd.grad(-a * losses[0] - b * losses[1] - e * losses[2], current)
    for g, x in zip(got, expected):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in trainable.values())  # autograd.grad above, nothing accumulated


@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_several_attackers_per_step_average_their_post_attack_gradients(tiny_model, mode):
    """meta.attackers_per_step N: N simulated attacks, one after another from theta, each on a forget batch
    of its own; the post-attack term is the mean of theirs (the same draws by hand)."""
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    tau, a, b = 0.3, 1.0, 0.7
    meta = objective(tiny_model, trainable, data, mode=mode, inner_lr=tau, forget_after=a, related_after=b,
                     attackers_per_step=2)
    got = gradient(evaluate(meta, seed=5)["meta_after"], trainable)

    gen, names, theta = torch.Generator().manual_seed(5), list(trainable), list(trainable.values())
    total = [torch.zeros_like(p) for p in theta]
    for _ in range(2):
        forget = data.forget.sample(BATCH, gen)
        loss = tiny_model.denoising_loss(*forget, params=trainable, generator=gen)
        grads = torch.autograd.grad(loss, theta, create_graph=mode == "second_order")
        after = [p - tau * g for p, g in zip(theta, grads)]
        if mode == "first_order":
            after = [p.detach().requires_grad_(True) for p in after]
        after_params = dict(zip(names, after))
        outer = -a * tiny_model.denoising_loss(*data.forget.sample(BATCH, gen), params=after_params, generator=gen)
        outer = outer - b * tiny_model.denoising_loss(*data.related.sample(BATCH, gen), params=after_params,
                                                      generator=gen)
        data.unrelated.sample(BATCH, gen)  # drawn, its weight (e) 0: no loss
        # first order: the gradient at the detached copy; second order: through the inner step
        for t, g in zip(total, torch.autograd.grad(outer, after if mode == "first_order" else theta)):
            t.add_(g, alpha=0.5)
    for g, x in zip(got, total):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="a persistent episode follows one attacker"):
        MetaConfig(attackers_per_step=2, persistent=5)


@pytest.mark.parametrize("in_place", [False, True])
def test_several_attackers_take_the_sharpness_term_once(tiny_model, in_place, monkeypatch):
    """The sharpness term is theta's own (the forget gradient where every attack starts): taken with the
    first attacker only, at full weight, whatever their number."""
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    name = "_sharpness_in_place" if in_place else "_sharpness"
    calls, real = [], getattr(MetaObjective, name)
    monkeypatch.setattr(MetaObjective, name, lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for n in (1, 3):
        meta = objective(tiny_model, trainable, data, attackers_per_step=n, forget_sharpness=1.0, sharpness_cap=0.0,
                         in_place=in_place)
        calls.clear()
        meta(StepContext(0, torch.Generator().manual_seed(2), BATCH))
        assert calls == [1], n


@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_meta_gradients_reach_every_trained_weight_and_no_frozen_one(tiny_model, mode):
    data = concept_data(tiny_model)
    trainable = make_trainable(tiny_model.unet, "noxattn")
    meta = objective(tiny_model, trainable, data, method="esd", mode=mode, inner_lr=1e-2, unrelated_after=0.5)
    terms = {k: v for k, v in evaluate(meta).items() if torch.is_tensor(v)}
    assert set(terms) == {"meta_after", "meta_related_before", "meta_unrelated_before"}
    sum(terms.values()).backward()
    zero = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not zero, f"no meta gradient on {zero}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    frozen = [n for n, p in tiny_model.unet.named_parameters() if n not in trainable]
    assert frozen and all(dict(tiny_model.unet.named_parameters())[n].grad is None for n in frozen)
    assert all(p.grad is None for m in (tiny_model.vae, *tiny_model.text_encoders) for p in m.parameters())

    # and only the after terms: the ascent at theta' alone reaches theta too
    tiny_model.unet.zero_grad(set_to_none=True)
    evaluate(meta)["meta_after"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


# ----------------------------------------------------------------- the capped target
@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_a_capped_ascent_has_the_raw_gradient_below_its_cap_and_none_above(tiny_model, mode):
    data, trainable = concept_data(tiny_model), subset(tiny_model)
    after = dict(mode=mode, inner_lr=0.5, related_before=0.0, unrelated_before=0.0, unrelated_after=0.5)
    raw = evaluate(objective(tiny_model, trainable, data, target="raw", **after))
    raw_grad = gradient(raw["meta_after"], trainable)
    assert all(g.abs().sum() > 0 for g in raw_grad)

    below = objective(tiny_model, trainable, data, target="capped", cap=1e3, **after)
    out = evaluate(below)  # every post-attack loss far below its cap: the raw objective
    assert out["meta/after_objective"] == pytest.approx(raw["meta/after_objective"], rel=1e-6)
    for g, r in zip(gradient(out["meta_after"], trainable), raw_grad):
        torch.testing.assert_close(g, r)

    above = objective(tiny_model, trainable, data, target="capped", cap=1e-3, **after)
    out = evaluate(above)  # every post-attack loss above its cap: each term at its bound, no gradient
    levels = above.cap_levels
    assert all(out[f"meta/{name}_after"] > levels[name] for name in ("forget", "related", "unrelated"))
    assert out["meta/after_objective"] == pytest.approx(
        -levels["forget"] - levels["related"] - 0.5 * levels["unrelated"], rel=1e-6)
    assert all(torch.count_nonzero(g) == 0 for g in gradient(out["meta_after"], trainable))
    # the levels: cap x the original model's mean loss on fixed batches of each role
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [tiny_model.denoising_loss(*data.forget.sample(BATCH, gen), generator=gen).item() for _ in range(4)]
    assert levels["forget"] == pytest.approx(1e-3 * sum(losses) / 4, rel=1e-6)
    assert below.cap_levels["related"] == pytest.approx(1e6 * levels["related"], rel=1e-6)


def test_a_sampled_inner_lr_is_drawn_log_uniformly_inside_its_range():
    from metaunlearn.simulated import draw

    low, high = 1e-4, 1e-2
    gen = torch.Generator().manual_seed(0)
    lrs = torch.tensor([draw(MetaConfig(inner_lr=(low, high)), gen).lr for _ in range(2000)], dtype=torch.float64)
    assert lrs.min() >= low and lrs.max() <= high
    assert lrs.min() < 1.1 * low and lrs.max() > 0.9 * high  # the whole range is reached
    # log-uniform: each of the two decades holds half the draws (uniform would put 9% below 1e-3)
    assert (lrs < 1e-3).double().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (lrs < 1e-4 * 10 ** 0.5).double().mean().item() == pytest.approx(0.25, abs=0.05)
    state = gen.get_state()
    assert draw(MetaConfig(inner_lr=3e-4, inner_steps=1, inner_step="sgd", low_rank=0.0), gen).lr == 3e-4
    assert torch.equal(gen.get_state(), state)  # a fixed attacker leaves the step's randomness as it was


def test_the_simulated_attacker_takes_its_own_batch_size(tiny_model):
    """meta.inner_batch: the inner steps' forget batch (and the sharpness term's unit, measured on batches
    of that size); the post-attack terms keep the method's batch."""
    data = concept_data(tiny_model)
    sizes, sample = [], data.forget.sample
    data.forget.sample = lambda n, gen: sizes.append(n) or sample(n, gen)
    meta = objective(tiny_model, subset(tiny_model), data, inner_batch=5, forget_sharpness=1.0)
    assert sizes == [BATCH] * REFERENCE_BATCHES + [5] * REFERENCE_BATCHES  # at setup: the cap's levels, then
    # the sharpness unit
    sizes.clear()
    evaluate(meta)
    assert sizes[0] == 5 and BATCH in sizes[1:]  # the attacker's batch, then the post-attack forget term's
    default = objective(tiny_model, subset(tiny_model), data)
    assert default.inner_batch == BATCH


def test_a_new_option_at_its_neutral_value_leaves_finished_runs_their_fingerprint():
    """meta.inner_batch, meta.fd_step, meta.attackers_per_step and meta.salient came after runs were made: at
    their neutral values (None, 1e-4, 1, None: what the code computed before), a config fingerprints as it did
    without them."""
    import hashlib
    import json

    from metaunlearn.config import RUN_ONLY

    config = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}}})
    dumped = config.model_dump(mode="json")["meta"]
    del dumped["inner_batch"], dumped["fd_step"], dumped["attackers_per_step"], dumped["salient"]
    del dumped["salient_lora_targets"], dumped["params"]
    for key in RUN_ONLY["meta"]:
        dumped.pop(key)
    before = hashlib.sha256(json.dumps({"meta": dumped}, sort_keys=True, separators=(",", ":")).encode())
    assert config.fingerprint("meta") == before.hexdigest()[:16]
    for changed in ({"inner_batch": 16}, {"fd_step": 1e-5}, {"attackers_per_step": 2}, {"salient": 0.5},
                    {"params": "full"}):
        other = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}, "unrelated": {"prompts": ["y"]}},
                                       "meta": changed})  # salient needs unrelated concepts
        assert other.fingerprint("meta") != config.fingerprint("meta")
    named = StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}},
                                   "meta": {"inner_batch": config.method.batch_size}})  # what None computes
    assert named.fingerprint("meta") == config.fingerprint("meta") and named.fingerprint() == config.fingerprint()


# ----------------------------------------------------------------- in the training loop
@pytest.mark.parametrize("method,mode", [("esd", "second_order"), ("none", "first_order"),
                                         ("none", "second_order")])
def test_meta_training_moves_only_the_selection(tiny_model, tiny_pipeline_dir, tmp_path, method, mode):
    # method none without preservation: the meta terms alone must train (a meta-only stage)
    config = make_config(tiny_pipeline_dir, f"method.name={method}", f"meta.mode={mode}", "method.steps=2",
                         f"method.preservation_weight={1.0 if method == 'esd' else 0.0}")
    selected = set(select_names(tiny_model.unet, trained_params(config.method)))
    original = weights(tiny_model.unet)
    others = [weights(m) for m in (tiny_model.vae, *tiny_model.text_encoders)]
    run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")

    moved = [n for n, p in tiny_model.unet.named_parameters() if n in selected and not torch.equal(p, original[n])]
    assert len(moved) > len(selected) // 2, f"meta training moved only {len(moved)} of {len(selected)} weights"
    for name, param in tiny_model.unet.named_parameters():
        if name not in selected:
            assert torch.equal(param, original[name]), f"frozen {name} moved"
            assert param.grad is None, name
    for module, before in zip((tiny_model.vae, *tiny_model.text_encoders), others):
        assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    records = log_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all("meta/after_objective" in r and ("esd" in r) == (method == "esd") for r in records)
    assert all(("preserve" in r) == (method == "esd") for r in records)


def test_meta_params_wider_than_the_methods_reach_the_rest_through_the_meta_terms_only(tiny_model, tiny_pipeline_dir,
                                                                                        tmp_path):
    """meta.params 'full' over ESD-u: cross-attention (which ESD-u leaves frozen) moves, trained by the meta terms
    and preservation; ESD's own loss still has no gradient there, with gradient checkpointing too (its backward
    pass recomputes the graph the forward pass built)."""
    from accelerate import Accelerator

    from metaunlearn.params import kept_out
    from metaunlearn.unlearn import training_engine

    config = make_config(tiny_pipeline_dir, "method.name=esd", "method.params=noxattn", "meta.params=full",
                         "method.steps=2", "method.gradient_checkpointing=true")
    xattn = set(select_names(tiny_model.unet, "xattn"))
    original = weights(tiny_model.unet)
    data = concept_data(tiny_model)
    engine = training_engine(config, tiny_model, data, make_method(config.method), Accelerator(cpu=True), 0)
    assert set(engine.params) == set(select_names(tiny_model.unet, "full"))
    ctx = StepContext(0, torch.Generator().manual_seed(0), BATCH)
    with kept_out(engine.objectives["method"]):
        engine.objectives["method"](ctx).losses["esd"].backward()
    got = {n for n, p in engine.params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and not got & xattn  # the method's loss: its own weights only
    assert all(p.requires_grad for p in engine.params.values())  # back on for the meta terms
    tiny_model.unet.zero_grad(set_to_none=True)
    engine.objectives["preserve"](ctx).losses["preserve"].backward()
    assert all(engine.params[n].grad is not None for n in xattn)
    tiny_model.unet.zero_grad(set_to_none=True)
    # the engine's own step with the method's loss alone (under gradient checkpointing): cross-attention stays
    engine.objectives = {"method": engine.objectives["method"]}
    engine.step(0)
    after = weights(tiny_model.unet)
    assert all(torch.equal(after[n], original[n]) for n in xattn)
    assert any(not torch.equal(after[n], original[n]) for n in engine.params if n not in xattn)
    with torch.no_grad():
        for name, p in tiny_model.unet.named_parameters():
            p.copy_(original[name])
    for p in engine.params.values():
        p.requires_grad_(False)

    run(config, tiny_model, data, tmp_path / "run")
    moved = {n for n, p in tiny_model.unet.named_parameters() if not torch.equal(p, original[n])}
    assert len(moved & xattn) > len(xattn) // 2


def test_meta_params_must_contain_the_methods_weights_and_name_a_wider_selection():
    from metaunlearn.errors import ConfigError

    study = {"concepts": {"forget": {"prompts": ["x"]}}, "meta": {"enabled": True}}
    with pytest.raises(ConfigError, match="does not contain the weights method.params 'full'"):
        StudyConfig.from_dict(study, ["method.params=full", "meta.params=noxattn"])
    with pytest.raises(ConfigError, match="not to 'uce': its meta stage trains method.params"):
        StudyConfig.from_dict(study, ["method.name=uce", "method.params=noxattn", "meta.params=full"])
    # the method's own selection is null: the same run
    own = StudyConfig.from_dict(study, ["method.params=noxattn", "meta.params=noxattn"])
    assert own.meta.params is None and own.fingerprint() == StudyConfig.from_dict(study, ["method.params=noxattn"]
                                                                                   ).fingerprint()
    assert StudyConfig.from_dict(study, ["meta.params=full"]).meta.params == "full"  # ESD-u under it


META_KEYS = ("meta/after_objective", "meta_related_before", "meta_unrelated_before", "meta/forget_after",
             "meta/related_after", "meta/inner_lr")


# every mode x inner step, and every target under both modes
@pytest.mark.parametrize("mode,inner_step,target", [
    ("first_order", "sgd", "raw"), ("first_order", "normalized", "capped"),
    ("first_order", "adam", "unlearn_target"), ("second_order", "sgd", "unlearn_target"),
    ("second_order", "normalized", "raw"), ("second_order", "adam", "capped"),
])
def test_every_meta_term_is_finite_and_logged(tiny_model, tiny_pipeline_dir, tmp_path, mode, inner_step, target):
    low, high = 1e-4, 1e-2
    config = make_config(tiny_pipeline_dir, f"meta.mode={mode}", f"meta.inner_step={inner_step}",
                         f"meta.target={target}", f"meta.inner_lr=[{low}, {high}]", "meta.cap=0.9",
                         "meta.unrelated_after=0.5")
    run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")
    records, capped = log_records(tmp_path / "run"), 0
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in (*META_KEYS, "meta/unrelated_after", "meta/unrelated_kept", "meta/forget_grad_ratio", "esd",
                    "preserve", "loss", "grad_norm"):  # the defaults' terms too
            assert key in r and math.isfinite(r[key]), (key, r.get(key))
        assert low <= r["meta/inner_lr"] <= high
        # distillation to the original: zero at the first step (the original itself), then positive
        assert (r["meta_related_before"] > 0) == (r["step"] > 1) == (r["meta_unrelated_before"] > 0)
        # first order (in place) hands the post-attack and sharpness gradients over as gradients, the
        # post-attack term as a zero (the step has a term whatever else it has); second order's sharpness is a
        # zero-valued surrogate
        assert ("meta_sharpness" in r) == (mode == "second_order") and r.get("meta_sharpness", 0.0) == 0.0
        total = r["esd"] + r["preserve"] + r.get("meta_after", 0.0) + r["meta_related_before"] + \
            r["meta_unrelated_before"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        if mode == "first_order":
            assert r["meta_after"] == 0.0  # its value is logged as meta/after_objective
        else:
            assert r["meta_after"] == pytest.approx(r["meta/after_objective"], rel=1e-5)
        # the post-attack objective from its logged parts (trajectory 'last': the last point's), with
        # the sign of each: ascent on forget (or the pull to the target), related and unrelated, R kept
        def ascent(r, name):
            value = r[f"meta/{name}_after"]
            return min(value, r[f"meta/cap_{name}"]) if target == "capped" else value

        forget = r["meta/forget_after"] if target == "unlearn_target" else -ascent(r, "forget")
        expected = config.meta.forget_after * forget - ascent(r, "related") - 0.5 * ascent(r, "unrelated") + \
            r["meta/unrelated_kept"]
        assert r["meta/after_objective"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        capped += target == "capped" and any(r[f"meta/{k}_after"] > r[f"meta/cap_{k}"] for k in ("forget", "related"))
    assert len({r["meta/inner_lr"] for r in records}) == 3  # drawn afresh every step
    assert (capped > 0) == (target == "capped")  # cap 0.9 binds: the sum above checks a term at its bound


# ----------------------------------------------------------------- errors
def test_unlearn_target_needs_a_base_method_with_a_target(tiny_model, tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir, "method.name=none", "meta.target=unlearn_target")
    with pytest.raises(MetaunlearnError, match="unlearn_target.*needs a base method with a target.*'none'") as info:
        run(config, tiny_model, concept_data(tiny_model), tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "log.jsonl").exists()

    data = concept_data(tiny_model)
    trainable = make_trainable(tiny_model.unet, "noxattn")
    calls = []

    def far_target(x_t, t, cond):
        calls.append(len(x_t))
        return torch.full_like(x_t, 100.0)

    for method in ("esd", "sdd"):  # the methods with a target take it: the forget term is the distance to it
        meta = objective(tiny_model, trainable, data, method=method, target="unlearn_target")
        assert math.isfinite(evaluate(meta)["meta/forget_after"])
        calls.clear()
        meta.method.target = far_target
        # predictions are O(1): the distance to a target of 100 everywhere is about 100^2
        assert evaluate(meta)["meta/forget_after"] == pytest.approx(1e4, rel=0.05) and calls == [BATCH]


@pytest.mark.parametrize("attacker", [
    dict(inner_step="adam", low_rank=0.0),  # streamed; the sharpness penalty below its cap
    dict(inner_step="sgd", low_rank=1.0, sharpness_cap=0.0),  # streamed low rank; the penalty's streamed passes
    dict(inner_step="adam", low_rank=0.0, sharpness_cap=0.0, attacked="all"),  # frozen weights moved too
    dict(inner_step="normalized", low_rank=0.0, sharpness_cap=0.0),  # the whole gradient's norm: not streamed
    dict(inner_step="rms", low_rank=1.0, sharpness_cap=0.0),  # the same, low rank
    dict(inner_step=["sgd", "adam"], low_rank=0.5, sharpness_cap=0.0, attackers_per_step=3)])  # averaged
def test_the_in_place_first_order_step_equals_the_functional_one_and_restores_the_weights(tiny_model, attacker):
    """meta.in_place moves the UNet's own weights and puts them back: the same loss terms and logged
    values as running the UNet functionally on copies, bit for bit, the same total gradient (its
    post-attack part added to .grad by backward passes instead of a surrogate term), and theta unchanged."""
    data = concept_data(tiny_model)
    results = []
    for in_place in (False, True):
        for p in tiny_model.unet.parameters():
            p.grad = None
        trainable = make_trainable(tiny_model.unet, "noxattn")
        before = {n: p.detach().clone() for n, p in trainable.items()}
        method = make_method(MethodConfig(name="esd", esd={"x_t": "noised"}), "")
        method.setup(tiny_model, trainable, data)
        config = MetaConfig(enabled=True, in_place=in_place, inner_steps=(2, 2), trajectory="linear", **attacker)
        meta = MetaObjective(config, tiny_model, trainable, data, method, BATCH)
        assert meta.original is method.teacher  # the distillation target shares ESD's frozen copy
        terms = meta(StepContext(0, torch.Generator().manual_seed(7), BATCH))
        assert all(torch.equal(before[n], p) for n, p in trainable.items())  # theta is back, bit for bit
        if in_place:  # every gradient is in .grad already; the terms come back as values
            assert not any(t.requires_grad for t in terms.losses.values())
            grads = [p.grad for p in trainable.values()]
        else:
            assert all(p.grad is None for p in trainable.values())
            grads = torch.autograd.grad(sum(terms.losses.values()), list(trainable.values()))
        surrogates = {"meta_after", "meta_sharpness"}  # zero-valued: their gradient is what in place adds to .grad
        results.append(({k: v.item() for k, v in terms.losses.items() if k not in surrogates}, terms.logs, grads))
    (functional, logs_f, grads_f), (in_place, logs_i, grads_i) = results
    assert functional == in_place and logs_f == logs_i and logs_f["meta/forget_grad_ratio"] > 0
    assert logs_f["meta/low_rank"] == attacker["low_rank"] if attacker["low_rank"] in (0.0, 1.0) else \
        logs_f["meta/low_rank"] in (0.0, 1.0)  # drawn per attacker: the last one's
    # summed in another order (backward passes into .grad, not tuples added up): float rounding apart
    # summed in another order (backward passes into .grad, not tuples added up), and the sharpness term's
    # finite difference (g(theta + eps g) - g, scaled by 1/eps) taken as two scaled sums: within float32's
    # rounding at that step (meta.fd_step), not bit for bit
    assert all((a - b).norm() <= 1e-4 * a.norm() for a, b in zip(grads_f, grads_i))
    assert any(g.abs().sum() > 0 for g in grads_f)


def _scaled_step(model, data, mode: str, scale: float, **meta):
    """One ESD-u + meta step at the engine's fp16 loss scale `scale`: its terms and its gradient, unscaled."""
    in_place = mode == "in_place"
    for p in model.unet.parameters():
        p.grad = None
    trainable = make_trainable(model.unet, "noxattn")
    method = make_method(MethodConfig(name="esd", esd={"x_t": "noised"}), "")
    method.setup(model, trainable, data)
    config = MetaConfig(enabled=True, in_place=in_place, mode="second_order" if mode == "second_order" else
                        "first_order", **{**dict(
        sharpness_cap=0.0, inner_steps=(2, 2), trajectory="linear", inner_step="adam", low_rank=0.0), **meta})
    terms = make_meta(config, model, trainable, data, method, BATCH)(
        StepContext(0, torch.Generator().manual_seed(7), BATCH, scale))
    if in_place:  # in .grad at the engine's scale, as its own backward passes leave theirs
        return terms, [p.grad / scale for p in trainable.values()]
    return terms, list(torch.autograd.grad(sum(terms.losses.values()), list(trainable.values())))


@pytest.mark.parametrize("mode", ["in_place", "functional", "second_order"])
def test_the_fp16_loss_scale_leaves_every_gradient_as_it_is_and_an_overflow_to_the_scaler(tiny_model, mode):
    """Under fp16 the engine multiplies a loss by the scaler's scale before its backward pass, so its
    activation gradients do not underflow; the simulated attacker's steps and the sharpness term's passes
    backpropagate at that scale too and unscale. A power-of-two scale changes no gradient. A scale that
    overflows leaves non-finite gradients (the scaler's cue to skip the step and back off) and finite loss
    values (a NaN value would stop the run)."""
    data = concept_data(tiny_model)
    inner = {"inner_step": "sgd", "inner_lr": 1e-3} if mode == "second_order" else {}  # adam: a flat derivative
    plain_terms, plain = _scaled_step(tiny_model, data, mode, 1.0, **inner)
    terms, scaled = _scaled_step(tiny_model, data, mode, 2.0 ** 12, **inner)
    assert {k: v.item() for k, v in terms.losses.items()} == {k: v.item() for k, v in plain_terms.losses.items()}
    assert terms.logs["meta/forget_grad_ratio"] == plain_terms.logs["meta/forget_grad_ratio"] > 0
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(scaled, plain))
    assert "meta_after" in terms.losses  # in place too: the step has a term, whatever the method returns
    # float32 overflows only near 3e38 (fp16 at 65504), where the sharpness term's own multiplier would too;
    # second order's small SGD steps stay finite there, so its attack is made to blow up as an overflow would
    blow_up = {**inner, "inner_lr": 1e38} if mode == "second_order" else inner
    terms, overflowed = _scaled_step(tiny_model, data, mode, 3e38, forget_sharpness=0.0, **blow_up)
    assert all(math.isfinite(v.item()) for v in terms.losses.values())
    assert not all(torch.isfinite(g).all() for g in overflowed)


def test_in_place_the_sharpness_term_alone_is_a_term_too(tiny_model):
    trainable = subset(tiny_model)
    meta = objective(tiny_model, trainable, concept_data(tiny_model), in_place=True, forget_after=0.0,
                     related_after=0.0, forget_sharpness=1.0, sharpness_cap=0.0)
    terms = meta(StepContext(0, torch.Generator().manual_seed(7), BATCH))
    assert terms.losses["meta_after"].item() == 0.0 and not terms.losses["meta_after"].requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_a_meta_step_in_place_with_no_other_term_still_trains(tiny_model, tmp_path):
    """method 'none' on a forget-only study: in place every meta gradient is in .grad before the engine
    sees the terms, and the step must still count as one with something to train."""
    config = StudyConfig.from_dict({"model": {"source": "unused", "device": "cpu"},
                                    "concepts": {"forget": {"prompts": [FORGET]}},
                                    "method": {"name": "none", "steps": 2, "lr": 1e-3, "batch_size": BATCH,
                                               "checkpoint_every": 50, "preservation_weight": 0.0},
                                    "meta": {"enabled": True}})
    data = concept_data(tiny_model)
    data = type(data)(data.forget, None, None, data.split)
    before = weights(tiny_model.unet)
    run(config, tiny_model, data, tmp_path / "out")
    after = weights(tiny_model.unet)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    records = [r for r in log_records(tmp_path / "out") if "step" in r]
    assert records and all("meta_after" in r for r in records)


def test_gradient_checkpointing_leaves_the_in_place_meta_step_unchanged(tiny_model):
    """method.gradient_checkpointing recomputes activations in the backward pass from the UNet's own
    weights: with the in-place simulated attack its gradients are those of a step without it."""
    data = concept_data(tiny_model)
    out = []
    for checkpointing in (False, True):
        trainable = make_trainable(tiny_model.unet, "noxattn")
        if checkpointing:
            tiny_model.unet.enable_gradient_checkpointing()
        tiny_model.unet.train()
        method = make_method(MethodConfig(name="esd", esd={"x_t": "noised"}), "")
        method.setup(tiny_model, trainable, data)
        meta = MetaObjective(MetaConfig(enabled=True, inner_steps=(2, 2), low_rank=0.0), tiny_model, trainable,
                             data, method, BATCH)
        for p in trainable.values():
            p.grad = None
        meta(StepContext(0, torch.Generator().manual_seed(3), BATCH))
        out.append([p.grad for p in trainable.values()])  # in place: all of it in .grad
    tiny_model.unet.disable_gradient_checkpointing()
    tiny_model.unet.eval()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*out))
    with pytest.raises(Exception, match="gradient_checkpointing works with first-order meta in place only"):
        StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}}, "method": {"gradient_checkpointing": True},
                               "meta": {"enabled": True, "mode": "second_order"}})
    # a study's meta variant turns meta on by itself (`run`, `durability`, `select`): refused there too
    for meta in ({"mode": "second_order"}, {"in_place": False}):
        with pytest.raises(Exception, match="gradient_checkpointing works with first-order meta in place only"):
            StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}},
                                   "method": {"gradient_checkpointing": True}, "meta": meta})
    StudyConfig.from_dict({"concepts": {"forget": {"prompts": ["x"]}}, "variants": ["base"],
                           "method": {"gradient_checkpointing": True}, "meta": {"mode": "second_order"}})


def test_a_lora_like_adam_attacker_stays_finite_under_fp16_autocast(tiny_model):
    """The engine used to compute every objective inside its autocast (now the UNet's forward passes only,
    precision.py; this guards an objective called under anyone's autocast). Under fp16 the LoRA-like attacker's G A^T
    came out in fp16, underflowed, and its Adam-like step 0 / (0 + eps) was NaN: every fp16 step of an SD-1.4
    run with that attacker overflowed (bench/RESULTS.md, 'A fourth lease'). The tiny UNet under CPU fp16
    autocast reproduces it (in place, the default; test_simulated checks both paths' directions)."""
    with torch.autocast("cpu", dtype=torch.float16):
        terms, grads = _scaled_step(tiny_model, concept_data(tiny_model), "in_place", 2.0 ** 12, low_rank=1.0,
                                    inner_steps=(1, 1), trajectory="last")
    assert all(math.isfinite(v.item()) for v in terms.losses.values())
    assert all(math.isfinite(v) for v in terms.logs.values())
    assert all(torch.isfinite(g).all() for g in grads)
