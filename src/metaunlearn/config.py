"""The study configuration: one YAML file, typed, unknown keys rejected.

`load_config` reads a study file, applies `dotted.key=value` overrides and turns
every validation failure into a one-line `ConfigError` naming the offending key.
Relative paths (model.source, concepts.*.images, output.dir) are relative to the
working directory, not to the YAML file.

Sections that pick a plugin (the method, each attack, the metrics, a built-in
world) are `PluginSection`s: a selector field names registered plugins and each
plugin's own settings sit under its name (`method: {name: esd, esd: {eta: 3}}`),
validated by the class the plugin registered. Settings of plugins that are not
selected may stay in the file (`--set method.name=sdd` keeps `method.esd`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError
from .registry import ATTACKS, DETECTORS, METHODS, METRICS, WORLDS, Options, Registry
from .schema_paths import apply_override, describe_error, is_container

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names become folder names in the run directory
_DEFAULT_EVAL_AT = [0, 10, 25, 50, 100, 200]
ROLES = ("forget", "related", "unrelated")


class _Section(Options):
    @model_validator(mode="before")
    @classmethod
    def _blank_means_default(cls, data: Any) -> Any:
        # `meta:` with every child commented out loads as None; for a section or a
        # list that can only mean "the default" (a blank scalar stays an error).
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and is_container(fields[k].annotation))}


class PluginSection(_Section):
    """A section whose `selector` field names plugins of `registry`; each plugin's
    settings live under its own name and are validated by its options class."""

    model_config = ConfigDict(extra="allow")
    registry: ClassVar[Registry]
    selector: ClassVar[str]
    open_selector: ClassVar[bool] = False  # values that name no plugin are allowed (model.source: a path)
    special: ClassVar[tuple[str, ...]] = ()  # selector values that are not plugins ('auto')

    @model_validator(mode="wrap")
    @classmethod
    def _plugin_options(cls, data: Any, handler):
        if not isinstance(data, dict):
            return handler(data)
        data, names = dict(data), cls.registry.names()
        options = {k: data.pop(k) for k in list(data) if k in names and k not in cls.model_fields}
        unknown = [k for k in data if k not in cls.model_fields]
        if unknown:
            raise _error("extra_forbidden", (unknown[0],), data[unknown[0]])
        section = handler(data)
        for name in section.selected():
            if name not in names and name not in cls.special and not cls.open_selector:
                choices = ", ".join([*cls.special, *names])
                raise _error("value_error", (cls.selector,), name,
                             f"'{name}' is not a registered {cls.registry.kind}; choose one of: {choices}")
        for name in [*section.selected(), *options]:
            if name in names:
                try:
                    value = cls.registry.get(name).options.model_validate(options.get(name) or {})
                except ValidationError as err:
                    raise ValidationError.from_exception_data(err.title, [_moved(e, name) for e in err.errors()])
                section.__pydantic_extra__[name] = value
        return section

    def selected(self) -> list[str]:
        value = getattr(self, self.selector)
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def options(self, name: Optional[str] = None) -> Options:
        """The settings of plugin `name` (default: the selected one): as given, else its defaults."""
        name = name or self.selected()[0]
        given = self.__pydantic_extra__.get(name)
        return given if given is not None else self.registry.get(name).options.model_validate({})


def _moved(err: dict, prefix: str) -> InitErrorDetails:
    detail: dict = {"type": err["type"], "loc": (prefix, *err["loc"]), "input": err.get("input")}
    if err["type"] == "value_error":  # its text comes from our validators: keep it
        detail["type"] = PydanticCustomError("value_error", err["msg"].removeprefix("Value error, "))
    elif err.get("ctx"):
        detail["ctx"] = err["ctx"]
    return detail


def _error(kind: str, loc: tuple, value: Any, message: str = "") -> ValidationError:
    error_type = PydanticCustomError("value_error", message) if message else kind
    return ValidationError.from_exception_data("StudyConfig", [{"type": error_type, "loc": loc, "input": value}])


class ModelConfig(PluginSection):
    registry: ClassVar[Registry] = WORLDS
    selector: ClassVar[str] = "source"
    open_selector: ClassVar[bool] = True

    source: str = Field("digits", description=(
        "A built-in world ('digits'), else a local diffusers pipeline folder or a hub id."))
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description=(
        "Dtype of the loaded weights, which training updates in that dtype: float32 with `mixed_precision` is the "
        "way to train in half precision. float16 weights sample but are not trained (AdamW's eps underflows), and "
        "bfloat16 weights lose updates below their resolution (an attack at lr 1e-5 moves most weights by less), "
        "so an attack on them understates relearning."))
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    device: str = Field("auto", description="'auto' (CUDA if available, else CPU) or a torch device ('cuda:1').")

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, value: str) -> str:
        import torch  # what torch accepts as a name; whether this machine has it is checked at load time

        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError(f"'{value}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class RoleConfig(_Section):
    prompts: list[str] = Field([], description="Prompts; for generated data the model draws images of each.")
    classes: list[str] = Field([], description=(
        "Built-in worlds only: classes of the world's own dataset (digits world: zero..nine or 0..9)."))
    images: Optional[str] = Field(None, description=(
        "Path of a Hugging Face imagefolder (images + metadata.jsonl with a text column) for this role."))
    prompt_file: Optional[str] = Field(None, description=(
        "A prompt file (CSV with a 'prompt' column in the ESD/I2P layout, or one prompt per line) whose "
        "prompts join `prompts`; the file is read when the study runs, and results depend on its content."))

    @field_validator("classes", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return [str(v).strip() for v in value] if isinstance(value, list) else value

    def given(self) -> bool:
        return bool(self.prompts or self.classes or self.images or self.prompt_file)

    def generated(self) -> bool:
        """Whether its images are drawn by the model from its prompts (no classes or image folder)."""
        return bool(self.prompts or self.prompt_file) and not (self.classes or self.images)

    def entries(self) -> list:
        """`prompts`, then the prompt file's entries (with their seeds and columns), as PromptEntry."""
        from .prompt_files import PromptEntry, read_prompt_file

        return [PromptEntry(p) for p in self.prompts] + (read_prompt_file(self.prompt_file) if self.prompt_file else [])

    def all_prompts(self) -> list[str]:
        """`prompts` and the prompt file's, without repeats."""
        return list(dict.fromkeys(e.prompt for e in self.entries()))


class ConceptsConfig(_Section):
    forget: RoleConfig = Field(default_factory=RoleConfig, validate_default=True,
                               description="The concept to remove (the paper's hrm data).")
    related: RoleConfig = Field(default_factory=RoleConfig, description=(
        "Benign concepts close to the forget concept: kept intact, made to self-destruct under relearning (tgt)."))
    unrelated: RoleConfig = Field(default_factory=RoleConfig,
                                  description="Benign concepts far from the forget concept, kept intact (irt).")
    guide: str = Field("", description="The concept the forget concept is mapped to; '' is the empty prompt.")

    @field_validator("forget")
    @classmethod
    def _forget_given(cls, value: RoleConfig) -> RoleConfig:
        if not value.given():
            raise ValueError("has no prompts, classes or images; name the concept to unlearn")
        return value


class DataConfig(_Section):
    images_per_prompt: int = Field(8, gt=0, description=(
        "Generated roles: N train, N test and N attack images per prompt."))
    generation_steps: int = Field(25, gt=0, description="Sampling steps when generating role data.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance when generating role data.")
    batch_size: int = Field(32, gt=0, description="Batch size for generating and encoding role data.")


class OptimizerSettings(_Section):
    """What the training engine needs to make an optimizer step; shared by
    unlearning and attacks (which override the defaults)."""

    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adafactor"] = Field("adamw", description=(
        "AdamW; Adam (weight decay added to the gradient, L2, not decoupled); SGD with momentum; RMSprop "
        "(torch's defaults: smoothing 0.99, no momentum); or Adafactor (factored second moments, no first "
        "moment: almost no optimizer state, for large models in little memory; torch's Adafactor steps lr x "
        "each tensor's RMS, so its lr is relative and is not AdamW's: tune it anew). Attackers may use any."))
    lr: float = Field(1e-5, gt=0, le=1e4, description="Learning rate (at most 1e4: beyond, float32 updates overflow).")
    weight_decay: float = Field(0.0, ge=0, description=(
        "Weight decay (decoupled for AdamW; an L2 term in the gradient for Adam, SGD and RMSprop)."))
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer 'sgd').")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps.")
    steps: int = Field(200, gt=0, description="Optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Batch size of every loss term.")


class _MethodChoice(PluginSection):
    registry: ClassVar[Registry] = METHODS
    selector: ClassVar[str] = "name"

    name: str = Field("esd", description="Base method (registered: esd, sdd, none, ...); 'none': meta only.")
    params: Literal["auto", "noxattn", "xattn", "full", "selfattn"] = Field("auto", description=(
        "Trained UNet weights: all but cross-attention (ESD-u), cross-attention (ESD-x), all, self-attention; "
        "'auto': the method's choice (ESD, SDD, none: noxattn; UCE, RECE: full, for their meta stage)."))


class MethodConfig(OptimizerSettings, _MethodChoice):  # this order lists name and params first
    model_config = ConfigDict(extra="allow")  # PluginSection's, over OptimizerSettings' "forbid"

    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every this many steps.")
    gradient_checkpointing: bool = Field(False, description=(
        "diffusers' gradient checkpointing of the UNet: activations recomputed in the backward pass instead "
        "of kept (less memory, about a third more time). Needs meta.in_place with first-order meta, and no "
        "second-order meta."))
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Precision of the frozen copy of the original weights (ESD's teacher, the meta objective's distillation "
        "target): bfloat16 or float16 halve it; each layer's weights are cast up only while it runs, so the "
        "teacher is the original model with its weights rounded to that precision."))
    log_every: int = Field(1, gt=0, description="Log losses every this many steps.")
    preservation_weight: float = Field(1.0, ge=0, description=(
        "Weight of the denoising loss on related + unrelated data that keeps them intact; 0 disables it."))


InnerStep = Literal["sgd", "normalized", "adam", "rms", "adam_warm"]


class MetaConfig(_Section):
    enabled: bool = Field(False, description="Add the meta objective to the base method's loss.")
    mode: Literal["first_order", "second_order"] = Field("first_order", description=(
        "'first_order': gradients at θ' added to θ's (reference code); "
        "'second_order': differentiate through the inner steps."))
    # The simulated attacker, drawn afresh at every outer step from a family (defaults: bench/RESULTS.md, issue 10).
    inner_lr: Union[float, tuple[float, float]] = Field((1e-5, 1e-3), description=(
        "Step size τ of the simulated attack, or [low, high] to draw it log-uniformly at every outer step "
        "(an attacker whose lr is unknown)."))
    inner_steps: Union[int, tuple[int, int]] = Field((1, 2), description=(
        "Steps M of the simulated attack, or [low, high] to draw M uniformly at every outer step."))
    inner_step: Union[InnerStep, list[InnerStep]] = Field(
        ["sgd", "adam"], description=(
            "Inner update: plain gradient step, gradient scaled to unit norm, an Adam-like step (Adam's first), "
            "the gradient's direction at an Adam step's size ('rms'), or the step of an Adam that has been "
            "running ('adam_warm': its moments carried across outer steps; first order in place only, two "
            "float32 copies of the attacked weights); a list: each outer step draws one."))
    inner_batch: Optional[int] = Field(None, gt=0, description=(
        "Forget images per simulated attacker step (None: method.batch_size). A larger batch follows the "
        "cleaner gradient a large-batch finetuner follows (bench/RESULTS.md, issue 10)."))
    attacked: Literal["trained", "all"] = Field("trained", description=(
        "Which weights the simulated attacker moves: the 'trained' ones (the reference code), or 'all' UNet "
        "weights, as a real finetuner does, also those the base method leaves frozen (ESD-u's cross-attention, "
        "the text pathway a LoRA attacker adapts). The meta gradients reach the trained weights only, either "
        "way. 'all' resisted less on the digits world (the eight, one seed: bench/RESULTS.md, issue 10)."))
    low_rank: float = Field(0.5, ge=0, le=1, description=(
        "Probability that an outer step simulates a LoRA attacker: a rank-`low_rank_rank` update of the "
        "attention projections only (what a LoRA adapter's first steps change), instead of a full update."))
    low_rank_rank: int = Field(4, gt=0, description="Rank of the simulated LoRA attacker.")
    low_rank_lr: Union[None, float, tuple[float, float]] = Field(None, description=(
        "Step size of the simulated LoRA attacker (a value or [low, high], as inner_lr; None: inner_lr). A "
        "LoRA adapter's lr moves W by about lr x sqrt(r) x |A| per step, a fraction of a full finetune's lr, so "
        "LoRA attackers run at higher lrs."))
    trajectory: Literal["last", "linear"] = Field("last", description=(
        "Where the post-attack terms are taken: after the last inner step, or after every inner step with "
        "weights growing linearly toward the end (losses along the trajectory)."))
    target: Literal["raw", "unlearn_target", "capped"] = Field("capped", description=(
        "Post-attack forget term: 'raw' ascends the denoising loss (the paper, unbounded); 'unlearn_target' "
        "regresses to the base method's target instead; 'capped' stops ascending past `cap`."))
    cap: float = Field(4.0, gt=0, description=(
        "With target 'capped': an ascent term stops (no gradient) once the post-attack loss exceeds cap x the "
        "denoising loss on that role of the model training starts from (the original; a closed-form method's "
        "edit), measured at setup; so it means the same at every scale."))
    retain: Literal["denoise", "distill"] = Field("distill", description=(
        "How the terms that keep related and unrelated concepts intact measure them: their denoising loss, or "
        "the distance to the original model's predictions on the same noised images (distillation)."))
    in_place: bool = Field(True, description=(
        "First order: the simulated attack steps the UNet's own trained weights in place and puts them back "
        "exactly from one buffer afterwards, instead of running the UNet functionally on new copies (one "
        "full copy of the trained weights less, and gradient checkpointing works). Same results."))
    forget_after: float = Field(3.0, description=(
        "a (reference flag gamma2_1): weight of −L(θ'; forget). 3, not the paper's 1: the optimizer normalises "
        "the whole step, and at 1 the post-attack ascent was too small a share of it (bench/RESULTS.md, issue 10)."))
    related_after: float = Field(1.0, description="b (gamma2_2): weight of −L(θ'; related), the self-destruct term.")
    related_before: float = Field(1.0, description="c (gamma1_2): weight of +L(θ; related) before the attack.")
    unrelated_before: float = Field(1.0, description="d (gamma1_1): weight of +L(θ; unrelated) before the attack.")
    unrelated_after: float = Field(0.0, description="e (gamma2_3): weight of −L(θ'; unrelated), reference code.")
    forget_sharpness: float = Field(1.0, ge=0, description=(
        "Weight of max(0, r² − sharpness_cap²), r = ||∇L(θ; forget)|| over the starting model's (measured at "
        "setup, as `cap`): the term of the paper's first-order analysis that first-order meta drops. It keeps "
        "the forget loss a plateau, not a cliff: finetuning steps on the concept stay small instead of wrecking "
        "the model (one extra forward/backward)."))
    sharpness_cap: float = Field(4.0, ge=0, description="The gradient-norm ratio r allowed before the penalty acts.")
    fd_step: float = Field(1e-4, gt=0, le=1e-2, description=(
        "The sharpness term's finite-difference step along the forget gradient, relative to the weights' norm. "
        "On the digits world 1e-4 is best under bf16/fp16 autocast (1e-5 is rounding-bound there; in fp32 it is "
        "ten times better); on SD-1.4's architecture with random weights 1e-5 was 7-10x more accurate in every "
        "precision (bench/RESULTS.md, 'On a GPU')."))
    unrelated_kept: float = Field(1.0, ge=0, description=(
        "Weight of +L(θ'; unrelated) (by `retain`): unrelated concepts stay intact after the simulated attack, "
        "so the self-destruct stays on related ones."))

    salient: Optional[float] = Field(None, gt=0, le=1, description=(
        "Fraction of the trained weights' elements the post-attack terms reach (null: all): those with the "
        "highest ratio of the forget concept's diagonal Fisher information to the unrelated concepts' at the "
        "starting weights (saliency.py), so the sharpened forget loss lives in weights the unrelated concepts "
        "barely use. The base method's loss and the keeping terms before the attack train every weight. Needs "
        "concepts.unrelated; costs a boolean mask and, in place, one copy of the gradients (building the masks "
        "briefly holds two float32 Fisher buffers the size of the trained weights)."))
    salient_lora_targets: bool = Field(False, description=(
        "With `salient`: the masks also hold every element of the attention projections a LoRA attacker "
        "adapts (to_q, to_k, to_v, to_out.0), whatever their saliency."))
    attackers_per_step: int = Field(1, ge=1, le=16, description=(
        "Simulated attackers per outer step, each drawn from the family on its own forget batch; their "
        "post-attack terms are averaged (ResAlign draws 3 per step). Each one more costs an attack: its inner "
        "steps and post-attack terms (second order also keeps its graph until the step's backward pass). The "
        "logged per-attack values (meta/forget_before, meta/*_after, meta/inner_lr, ...) are the last "
        "attacker's, meta/after_objective the mean. Not with `persistent`, whose episode follows one attacker."))
    params: Optional[Literal["noxattn", "xattn", "full", "selfattn"]] = Field(None, description=(
        "The UNet weights the meta terms and preservation train (null: the method's own, `method.params`). A wider "
        "selection than the method's (ESD-u's noxattn with 'full') lets the meta objective shape the weights the "
        "base method's loss never moves, e.g. the cross-attention a LoRA attacker adapts, while the method's own "
        "loss still reaches only its weights. Must contain the method's selection."))
    persistent: int = Field(0, ge=0, description=(
        "Episode length R of a persistent simulated attacker; 0: every outer step attacks from theta afresh. "
        "On, the attacker drawn at an episode's start keeps its displacement between outer steps: each outer "
        "step continues the attack from where the last one left it (relative to the current theta) by its "
        "inner steps, for R outer steps, then a new attacker starts from theta. The simulated attack so "
        "reaches R x inner_steps steps deep at the cost of inner_steps per outer step, and the post-attack "
        "terms cover every depth on the way. Costs one copy of the trained weights; checkpointed. One process only."))

    @field_validator("inner_lr", "inner_steps", "low_rank_lr")
    @classmethod
    def _positive_or_range(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, tuple) and not (all(map(math.isfinite, value)) and 0 < value[0] <= value[1]):
            raise ValueError(f"must be a positive number or [low, high] with 0 < low <= high, got {list(value)}")
        if not isinstance(value, tuple) and not value > 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    @field_validator("inner_step")
    @classmethod
    def _some_form(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("is an empty list; name at least one update form")
        return value

    @property
    def forms(self) -> list[str]:
        """The simulated attacker's update forms (inner_step as a list)."""
        return list(self.inner_step) if isinstance(self.inner_step, list) else [self.inner_step]

    @model_validator(mode="after")
    def _warm_adam_in_place(self) -> MetaConfig:
        if "adam_warm" in self.forms and not (self.mode == "first_order" and self.in_place):
            raise ValueError("inner_step 'adam_warm' updates its moments as the backward pass completes each "
                             "gradient: it needs mode first_order with in_place true")
        return self

    @model_validator(mode="after")
    def _one_attacker_per_episode(self) -> MetaConfig:
        if self.persistent and self.attackers_per_step > 1:
            raise ValueError(f"attackers_per_step {self.attackers_per_step} with persistent {self.persistent}: a "
                             "persistent episode follows one attacker; set one of them back (1, 0)")
        return self


class _AttackChoice(PluginSection):
    registry: ClassVar[Registry] = ATTACKS
    selector: ClassVar[str] = "kind"

    name: str = Field(pattern=NAME_PATTERN, description="Unique name; the attack's folder in the run directory.")
    kind: str = Field("full", description="Registered attack kind: 'full' (every UNet weight), 'lora' (peft), ...")
    data: Union[Literal["forget", "related", "unrelated"], RoleConfig] = Field("forget", description=(
        "What the attacker finetunes on: a role's held-out attack-split images ('forget' relearns the concept; "
        "'unrelated' is a benign finetune, the paper's CLEAN setting), or a concept of its own (prompts, "
        "classes or images, as a role is given), e.g. a new concept an honest user teaches the model."))


class AttackConfig(OptimizerSettings, _AttackChoice):  # this order lists name, kind and data first
    model_config = ConfigDict(extra="allow")  # PluginSection's, over OptimizerSettings' "forbid"

    lr: float = Field(1e-4, gt=0, le=1e4, description="Attacker's learning rate (at most 1e4).")
    weight_decay: float = Field(1e-2, ge=0, description=(
        "Attacker's weight decay (AdamW's default; an L2 term in the gradient for Adam, SGD and RMSprop)."))
    grad_clip: float = Field(0.0, ge=0, description="Attacker's max gradient norm; 0: no clipping.")
    eval_at: list[int] = Field(_DEFAULT_EVAL_AT, description=(
        "Steps at which the attacked model is evaluated (0 = before the attack)."))
    seeds: Optional[list[int]] = Field(None, min_length=1, description=(
        "Attack seeds; None = one attack per unlearned model with its unlearning seed (the original model: "
        "the study's first seed)."))
    save_final: bool = Field(False, description=(
        "Also save the attacked weights (full: a pipeline folder; lora: the adapter). Off: curves only."))

    def curve_settings(self) -> dict:
        """The settings one attack seed's curve depends on: all but the list of seeds (each curve is one seed's,
        which its fingerprint holds), so adding a seed to an attack leaves the curves already made valid."""
        dumped = self.model_dump(mode="json")
        dumped.pop("seeds", None)
        return dumped

    def made_curve(self, curve: dict) -> bool:
        """Whether `curve` (a curve.json) was made with these settings (one written with a seed list too)."""
        stored = dict(curve.get("attack") or {})
        stored.pop("seeds", None)
        return bool(stored) and stored == self.curve_settings()

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and len(set(value)) != len(value):  # one curve would count as two in mean and std
            raise ValueError(f"has duplicates: {value}")
        return _seeds_in_range(value)

    @field_validator("eval_at")
    @classmethod
    def _eval_at(cls, value: list[int], info: ValidationInfo) -> list[int]:
        steps = info.data.get("steps")
        bad = [s for s in value if s < 0 or (steps is not None and s > steps)]
        if bad:
            raise ValueError(f"has {bad}, outside 0..steps ({steps})")
        if not value:
            raise ValueError("is empty; list at least one step to evaluate the attacked model at")
        return sorted(set(value))

    @model_validator(mode="after")
    def _default_eval_at(self) -> AttackConfig:
        # The default list is made for 200 steps: a shorter attack need not restate it.
        if "eval_at" not in self.model_fields_set:
            self.eval_at = sorted({s for s in _DEFAULT_EVAL_AT if s <= self.steps} | {self.steps})
        return self


class EvaluationConfig(PluginSection):
    registry: ClassVar[Registry] = METRICS
    selector: ClassVar[str] = "metrics"

    metrics: list[str] = Field(["concept_rate"], min_length=1, description=(
        "Registered metrics computed on every evaluated model (the first value of the first metric is the "
        "relearning curve's)."))
    samples_per_prompt: int = Field(10, gt=0, description="Images generated per evaluation prompt.")

    @field_validator("metrics")
    @classmethod
    def _listed_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:  # checked here, not when the first evaluation builds them after hours of unlearning
            raise ValueError(f"names {', '.join(repeated)} more than once; list each metric once")
        return value
    steps: int = Field(20, gt=0, description="Sampling steps for evaluation images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance for evaluation images.")
    batch_size: int = Field(64, gt=0, description="Batch size for sampling and detection.")
    seed_offset: int = Field(3_000_000_000, ge=0, le=10**15, description=(
        "Added to evaluation seeds; apart from the data-generation seed ranges (0, 1e9, 2e9 per split, plus "
        "1e11, 2e11, 3e11 for the related, unrelated and an attacker's own concept). Prompts from a file with an "
        "evaluation_seed column use the file's seeds instead."))
    prompts: dict[Literal["forget", "related", "unrelated"], Union[str, list[str]]] = Field({}, description=(
        "Evaluation prompts per role, apart from the ones unlearning trains on: a prompt file (CSV in the "
        "ESD/I2P layout, or one prompt per line) or a list. A role not named here is judged on its own prompts."))
    half_precision: bool = Field(True, description=(
        "On a GPU, sample evaluation images under float16 autocast (no effect on a CPU)."))

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value: dict) -> dict:
        empty = [role for role, given in value.items() if not given]
        if empty:
            raise ValueError(f"gives no prompts for '{empty[0]}'; name a prompt file or list prompts")
        return value


class DetectorSection(PluginSection):
    """Options of a metric that judges samples with a registered detector."""

    registry: ClassVar[Registry] = DETECTORS
    selector: ClassVar[str] = "detector"
    special: ClassVar[tuple[str, ...]] = ("auto",)

    detector: str = Field("auto", description=(
        "Registered concept detector; 'auto': the built-in world's own, else 'nudenet'."))


class OutputConfig(_Section):
    dir: str = Field("runs/{name}", description="Run folder; '{name}' is replaced by the study name.")
    trackers: list[str] = Field([], description=(
        "accelerate trackers for training logs (tensorboard, wandb, mlflow, ...); log.jsonl is always written."))

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType if t.value != "all"]
        bad = [t for t in value if t not in known]
        if bad:
            raise ValueError(f"has {bad}; accelerate's trackers are {', '.join(known)}")
        return value


class ExecutorConfig(_Section):
    """What each stage asks of a Ray cluster (`metaunlearn run --executor ray`); the sequential
    runner ignores it. Keys: a stage kind (model, data, unlearn, evaluate, attack) or 'default'."""

    cpus: dict[str, float] = Field({"default": 1}, description=(
        "CPUs per stage kind; a task's torch threads are its whole CPUs (two tasks that each use every core "
        "slow each other far more than 2x)."))
    gpus: dict[str, float] = Field({"default": 1}, description=(
        "GPUs per stage kind when the cluster has GPUs (fractions share one); ignored on a CPU-only cluster."))

    @field_validator("cpus", "gpus")
    @classmethod
    def _kinds(cls, value: dict[str, float]) -> dict[str, float]:
        kinds = ("default", "model", "data", "unlearn", "evaluate", "attack")
        bad = [k for k in value if k not in kinds]
        if bad:
            raise ValueError(f"has '{bad[0]}', not a stage kind; use {', '.join(kinds)}")
        if any(not math.isfinite(v) or v < 0 for v in value.values()):
            raise ValueError("has a negative or non-finite amount")
        if any(v > 1 and v != int(v) for v in value.values()):  # Ray's rule for GPUs; whole CPUs set the threads
            raise ValueError("has a fraction above 1; use a fraction of one (shared) or a whole number")
        return value


class StudyConfig(_Section):
    name: str = Field("study", pattern=NAME_PATTERN, description="Study name, used in the run folder.")
    seeds: list[int] = Field([0], min_length=1, description="One unlearning + attacks + evaluation per seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The original model.")
    concepts: ConceptsConfig = Field(description="The forget, related and unrelated concepts.")
    data: DataConfig = Field(default_factory=DataConfig, description="How role data are made.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="The base unlearning method.")
    meta: MetaConfig = Field(default_factory=MetaConfig, description="The meta-unlearning objective.")
    variants: list[Literal["base", "meta"]] = Field(["base", "meta"], min_length=1, description=(
        "Which unlearned models a study compares: 'base' = the base method alone, 'meta' = the base method "
        "plus the `meta` section's objective (`metaunlearn run` sets meta.enabled per variant)."))
    attacks: list[AttackConfig] = Field([], description="Relearning and benign finetunes of the released model.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="How checkpoints are scored.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run's artifacts go.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description=(
        "Resources per stage under `--executor ray`."))

    @field_validator("seeds", "variants")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"has duplicates: {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _seeds_in_range(value)

    @field_validator("attacks")
    @classmethod
    def _unique_attacks(cls, value: list[AttackConfig]) -> list[AttackConfig]:
        names = [a.name for a in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"has duplicate names: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _no_base_without_a_method(self) -> StudyConfig:
        """method 'none' has no base model: its only variant is the meta objective alone (with the
        default [base, meta] both would get one label and folder). Not an error: a run folder's study.yaml
        lists every field, defaults included."""
        if self.method.name == "none" and "base" in self.variants:
            self.variants = ["meta"]
        return self

    @model_validator(mode="after")
    def _world_classes(self) -> StudyConfig:
        """Role classes belong to a built-in world's dataset: it checks and normalises them."""
        specs = [(f"concepts.{r}", getattr(self.concepts, r)) for r in ROLES] + \
            [(f"attacks.{i}.data", a.data) for i, a in enumerate(self.attacks) if isinstance(a.data, RoleConfig)]
        specs = [(where, spec) for where, spec in specs if spec.classes]
        if not specs:
            return self
        from .worlds import world_for

        world = world_for(self.model)
        if world is None:
            raise ValueError(f"{specs[0][0]}.classes needs a built-in world as model.source "
                             f"({', '.join(WORLDS.names())}); use prompts or images for other models")
        for where, spec in specs:
            try:
                spec.classes = world.normalise_classes(spec.classes)
            except ValueError as err:
                raise ValueError(f"{where}.classes {err}") from None
        return self

    @model_validator(mode="after")
    def _checkpointing_needs_own_weights(self) -> StudyConfig:
        """Recomputing activations in the backward pass reads the UNet's own weights: a functional call on
        other tensors (second-order meta, or first order not in place) would be recomputed with the wrong ones."""
        meta = self.meta  # a study's meta variant turns meta on without validation (layout.variant_config)
        if self.method.gradient_checkpointing and (meta.enabled or "meta" in self.variants) and \
                (meta.mode == "second_order" or not meta.in_place):
            raise ValueError("method.gradient_checkpointing works with first-order meta in place only "
                             "(meta.mode first_order, meta.in_place true)")
        return self

    @model_validator(mode="after")
    def _meta_params_contain_the_methods(self) -> StudyConfig:
        """meta.params widens what a loss-based method's meta stage trains: checked before any work. Naming the
        method's own selection is null (the same run, the same fingerprint)."""
        meta, method = self.meta, self.method
        if meta.params is None or method.name not in METHODS:
            return self
        impl = METHODS.get(method.name).impl
        own = impl.trained_params(method)
        if impl.closed_form:
            raise ValueError(f"meta.params applies to methods trained by a loss, not to '{method.name}': its meta "
                             f"stage trains method.params ('{own}'); set that instead")
        from .params import CONTAINS

        if own not in CONTAINS[meta.params]:
            raise ValueError(f"meta.params '{meta.params}' does not contain the weights method.params '{own}' "
                             f"trains; choose one that does (full contains every selection)")
        if meta.params == own:
            meta.params = None
        return self

    @model_validator(mode="after")
    def _salient_needs_unrelated(self) -> StudyConfig:
        """meta.salient ranks weights against the unrelated concepts' use of them: checked before any work."""
        meta = self.meta
        if meta.salient is not None and (meta.enabled or "meta" in self.variants) and \
                not self.concepts.unrelated.given():
            from .saliency import NEEDS_UNRELATED

            raise ValueError(NEEDS_UNRELATED)
        return self

    @model_validator(mode="after")
    def _attacked_roles_given(self) -> StudyConfig:
        """An attacker finetuning on a role needs that role's data: checked before the unlearning it follows."""
        for attack in self.attacks:
            if isinstance(attack.data, str) and not getattr(self.concepts, attack.data).given():
                raise ValueError(f"attack '{attack.name}' finetunes on concepts.{attack.data}, which the study "
                                 "does not give (no classes, prompts, prompt_file or images)")
        return self

    @model_validator(mode="after")
    def _roles_apart(self) -> StudyConfig:
        """A class or prompt in two roles asks for it to be forgotten and kept at once (after
        _world_classes, so 'eight' and '8' are the same class)."""
        seen: dict[tuple[str, str], str] = {}
        for role in ROLES:
            spec = getattr(self.concepts, role)
            for kind, items in (("classes", spec.classes), ("prompts", spec.prompts)):
                for item in dict.fromkeys(" ".join(i.lower().split()) for i in items):
                    other = seen.setdefault((kind, item), role)
                    if other != role:
                        raise ValueError(f"concepts.{role}.{kind} has '{item}', which concepts.{other} has too; "
                                         f"a concept is either {other} or {role}")
        return self

    @classmethod
    def from_dict(cls, data: Any, overrides: Iterable[str] = (), source: str = "") -> StudyConfig:
        """Validate a mapping after applying overrides; any failure is a one-line ConfigError.
        `source` (a file name) prefixes validation errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"a study config must be a mapping of sections, got {type(data).__name__}")
        data = copy.deepcopy(data)  # overrides must not touch the caller's mapping
        for item in overrides:
            apply_override(data, item, cls)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"{source}: " * bool(source) + describe_error(errors[0], cls) + more) from None

    def run_dir(self) -> Path:
        path = Path(self.output.dir.replace("{name}", self.name)).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output.dir '{path}' is a file, not a folder; choose a folder")
        return path

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def fingerprint(self, *sections: str) -> str:
        """Short sha256 of the named top-level sections (all if none are named); a prompt file
        counts by its content, so an edited file redoes what it feeds. How a run is carried out
        (RUN_ONLY) does not count."""
        dumped = _with_file_digests(self.model_dump(mode="json"))
        for section, keys in RUN_ONLY.items():
            for key in keys:
                dumped[section].pop(key, None)
        if dumped["meta"].get("inner_batch") == dumped["method"]["batch_size"]:
            dumped["meta"]["inner_batch"] = None  # the method's batch, named: what None computes
        for section, cls in BATCH_ONLY.items():  # any batch size hashes as the default's
            dumped[section]["batch_size"] = cls.model_fields["batch_size"].default
        for section, settings in ADDED_NEUTRAL.items():
            for key, neutral in settings.items():
                if dumped[section].get(key, neutral) == neutral:
                    dumped[section].pop(key, None)
        text = json.dumps({s: dumped[s] for s in sections or dumped}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Unlearning and attack seeds: attack s draws from engine seed MAX_SEED + 1 + s (attacks.ATTACK_SEED_SPACE), so no
# unlearning run shares an attack's random streams
MAX_SEED = 999_999


def _seeds_in_range(value):
    bad = [s for s in value or [] if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"has {bad}; seeds are whole numbers from 0 to {MAX_SEED:,}")
    return value


# Settings of how a run is carried out, not of what it computes: left out of every fingerprint, so a run
# resumed with more frequent checkpoints, on another GPU, or with gradient checkpointing after running out of
# memory keeps its checkpoints and what is done (first-order meta computes the same in place or not).
RUN_ONLY = {"model": ("device",), "method": ("checkpoint_every", "log_every", "gradient_checkpointing"),
            "meta": ("in_place",)}

# Batch sizes of work whose every sample draws from its own seed (sampling and detection in evaluation,
# generating and encoding role data): they change a result by float rounding only, like model.device, so a
# run resumed with a smaller batch after running out of memory keeps what is done. Hashed as their defaults
# (not left out), so the runs made with the defaults keep their fingerprints.
BATCH_ONLY = {"data": DataConfig, "evaluation": EvaluationConfig}

# Settings added after runs were made, with the value that computes what those runs computed: left out of the
# fingerprint while they hold it, so a new option does not redo every finished run. Any other value counts.
ADDED_NEUTRAL = {"meta": {"inner_batch": None, "fd_step": 1e-4, "attackers_per_step": 1, "salient": None,
                           "salient_lora_targets": False, "params": None}}


def _with_file_digests(dumped: dict) -> dict:
    """The dumped config with every prompt file path followed by '#' and its content hash."""
    from .prompt_files import file_digest

    for holder, key in _prompt_file_slots(dumped):
        holder[key] += f"#{file_digest(holder[key])}"
    return dumped


def with_prompt_file_digest(role: dict) -> dict:
    """A dumped role (or an attacker's own data) with its prompt file path followed by '#' and its content
    hash, in place: results made from a prompt file depend on what it says."""
    from .prompt_files import file_digest

    if role.get("prompt_file"):
        role["prompt_file"] += f"#{file_digest(role['prompt_file'])}"
    return role


def _prompt_file_slots(dumped: dict) -> list[tuple[dict, str]]:
    """(dict, key) of every prompt file path a dumped config names: roles, attackers' own data, evaluation."""
    roles = [dumped["concepts"][r] for r in ROLES]
    roles += [a["data"] for a in dumped["attacks"] if isinstance(a["data"], dict)]
    slots = [(role, "prompt_file") for role in roles if role.get("prompt_file")]
    given = dumped["evaluation"]["prompts"]
    return slots + [(given, role) for role, value in given.items() if isinstance(value, str)]


def prompt_file_digests(config: StudyConfig) -> dict[str, str]:
    """Path -> content digest of every prompt file the config names (what a run records of them)."""
    from .prompt_files import file_digest

    return {holder[key]: file_digest(holder[key]) for holder, key in _prompt_file_slots(config.model_dump(mode="json"))}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a study or grid file with `lr:` twice is a mistake to report."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a name or a number, not a "
                                                        "list or mapping", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' appears twice in one "
                                                        "mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that a key repeated in one mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> StudyConfig:
    """Read a study YAML file and apply `dotted.key=value` overrides (`attacks.0.lr=1e-3`)."""
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file '{path}': {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the study file as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path} must be a mapping of sections (model, concepts, ...), got {got}")
    return StudyConfig.from_dict(data, overrides, source=str(path))
