"""The study configuration: one YAML file, typed, unknown keys rejected.

`load_config` reads a study file, applies `dotted.key=value` overrides and turns
every validation failure into a one-line `ConfigError` naming the offending key.
Relative paths (model.source, concepts.*.images, output.dir) are relative to the
working directory, not to the YAML file.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .worlds.digits_data import DIGIT_WORDS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names become folder names in the run directory
_DEFAULT_EVAL_AT = [0, 10, 25, 50, 100, 200]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class ModelConfig(_Section):
    source: str = Field("digits", description=(
        "'digits' for the built-in digits world, else a local diffusers pipeline folder or a hub id."))
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Dtype of the loaded weights.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    device: str = Field("auto", description="'auto' (CUDA if available, else CPU) or a torch device ('cuda:1').")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class RoleConfig(_Section):
    prompts: list[str] = Field([], description="Prompts; for generated data the model draws images of each.")
    digits: list[str] = Field([], description=(
        "Digits world only: digit classes from its dataset, by word or numeral ('eight' or '8'); stored as words."))
    images: Optional[str] = Field(None, description=(
        "Path of a Hugging Face imagefolder (images + metadata.jsonl with a text column) for this role."))

    @field_validator("digits", mode="before")
    @classmethod
    def _digit_words(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        words = [str(v).strip().lower() for v in value]
        words = [DIGIT_WORDS[int(w)] if len(w) == 1 and w.isdigit() else w for w in words]
        bad = [v for v, w in zip(value, words) if w not in DIGIT_WORDS]
        if bad:
            raise ValueError(f"has {bad}, not digits; use zero..nine or 0..9")
        return words


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
        if not (value.prompts or value.digits or value.images):
            raise ValueError("has no prompts, digits or images; name the concept to unlearn")
        return value


class DataConfig(_Section):
    images_per_prompt: int = Field(8, gt=0, description="Generated roles: N train and N test images per prompt.")
    generation_steps: int = Field(25, gt=0, description="Sampling steps when generating role data.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance when generating role data.")
    batch_size: int = Field(32, gt=0, description="Batch size for generating and encoding role data.")


class _ForgetXt(_Section):
    """How a prompt-based method gets x_t for the forget prompt."""

    x_t: Literal["sample", "noised"] = Field("sample", description=(
        "'sample': partial DDIM sampling with the forget prompt (the paper; ESD samples the student, SDD its "
        "EMA teacher); 'noised': forget images noised to a random t (cheaper)."))
    ddim_steps: int = Field(50, gt=0, description="DDIM steps of the partial sampling that makes x_t.")
    sample_guidance: float = Field(3.0, ge=0, description="Guidance scale of that partial sampling.")


class EsdConfig(_ForgetXt):
    eta: float = Field(1.0, description="Negative guidance η of the ESD target ε(∅) − η·(ε(c) − ε(∅)).")


class SddConfig(_ForgetXt):
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Decay of the EMA teacher.")


class MethodConfig(_Section):
    name: Literal["esd", "sdd", "none"] = Field("esd", description="Base method; 'none': meta objective only.")
    params: Literal["noxattn", "xattn", "full", "selfattn"] = Field("noxattn", description=(
        "Trained UNet weights: all but cross-attention (ESD-u), cross-attention (ESD-x), all, self-attention."))
    steps: int = Field(200, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-5, gt=0, description="Learning rate (AdamW).")
    batch_size: int = Field(4, gt=0, description="Batch size of every loss term.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every this many steps.")
    log_every: int = Field(1, gt=0, description="Log losses every this many steps.")
    preservation_weight: float = Field(1.0, ge=0, description=(
        "Weight of the denoising loss on related + unrelated data that keeps them intact; 0 disables it."))
    esd: EsdConfig = Field(default_factory=EsdConfig, description="ESD settings (name 'esd').")
    sdd: SddConfig = Field(default_factory=SddConfig, description="SDD settings (name 'sdd').")


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
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(value)}")
        return value


class AttackConfig(_Section):
    name: str = Field(pattern=NAME_PATTERN, description="Unique name; the attack's folder in the run directory.")
    kind: Literal["full", "lora"] = Field("full", description="Finetune all UNet weights, or a LoRA adapter (peft).")
    data: Literal["forget", "benign"] = Field("forget", description=(
        "'forget': relearn from forget-concept images; 'benign': finetune on related + unrelated data only."))
    lr: float = Field(1e-4, gt=0, description="Attacker's learning rate.")
    steps: int = Field(200, gt=0, description="Attacker's finetuning steps.")
    batch_size: int = Field(4, gt=0, description="Attacker's batch size.")
    eval_at: list[int] = Field(_DEFAULT_EVAL_AT, description=(
        "Steps at which the attacked model is saved and evaluated (0 = before the attack)."))
    lora_rank: int = Field(4, gt=0, description="LoRA rank (kind 'lora').")
    lora_alpha: float = Field(4.0, gt=0, description="LoRA alpha (kind 'lora').")
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                    description="UNet module names LoRA adapts (kind 'lora').")
    seeds: Optional[list[int]] = Field(None, description="Attack seeds; None = the study's seeds.")
    save_final: bool = Field(False, description=(
        "Also save the attacked weights (full: a pipeline folder; lora: the adapter). Off: curves only."))

    @field_validator("eval_at")
    @classmethod
    def _eval_at(cls, value: list[int], info: ValidationInfo) -> list[int]:
        steps = info.data.get("steps")
        bad = [s for s in value if s < 0 or (steps is not None and s > steps)]
        if bad:
            raise ValueError(f"has {bad}, outside 0..steps ({steps})")
        return sorted(set(value))

    @model_validator(mode="after")
    def _default_eval_at(self) -> AttackConfig:
        # The default list is made for 200 steps: a shorter attack need not restate it.
        if "eval_at" not in self.model_fields_set:
            self.eval_at = sorted({s for s in _DEFAULT_EVAL_AT if s <= self.steps} | {self.steps})
        return self


class EvaluationConfig(_Section):
    samples_per_prompt: int = Field(10, gt=0, description="Images generated per evaluation prompt.")
    steps: int = Field(20, gt=0, description="Sampling steps for evaluation images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance for evaluation images.")
    batch_size: int = Field(64, gt=0, description="Batch size for sampling and detection.")
    detector: Literal["auto", "digits", "nudenet"] = Field("auto", description=(
        "Concept detector; 'auto' is 'digits' for the digits world, else 'nudenet'."))
    seed_offset: int = Field(3_000_000_000, ge=0, description=(
        "Added to evaluation seeds; above the data-generation seed ranges (0, 1e9, 2e9 per split)."))


class OutputConfig(_Section):
    dir: str = Field("runs/{name}", description="Run folder; '{name}' is replaced by the study name.")


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
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path} must be a mapping of sections (model, concepts, ...), got {got}")
    return StudyConfig.from_dict(data, overrides, source=str(path))


def dump_config(config: StudyConfig, path: Union[str, Path]) -> Path:
    """Write the resolved config; `load_config` reads it back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml(), encoding="utf-8")
    return path


# --- walking the schema along a dotted path ---------------------------------------


def _strip_optional(ann: Any) -> Any:
    args = [a for a in get_args(ann) if a is not type(None)]
    return args[0] if get_origin(ann) is Union and len(args) == 1 else ann


def _model_of(ann: Any) -> Optional[type[BaseModel]]:
    ann = _strip_optional(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _is_container(ann: Any) -> bool:
    return _model_of(ann) is not None or get_origin(_strip_optional(ann)) is list


def _annotation_at(loc: Iterable[Union[str, int]]) -> Any:
    """The annotation at `loc` (field names and list indices) below StudyConfig, or None."""
    ann: Any = StudyConfig
    for part in loc:
        ann, model = _strip_optional(ann), _model_of(ann)
        if model is not None and part in model.model_fields:
            ann = model.model_fields[part].annotation
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
            if part not in model.model_fields:
                keys = ", ".join(model.model_fields)
                raise ConfigError(f"override '{key}': unknown key '{here}'; valid keys: {keys}")
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
        return f"unknown key '{path}'; valid keys: {', '.join(model.model_fields) if model else '?'}"
    if kind == "literal_error":
        allowed = ", ".join(map(str, get_args(_annotation_at(loc)))) or err.get("ctx", {}).get("expected", "?")
        return f"{path}: {got} is not allowed; choose one of: {allowed}"
    if kind == "missing":
        return f"{path}: required but missing"
    if kind == "string_pattern_mismatch":
        return f"{path}: {got} is not a valid name; use letters, digits, '-', '_' and '.'"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_of(_annotation_at(loc))
        return f"{path}: expected a mapping{' of ' + ', '.join(model.model_fields) if model else ''}, got {got}"
    if kind == "value_error":  # our validators phrase their message to follow the key
        msg = msg.removeprefix("Value error, ")
        return f"{path} {msg}" if path else msg
    return f"{path}: {msg[0].lower() + msg[1:]} (got {got})"
