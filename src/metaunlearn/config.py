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
from typing import Any, ClassVar, Iterable, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError
from .registry import ATTACKS, DETECTORS, METHODS, METRICS, WORLDS, Options, Registry

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
                if not (v is None and k in fields and _is_container(fields[k].annotation))}


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
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Dtype of the loaded weights.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    device: str = Field("auto", description="'auto' (CUDA if available, else CPU) or a torch device ('cuda:1').")

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

    @field_validator("classes", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return [str(v).strip() for v in value] if isinstance(value, list) else value

    def given(self) -> bool:
        return bool(self.prompts or self.classes or self.images)


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
    images_per_prompt: int = Field(8, gt=0, description="Generated roles: N train and N test images per prompt.")
    generation_steps: int = Field(25, gt=0, description="Sampling steps when generating role data.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance when generating role data.")
    batch_size: int = Field(32, gt=0, description="Batch size for generating and encoding role data.")


class OptimizerSettings(_Section):
    """What the training engine needs to make an optimizer step; shared by
    unlearning and attacks (which override the defaults)."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum.")
    lr: float = Field(1e-5, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for AdamW).")
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
    params: Literal["noxattn", "xattn", "full", "selfattn"] = Field("noxattn", description=(
        "Trained UNet weights: all but cross-attention (ESD-u), cross-attention (ESD-x), all, self-attention."))


class MethodConfig(OptimizerSettings, _MethodChoice):  # this order lists name and params first
    model_config = ConfigDict(extra="allow")  # PluginSection's, over OptimizerSettings' "forbid"

    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every this many steps.")
    log_every: int = Field(1, gt=0, description="Log losses every this many steps.")
    preservation_weight: float = Field(1.0, ge=0, description=(
        "Weight of the denoising loss on related + unrelated data that keeps them intact; 0 disables it."))


class MetaConfig(_Section):
    enabled: bool = Field(False, description="Add the meta objective to the base method's loss.")
    mode: Literal["first_order", "second_order"] = Field("first_order", description=(
        "'first_order': gradients at θ' added to θ's (reference code); "
        "'second_order': differentiate through the inner steps."))
    inner_steps: int = Field(1, gt=0, description="Steps M of the simulated finetuning attack.")
    inner_lr: float = Field(1e-4, gt=0, description="Step size τ of the simulated attack.")
    inner_step: Literal["sgd", "normalized", "adam"] = Field("sgd", description=(
        "Inner update: plain gradient step, gradient scaled to unit norm, or an Adam-like step."))
    inner_lr_range: Optional[tuple[float, float]] = Field(None, description=(
        "[low, high]: draw τ from this range at every outer step (an attacker whose step size is unknown)."))
    target: Literal["raw", "unlearn_target", "capped"] = Field("capped", description=(
        "Post-attack forget term: 'raw' ascends the denoising loss (the paper, unbounded); 'unlearn_target' "
        "regresses to the base method's target instead; 'capped' stops ascending past `cap`."))
    cap: float = Field(4.0, gt=0, description=(
        "With target 'capped': an ascent term stops (no gradient) once the post-attack loss exceeds cap x the "
        "original model's denoising loss on that role, measured at setup; so it means the same at every scale."))
    forget_after: float = Field(1.0, description="a (reference flag gamma2_1): weight of −L(θ'; forget).")
    related_after: float = Field(1.0, description="b (gamma2_2): weight of −L(θ'; related), the self-destruct term.")
    related_before: float = Field(1.0, description="c (gamma1_2): weight of +L(θ; related) before the attack.")
    unrelated_before: float = Field(1.0, description="d (gamma1_1): weight of +L(θ; unrelated) before the attack.")
    unrelated_after: float = Field(0.0, description="e (gamma2_3): weight of −L(θ'; unrelated), reference code.")

    @field_validator("inner_lr_range")
    @classmethod
    def _ordered(cls, value: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if value is not None and not (all(map(math.isfinite, value)) and 0 < value[0] <= value[1]):
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(value)}")
        return value


class _AttackChoice(PluginSection):
    registry: ClassVar[Registry] = ATTACKS
    selector: ClassVar[str] = "kind"

    name: str = Field(pattern=NAME_PATTERN, description="Unique name; the attack's folder in the run directory.")
    kind: str = Field("full", description="Registered attack kind: 'full' (every UNet weight), 'lora' (peft), ...")
    data: Literal["forget", "related", "unrelated"] = Field("forget", description=(
        "Whose held-out attack-split images the attacker finetunes on: 'forget' relearns the concept; "
        "'unrelated' is a benign finetune (the paper's CLEAN setting)."))


class AttackConfig(OptimizerSettings, _AttackChoice):  # this order lists name, kind and data first
    model_config = ConfigDict(extra="allow")  # PluginSection's, over OptimizerSettings' "forbid"

    lr: float = Field(1e-4, gt=0, description="Attacker's learning rate.")
    weight_decay: float = Field(1e-2, ge=0, description="Attacker's weight decay (AdamW's default).")
    grad_clip: float = Field(0.0, ge=0, description="Attacker's max gradient norm; 0: no clipping.")
    eval_at: list[int] = Field(_DEFAULT_EVAL_AT, description=(
        "Steps at which the attacked model is evaluated (0 = before the attack)."))
    seeds: Optional[list[int]] = Field(None, description=(
        "Attack seeds; None = one attack per unlearned model with its unlearning seed (the original model: "
        "the study's first seed)."))
    save_final: bool = Field(False, description=(
        "Also save the attacked weights (full: a pipeline folder; lora: the adapter). Off: curves only."))

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
    steps: int = Field(20, gt=0, description="Sampling steps for evaluation images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance for evaluation images.")
    batch_size: int = Field(64, gt=0, description="Batch size for sampling and detection.")
    seed_offset: int = Field(3_000_000_000, ge=0, description=(
        "Added to evaluation seeds; above the data-generation seed ranges (0, 1e9, 2e9 per split)."))


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

    @field_validator("seeds", "variants")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"has duplicates: {value}")
        return value

    @field_validator("attacks")
    @classmethod
    def _unique_attacks(cls, value: list[AttackConfig]) -> list[AttackConfig]:
        names = [a.name for a in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"has duplicate names: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _world_classes(self) -> StudyConfig:
        """Role classes belong to a built-in world's dataset: it checks and normalises them."""
        roles = [r for r in ROLES if getattr(self.concepts, r).classes]
        if not roles:
            return self
        from .worlds import world_for

        world = world_for(self.model)
        if world is None:
            raise ValueError(f"concepts.{roles[0]}.classes needs a built-in world as model.source "
                             f"({', '.join(WORLDS.names())}); use prompts or images for other models")
        for role in roles:
            spec = getattr(self.concepts, role)
            try:
                spec.classes = world.normalise_classes(spec.classes)
            except ValueError as err:
                raise ValueError(f"concepts.{role}.classes {err}") from None
        return self

    @classmethod
    def from_dict(cls, data: Any, overrides: Iterable[str] = (), source: str = "") -> StudyConfig:
        """Validate a mapping after applying overrides; any failure is a one-line ConfigError.
        `source` (a file name) prefixes validation errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"a study config must be a mapping of sections, got {type(data).__name__}")
        data = copy.deepcopy(data)  # overrides must not touch the caller's mapping
        for item in overrides:
            _apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            errors = err.errors()
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"{source}: " * bool(source) + _describe(errors[0]) + more) from None

    def run_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name)).expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def fingerprint(self, *sections: str) -> str:
        """Short sha256 of the named top-level sections (all if none are named)."""
        dumped = self.model_dump(mode="json")
        text = json.dumps({s: dumped[s] for s in sections or dumped}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> StudyConfig:
    """Read a study YAML file and apply `dotted.key=value` overrides (`attacks.0.lr=1e-3`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


# --- walking the schema along a dotted path ---------------------------------------


def _strip_optional(ann: Any) -> Any:
    args = [a for a in get_args(ann) if a is not type(None)]
    return args[0] if get_origin(ann) is Union and len(args) == 1 else ann


def _model_of(ann: Any) -> Optional[type[BaseModel]]:
    ann = _strip_optional(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _is_container(ann: Any) -> bool:
    return _model_of(ann) is not None or get_origin(_strip_optional(ann)) is list


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys a section accepts: its fields, and a plugin section's plugin names."""
    plugins = model.registry.names() if issubclass(model, PluginSection) else []
    return [*model.model_fields, *plugins]


def _child(model: type[BaseModel], part: Union[str, int]) -> Any:
    """The annotation of key `part` of `model`, or None when it has no such key."""
    if part in model.model_fields:
        return model.model_fields[part].annotation
    if issubclass(model, PluginSection) and part in model.registry:
        return model.registry.get(str(part)).options
    return None


def _annotation_at(loc: Iterable[Union[str, int]]) -> Any:
    """The annotation at `loc` (field names and list indices) below StudyConfig, or None."""
    ann: Any = StudyConfig
    for part in loc:
        ann, model = _strip_optional(ann), _model_of(ann)
        if model is not None and _child(model, part) is not None:
            ann = _child(model, part)
        elif get_origin(ann) in (list, tuple) and str(part).isdigit():
            args = get_args(ann)
            ann = args[0] if get_origin(ann) is list else args[min(int(part), len(args) - 1)]
        else:
            return None
    return _strip_optional(ann)


def _apply_override(data: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value (e.g. method.steps=100)")
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        here, above = ".".join(parts[: i + 1]), ".".join(parts[:i])
        parent = _annotation_at(parts[:i])
        model = _model_of(parent)
        if model is not None:
            if _child(model, part) is None:
                raise ConfigError(f"override '{key}': unknown key '{here}'; valid keys: {', '.join(_keys(model))}")
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{above}' is not a mapping in the file")
            slot: Any = part
        elif get_origin(parent) is list and part.isdigit():
            slot, size = int(part), len(node) if isinstance(node, list) else 0
            if slot >= size:
                raise ConfigError(f"override '{key}': index {slot} out of range, '{above}' has {size} entries")
        else:
            raise ConfigError(f"override '{key}': '{above}' has no key or index '{part}'")
        if i < len(parts) - 1:
            child = node.get(slot) if isinstance(node, dict) else node[slot]
            if child is None:  # a section the file leaves out: start it empty
                child = node[slot] = [] if get_origin(_annotation_at(parts[: i + 1])) is list else {}
            node = child
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': '{text}' is not a valid YAML value") from None
    # For text fields `name=123` or `mixed_precision=no` mean the text, not YAML's int or bool.
    target = _annotation_at(parts)
    textual = target is str or (get_origin(target) is Literal and all(isinstance(a, str) for a in get_args(target)))
    node[slot] = text.strip() if textual and value is not None and not isinstance(value, str) else value


def _describe(err: dict) -> str:
    """One line for one pydantic error: the dotted key and what is wrong with it."""
    loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
    path = ".".join(str(p) for p in loc)
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "extra_forbidden":
        model = _model_of(_annotation_at(loc[:-1]))
        return f"unknown key '{path}'; valid keys: {', '.join(_keys(model)) if model else '?'}"
    if kind == "literal_error":
        allowed = ", ".join(map(str, get_args(_annotation_at(loc)))) or err.get("ctx", {}).get("expected", "?")
        return f"{path}: {got} is not allowed; choose one of: {allowed}"
    if kind == "missing":
        return f"{path}: required but missing"
    if kind == "string_pattern_mismatch":
        return f"{path}: {got} is not a valid name; use letters, digits, '-', '_' and '.'"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_of(_annotation_at(loc))
        return f"{path}: expected a mapping{' of ' + ', '.join(_keys(model)) if model else ''}, got {got}"
    if kind == "value_error":  # our validators phrase their message to follow the key
        msg = msg.removeprefix("Value error, ")
        return f"{path}: {msg}" if path and msg.startswith("'") else (f"{path} {msg}" if path else msg)
    return f"{path}: {msg[0].lower() + msg[1:]} (got {got})"
