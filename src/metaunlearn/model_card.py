"""Hugging Face model cards: a README.md in every model folder a study releases
(`unlearn/<label>/model/`, and an attack's saved weights `attacks/<label>/<attack>-seed<s>/model|lora/`),
saying what was erased and kept, how, what the study measured (before any attack and under
relearning, with its evaluation conventions), how to load it and what it does not promise.

The YAML front matter is made by huggingface_hub's `ModelCardData` and the text by the Jinja
template templates/model_card.md (`ModelCard.from_template`). A README.md beside the weights
changes nothing a loader or a done-check reads (`layout.model_complete`: model_index.json, unet/).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from .config import AttackConfig, RoleConfig, StudyConfig
from .layout import CURVE, ENVIRONMENT, MODEL, attack_seeds, read_json, unlearn_label, variant_config, write_text

CARD = "README.md"
# hub id: (license the model states, family tag)
KNOWN = {"CompVis/stable-diffusion-v1-4": ("creativeml-openrail-m", "stable-diffusion"),
         "runwayml/stable-diffusion-v1-5": ("creativeml-openrail-m", "stable-diffusion"),
         "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", "stable-diffusion-xl")}
TAGS = ["concept-erasure", "machine-unlearning", "text-to-image", "diffusers", "metaunlearn"]
MEANING = {"forget": "erased", "related": "kept: close to the erased concept, the first to suffer",
           "unrelated": "kept: far from the erased concept"}
SAVED = {MODEL: False, "lora": True}  # what an attack's save_final writes: folder name -> is an adapter


def hub_id(source: str, local: bool | None = None) -> str | None:
    """`source` when it reads as a Hub id ('org/name') and is neither a built-in world nor a local path;
    `local`: what the run recorded (environment.json), which a card written from another directory, or
    after the folder moved, cannot tell from the path."""
    from .worlds import WORLDS

    if source in WORLDS or local or (local is None and Path(source).expanduser().exists()):
        return None
    return source if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) else None


def origin(config: StudyConfig, local: bool | None = None) -> str:
    from .worlds import world_for

    source = config.model.source
    if hub := hub_id(source, local):
        return f"[{hub}](https://huggingface.co/{hub}) on the Hugging Face Hub"
    world = world_for(config.model)
    if world is not None:
        where = "" if source == world.name else f", from the folder `{source}`"
        return (f"the built-in `{world.name}` world of metaunlearn (a small text-to-image model metaunlearn "
                f"builds and trains itself{where}), not a model of the Hugging Face Hub")
    return f"the local diffusers pipeline folder `{source}`, not a model of the Hugging Face Hub"


def family(hub: str | None, *folders: Path | None) -> str | None:
    """'stable-diffusion' or 'stable-diffusion-xl' by the first pipeline folder's class, else by a known hub id."""
    for folder in folders:
        name = read_json(Path(folder) / "model_index.json").get("_class_name", "") if folder else ""
        if name.startswith("StableDiffusion"):
            return "stable-diffusion-xl" if name.startswith("StableDiffusionXL") else "stable-diffusion"
    return KNOWN.get(hub, (None, None))[1]


def number(value, spec: dict) -> str:
    """A measured value as the cards write it: fractions in percent (one decimal), else 3 significant digits."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if spec.get("fraction", True) else f"{value:.3g}"


def role_text(spec: RoleConfig) -> str:
    shown = "; ".join(f"'{p}'" for p in spec.prompts[:20]) + (f" … ({len(spec.prompts)} in all)"
                                                              if len(spec.prompts) > 20 else "")
    parts = [f"classes {', '.join(spec.classes)}" if spec.classes else "", f"prompts {shown}" if spec.prompts else "",
             f"the prompts of the file `{spec.prompt_file}`" if spec.prompt_file else "",
             f"the images of the folder `{spec.images}`" if spec.images else ""]
    return "; ".join(p for p in parts if p) or "none given"


def attack_text(attack: AttackConfig) -> str:
    data = f"the {attack.data} role's held-out images" if isinstance(attack.data, str) else \
        f"a concept of its own ({role_text(attack.data)})"
    return (f"{attack.kind} finetuning on {data}, {attack.optimizer} lr {attack.lr:g}, {attack.steps} steps, "
            f"batch {attack.batch_size}.")


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def measured(folder, results: dict, row, label: str, only: tuple[str, int] | None = None) -> dict | None:
    """What the study measured of model `label` (of study row `row`): its evaluation before any attack (the
    row's mean when its own is missing) and its relearning curves (`only`: one attack name and seed)."""
    from .metrics.durability import WINDOW_UNTIL, window
    from .report import conventions_blocks

    specs = results.get("values") or []
    if not specs:
        return None
    own, key = folder.evaluation(label).get("values"), specs[0]["key"]
    row_stats = results.get("before_attack", {}).get(row.name, {})
    if own:
        before = [(s["label"], number(own.get(s["key"]), s)) for s in specs]
        source = f"Before any attack, {'the model this one was made from' if only else 'this model'}: its " \
                 f"evaluation (`eval/{label}.json` of the run folder):"
    else:
        before = [(s["label"], number((row_stats.get(s["key"]) or {}).get("mean"), s)) for s in specs]
        source = f"Before any attack, the mean over the seeds of the study's row '{row.name}' (no evaluation of " \
                 "this model itself was found):"
    attacks = []
    for attack in folder.config.attacks:
        if only and attack.name != only[0]:
            continue
        per_curve = results.get("attacks", {}).get(attack.name, {}).get("rows", {}).get(row.name, {})
        for c in sorted(folder.curves(row, attack), key=lambda c: c["seed"]):
            if c["model"] != label or (only and c["seed"] != only[1]):
                continue
            per = next((p for p in per_curve.get("per_curve", [])
                        if p["model"] == label and p["seed"] == c["seed"]), {})
            last, reach = c["points"][-1]["step"], per.get("steps_to_50")
            summary = (f"{specs[0]['label'].capitalize()}: window (mean over the evaluated steps after 0 up to "
                       f"{WINDOW_UNTIL}) {number(window(c, key, WINDOW_UNTIL), specs[0])}; time average over the "
                       f"attack (AUC) {number(per.get('auc'), specs[0])}; first evaluated step at which it reaches "
                       f"50%: {reach if reach is not None else f'not within {last} steps'}.")
            attacks.append({"name": attack.name, "seed": c["seed"], "text": attack_text(attack), "last": last,
                            "steps": attack.steps,  # what saved weights are of: eval_at need not reach the end
                            "summary": summary, "header": [s["label"] for s in specs],
                            "rows": [[str(p["step"])] + [number(p["values"].get(s["key"]), s) for s in specs]
                                     for p in c["points"]]})
    conv = conventions_blocks(results.get("conventions") or {})
    return {"before": before, "before_source": source, "attacks": attacks,
            "before_column": ("before the attack" if only else "this model") if own else f"mean of row '{row.name}'",
            "conventions": [(item, value) for item, value in conv[1][2]] if conv else []}


def _write(out: Path, config: StudyConfig, variant: str, label: str, seed: int | None, numbers: dict | None,
           unlearned: Path | None, attacked: tuple[AttackConfig, int] | None = None, adapter: bool = False,
           local: bool | None = None) -> Path:
    """The card of folder `out` (an unlearned model, or `attacked` by (attack, seed)) into out/README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    from .registry import METHODS
    from .report import method_title

    config = variant_config(config, variant) if variant != "original" else config
    hub, m = hub_id(config.model.source, local), config.method
    fam = family(hub, out, unlearned, None if hub else Path(config.model.source))
    tags = (TAGS + [m.name] * (m.name != "none") if variant != "original" else TAGS[2:]) + \
        (["meta-unlearning"] if variant == "meta" else []) + ([fam] if fam else []) + (["lora"] if adapter else [])
    data = ModelCardData(base_model=hub, library_name="diffusers", pipeline_tag="text-to-image",
                         license=KNOWN.get(hub, ("other",))[0], tags=list(dict.fromkeys(tags)))
    title = method_title(config) + (" + meta-unlearning" if variant == "meta" else "")
    settings = [(f"{m.name}.{k}", _value(v)) for k, v in m.options().model_dump(mode="json").items()]
    params = METHODS.get(m.name).impl.trained_params(m) if m.name in METHODS else m.params
    if variant == "meta" and config.meta.params not in (None, params):  # the meta terms train more
        params += f" (the meta terms and preservation: {config.meta.params})"
    training = f"{m.steps} steps, {m.optimizer} lr {m.lr:g}, batch {m.batch_size}, preservation weight " \
        f"{m.preservation_weight:g}"
    settings += [("trained UNet weights", params), ("training", training), ("seed", str(seed))]
    meta = [(k, _value(v)) for k, v in config.meta.model_dump(mode="json").items() if k != "enabled"] \
        if variant == "meta" else []
    attack = {"name": attacked[0].name, "seed": attacked[1], "text": attack_text(attacked[0])} if attacked else None
    attacked_from = repr(f"path/to/{label}" if variant != "original" else hub or "path/to/the/original")
    prompt = next(iter(config.concepts.unrelated.prompts + config.concepts.related.prompts), "a photo")
    card = ModelCard.from_template(
        data, template_str=resources.files("metaunlearn").joinpath("templates/model_card.md").read_text("utf-8"),
        title=f"{label} after attack '{attack['name']}' (seed {attack['seed']})" if attack else f"{label}: {title}",
        label=label, seed=seed, variant=variant, study=config.name, origin=origin(config, local), method=m.name,
        method_title=title, method_settings=settings, meta_settings=meta, attack=attack, adapter=adapter,
        attacked_from=attacked_from, prompt=repr(prompt), measured=numbers,
        roles=[{"name": r, "meaning": MEANING[r], "text": role_text(getattr(config.concepts, r))} for r in MEANING])
    return write_text(out / CARD, card.content)


def write_model_card(model_dir: str | Path, config: StudyConfig, seed: int, variant: str) -> Path:
    """The card of a freshly unlearned model (nothing measured yet); returns its README.md."""
    label = unlearn_label(variant_config(config, variant), seed)
    return _write(Path(model_dir), config, variant, label, seed, None, Path(model_dir))


def write_model_cards(run_dir: Path, config: StudyConfig, results: dict) -> list[Path]:
    """A card in every released model folder of the study, with the numbers of `results` (results.json)
    and of the run folder's evaluations and curves; returns the README.md files written."""
    from .report import RunFolder, study_rows

    folder, written = RunFolder(Path(run_dir), config), []
    env = read_json(Path(run_dir) / ENVIRONMENT)  # as the run saw model.source (if this config has the same)
    local = env.get("source_local") if env.get("model_source") == config.model.source else None
    for row in study_rows(config):
        for label, seed in row.models:
            if seed is not None and folder.layout.released(label):  # finished and complete
                written.append(_write(folder.layout.model(label), config, row.variant, label, seed,
                                      measured(folder, results, row, label), folder.layout.model(label),
                                      local=local))
            for attack in config.attacks:
                for s in attack_seeds(config, attack, seed):
                    out = folder.layout.attack(label, attack.name, s)
                    for name, adapter in SAVED.items():
                        # saved by this attack as the study configures it now, from the weights the label's run
                        # made last (not an earlier model of the label); its numbers: curves of these settings
                        curve = read_json(out / CURVE)
                        if (out / name).is_dir() and attack.made_curve(curve) and \
                                folder.same_weights(curve, label):
                            numbers = measured(folder, results, row, label, (attack.name, s))
                            written.append(_write(out / name, config, row.variant, label, seed, numbers,
                                                  folder.layout.model(label) if seed is not None else None,
                                                  (attack, s), adapter, local))
    return written
