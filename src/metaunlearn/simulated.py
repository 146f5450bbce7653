"""The attacker the meta objective simulates: drawn afresh at every outer step
from a family (step size, number of steps, update form, full or low-rank), so
the defence is not fitted to one finetuning recipe.

Update forms: `sgd` (the paper); `normalized` (a step of length tau whatever
the gradient's size, so the model cannot fool the simulation by inflating its
forget gradient, which a fixed-size SGD step rewards); `adam` (the first step
of Adam, g / (|g| + eps): what a real attacker's optimizer does first); `rms`
(the gradient's direction, as SGD with momentum follows it, at the size of an
Adam step of the same lr: g / rms(g), every coordinate moving tau on average).
One lr range then means the same displacement for every form. A plain `sgd`
step at an Adam-like lr barely moves the model (|g| is about 1 on the digits
world's 0.8M trained weights, an Adam step tau sqrt(0.8M)), while a real SGD
attacker (lr 1e-2, momentum 0.9) moves it as far as Adam at 1e-4 does.

`adam_warm` is the step of an Adam that has been running: its moments m and v
carried across outer steps (every simulated attacker's gradients feed them,
whatever its form), so the step is m_hat / (sqrt(v_hat) + eps) as a real
attacker's AdamW takes it after its first steps. The first step of Adam
(`adam`) moves every coordinate by tau, most of them along mini-batch noise;
a running Adam moves the coordinates whose forget gradient is consistent and
hardly those where it is noise: where a real attacker goes. First order in
place only (its moments are updated tensor by tensor as the backward pass
completes each gradient).

Low rank: a LoRA attacker's adapter W + B A starts at B = 0 with A random, so
its first steps move W by (step in B) A, where B's gradient is G A^T: a rank-r
update of the adapted projections (attention q, k, v, out) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MetaConfig

ADAM_EPS = 1e-8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # peft's usual attention targets (our LoRA attack's default)


@dataclass
class Attacker:
    lr: float
    steps: int
    form: str
    low_rank: bool


def draw(config: MetaConfig, generator: torch.Generator) -> Attacker:
    """This outer step's attacker. Only ranges and lists draw from the generator,
    so a fixed attacker leaves the step's randomness as it was."""
    ranged = isinstance(config.inner_lr, tuple) or isinstance(config.low_rank_lr, tuple)
    u = float(torch.rand((), generator=generator)) if ranged else None
    steps = config.inner_steps
    if isinstance(steps, tuple):
        steps = int(torch.randint(steps[0], steps[1] + 1, (1,), generator=generator))
    form = config.inner_step
    if isinstance(form, list):
        form = form[int(torch.randint(0, len(form), (1,), generator=generator))]
    low_rank = config.low_rank > 0 and float(torch.rand((), generator=generator)) < config.low_rank
    lr = config.low_rank_lr if low_rank and config.low_rank_lr is not None else config.inner_lr
    if isinstance(lr, tuple):  # the same draw u places the lr in whichever range applies
        lr = math.exp(math.log(lr[0]) + u * (math.log(lr[1]) - math.log(lr[0])))
    return Attacker(lr, steps, form, low_rank)


WHOLE = ("normalized", "rms")  # forms that scale by the whole gradient's norm: never streamed tensor by tensor


def inner_direction(grads: list[torch.Tensor], form: str, in_place: bool = False) -> list[torch.Tensor]:
    """The update direction of one simulated attacker step (`in_place`: computed in the gradients'
    own memory, when nothing needs them afterwards)."""
    if form == "sgd":
        return grads
    if form in WHOLE:  # unit norm, or unit root-mean-square over every coordinate
        norm = torch.sqrt(sum((g * g).sum() for g in grads) + 1e-20)
        if form == "rms":
            norm = norm / math.sqrt(sum(g.numel() for g in grads))
        return [g.div_(norm) for g in grads] if in_place else [g / norm for g in grads]
    if form == "adam":
        if in_place:
            return [g.div_(g.abs().add_(ADAM_EPS)) for g in grads]
        return [g / (g.abs() + ADAM_EPS) for g in grads]
    raise ValueError(f"unknown inner step form '{form}'")


def trajectory_weights(steps: int, how: str) -> list[float]:
    """Weight of the post-attack terms after each inner step: the last only, or growing toward the end."""
    if how == "last":
        return [0.0] * (steps - 1) + [1.0]
    total = steps * (steps + 1) / 2
    return [(k + 1) / total for k in range(steps)]


def is_lora_target(name: str, param: torch.Tensor) -> bool:
    """Whether a LoRA attacker (peft's usual attention targets) adapts this UNet weight."""
    return param.dim() >= 2 and name.rsplit(".", 1)[0].endswith(LORA_TARGETS)


class LowRank:
    """Rank-r directions for the LoRA-adaptable tensors among `names` (zero for the rest)."""

    def __init__(self, names: list[str], params: list[torch.Tensor], rank: int):
        self.rank = rank
        self.targets = [is_lora_target(n, p) for n, p in zip(names, params)]
        self.shapes = [p.shape for p in params]

    def draw(self, generator: torch.Generator, device) -> list[torch.Tensor | None]:
        """This step's A of every target: (rank, fan-in), N(0, 1/rank^2) as peft's 'gaussian' init."""
        return [torch.randn(self.rank, math.prod(shape[1:]), generator=generator).div(self.rank).to(device)
                if target else None for target, shape in zip(self.targets, self.shapes)]

    def direction(self, grads: list[torch.Tensor], form: str, a: list[torch.Tensor | None]) -> list[torch.Tensor]:
        b_grads = [_b_grad(g, m) for g, m in zip(grads, a)]
        steps = iter(inner_direction([b for b in b_grads if b is not None], form))
        return [_expand(next(steps), g, m) if m is not None else torch.zeros_like(g) for g, m in zip(grads, a)]

    @staticmethod
    def direction_of(grad: torch.Tensor, form: str, m: torch.Tensor | None) -> torch.Tensor | None:
        """One tensor's direction (None: not adapted, it does not move); `form` acting per tensor."""
        return None if m is None else _expand(inner_direction([_b_grad(grad, m)], form)[0], grad, m)


def _b_grad(grad: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of the adapter's B (at B = 0) for a weight gradient G: G A^T."""
    if m is None:
        return None
    with _in_gradient_dtype(grad):
        return grad.reshape(grad.shape[0], -1) @ m.T.to(grad.dtype)


def _expand(b_step: torch.Tensor, grad: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What a step of B moves the weight by: (step of B) A, in the weight's shape."""
    with _in_gradient_dtype(grad):
        return (b_step @ m.to(grad.dtype)).reshape(grad.shape)


def _in_gradient_dtype(grad: torch.Tensor):
    """No autocast, whatever the caller's (the engine's once covered every objective; it now covers the
    UNet's forward passes only, precision.py): under fp16 autocast these products came out in fp16. An
    unscaled gradient's G A^T then underflows to 0 and the Adam-like form's 0 / (0 + eps), eps rounded to 0
    in fp16, is NaN: every fp16 step with a LoRA-like Adam attacker overflowed (SD-1.4, H100:
    bench/RESULTS.md, 'A fourth lease')."""
    return torch.autocast(grad.device.type, enabled=False)


FORMS = ("sgd", "normalized", "adam", "rms", "adam_warm")  # append only: checkpoints store the index
WARM_BETAS = (0.9, 0.999)  # AdamW's defaults, which finetuning scripts keep


class WarmAdam:
    """The moments of the simulated attacker's running Adam (form `adam_warm`), one pair per attacked
    tensor, in float32 whatever the weights' dtype, and the number of gradients each was fed (its bias
    correction's t). Every forget gradient the simulated attackers compute feeds them, once per inner step,
    so they follow theta as the outer optimizer moves it, as a real attacker's moments follow its weights."""

    def __init__(self):
        self.t: dict[int, int] = {}
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def feed(self, i: int, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        b1, b2 = WARM_BETAS
        if i not in self.m:
            self.m[i], self.v[i], self.t[i] = torch.zeros_like(g), torch.zeros_like(g), 0
        # an element an fp16 overflow made non-finite keeps its moments (checked on the device: no sync; its
        # count still moves on, a slight under-correction of that element's bias)
        finite = torch.isfinite(g)
        self.m[i].lerp_(torch.where(finite, g, self.m[i]), 1 - b1)  # b1 m + (1 - b1) g, as torch's Adam
        self.v[i].lerp_(torch.where(finite, g * g, self.v[i]), 1 - b2)
        self.t[i] += 1

    @torch.no_grad()
    def direction(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Tensor i's step direction, m_hat / (sqrt(v_hat) + eps), in `like`'s dtype."""
        b1, b2 = WARM_BETAS
        m_hat = self.m[i] / (1 - b1 ** self.t[i])
        v_hat = self.v[i] / (1 - b2 ** self.t[i])
        return (m_hat / (v_hat.sqrt_().add_(ADAM_EPS))).to(like.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"t.{i}": torch.tensor(t) for i, t in self.t.items()}
        state.update({f"m.{i}": m for i, m in self.m.items()})
        state.update({f"v.{i}": v for i, v in self.v.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], like: list[torch.Tensor]) -> None:
        fed = [i for i in range(len(like)) if f"t.{i}" in state]
        self.t = {i: int(state[f"t.{i}"]) for i in fed}
        self.m = {i: state[f"m.{i}"].to(like[i].device, torch.float32) for i in fed}
        self.v = {i: state[f"v.{i}"].to(like[i].device, torch.float32) for i in fed}


@dataclass
class Episode:
    """A persistent simulated attacker (meta.persistent = R): the attacker drawn at the episode's start
    (with its LoRA-like A) keeps its displacement delta between outer steps, so the k-th outer step of the
    episode attacks from theta + delta, k x inner_steps steps deep in all, as a real attacker's k-th
    steps start from where its earlier ones left it. delta is relative to theta, which the outer
    optimizer moves meanwhile (as persistent adversaries in adversarial training are). Resets after R."""

    length: int
    attacker: Attacker | None = None
    a: list[torch.Tensor | None] | None = None
    depth: int = 0  # outer steps done in this episode; 0: the next one starts a new attacker at theta
    delta: list[torch.Tensor] | None = None

    @property
    def offset(self) -> list[torch.Tensor] | None:
        """What to add to theta where this outer step's attack starts (None: theta itself)."""
        return self.delta if self.depth > 0 else None

    @torch.no_grad()
    def advance(self, theta: list[torch.Tensor], end: list[torch.Tensor]) -> None:
        """After an outer step's attack from theta (+ offset) to `end`: keep end - theta, or end the episode
        (after R steps, or when the attack overflowed under fp16: its displacement would spoil every later
        step of the episode, and the checkpoints)."""
        self.depth += 1
        if self.depth >= self.length:
            self.depth = 0
            return
        if self.delta is None:
            self.delta = [torch.empty_like(p) for p in theta]
        for d, p, e in zip(self.delta, theta, end):
            d.copy_(e.detach()).sub_(p.detach())
        if not all(torch.isfinite(d).all() for d in self.delta):
            self.depth = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.depth == 0:  # the next step draws afresh: nothing to carry
            return {"depth": torch.tensor(0)}
        at = self.attacker
        state = {"depth": torch.tensor(self.depth), "lr": torch.tensor(at.lr, dtype=torch.float64),
                 "steps": torch.tensor(at.steps), "form": torch.tensor(FORMS.index(at.form)),
                 "low_rank": torch.tensor(int(at.low_rank))}
        state.update({f"delta.{i}": d for i, d in enumerate(self.delta)})
        state.update({f"a.{i}": m for i, m in enumerate(self.a or []) if m is not None})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], like: list[torch.Tensor]) -> None:
        """Back to a checkpointed episode; `like`: the trained tensors (device and dtype of delta)."""
        self.depth = int(state.get("depth", torch.tensor(0)))
        if self.depth == 0:
            return
        self.attacker = Attacker(float(state["lr"]), int(state["steps"]), FORMS[int(state["form"])],
                                 bool(state["low_rank"]))
        self.delta = [state[f"delta.{i}"].to(p.device, p.dtype) for i, p in enumerate(like)]
        self.a = [state[f"a.{i}"].to(like[i].device) if f"a.{i}" in state else None for i in range(len(like))] \
            if self.attacker.low_rank else None
