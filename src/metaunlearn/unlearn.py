"""Unlearning a model: the base method (a closed-form edit, or its loss at every
step), a preservation term (denoising loss on related + unrelated data, so
erasing one concept does not damage the others) and, when enabled, the meta
objective, trained by the engine into a run folder that resumes after a kill.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .config import StudyConfig
from .data import ConceptData, RoleData
from .engine import Engine, Objective, StepContext, Terms, check_finite, make_accelerator, rank_zeros
from .errors import ConfigError, TrainingError
from .layout import MODEL, RUN_STATUS, atomic_dir, label_free_clip, read_json, released_record, write_json, write_text
from .methods import Method, make_method
from .metrics.durability import FORGET_RATE
from .model import DiffusionModel
from .params import Restricted, make_trainable, select_names
from .worlds import world_for

NOTHING_TO_TRAIN = "nothing to train: method '{name}' needs the meta objective (meta.enabled: true)"
JUDGE_NEEDS_RATE = ("a method that chooses between candidate edits judges them by the forget rate: add "
                    "concept_rate to evaluation.metrics")
HELD_OUT_SEEDS = 500_000_000  # added to the evaluation seeds: the noise a method's own choices are judged on


def forget_judge(config: StudyConfig, model: DiffusionModel):
    """judge() -> the forget rate of `model` as it stands: the forget prompts sampled with seeds that
    no evaluation uses (a closed-form method choosing between candidate edits must not see those)."""
    from .stages import evaluator

    made = []

    def judge() -> float:
        if not made:  # built on the first verdict: most methods never ask for one
            made.append(evaluator(held_out_config(config)))
            # the forget rate, not the first metric's first value: that may be a distance (FID), whose
            # minimum is the edit that erased least
            if FORGET_RATE not in {v.key for v in made[0].values}:
                raise ConfigError(JUDGE_NEEDS_RATE)
        results, _ = made[0].evaluate(model, progress=False)
        rate = results["values"][FORGET_RATE]
        if rate is None:
            raise ConfigError("the forget rate of a candidate edit could not be measured: the concept detector "
                              "judges none of the forget prompts (see evaluation.concept_rate)")
        return rate

    return judge


def held_out_config(config: StudyConfig) -> StudyConfig:
    """The study's evaluation of the forget prompts alone, with seeds no evaluation uses; the prompts as
    plain text, since a prompt file's own seeds (I2P's evaluation_seed) are the samples the evaluation reports."""
    from .config import RoleConfig
    from .metrics.evaluate import evaluation_entries

    ev, entries = config.evaluation, evaluation_entries(config, world_for(config.model))
    forget = [e.prompt for e in entries.get("forget", [])]
    ev = ev.model_copy(update={"seed_offset": ev.seed_offset + HELD_OUT_SEEDS,
                               "prompts": {"forget": forget} if forget else {}}, deep=True)
    _keep_clip_candidates(ev, [e.prompt for role in ("related", "unrelated") for e in entries.get(role, [])])
    return config.model_copy(update={
        "evaluation": ev,
        "concepts": config.concepts.model_copy(update={"related": RoleConfig(), "unrelated": RoleConfig()})})


def _keep_clip_candidates(ev, others: list[str]) -> None:
    """A label-free clip detector scores each image against every evaluation prompt it has seen: with the
    related and unrelated prompts gone from the judge's evaluation, they stay as negatives (templated, as the
    evaluation's detector writes them), so a candidate edit is judged as the evaluation judges it."""
    if not others or not label_free_clip(ev):
        return
    section = ev.options("concept_rate")
    clip = section.options("clip")
    texts = [clip.template.replace("{}", p) for p in others]
    section.__pydantic_extra__["clip"] = clip.model_copy(update={"negatives": list(dict.fromkeys(
        [*texts, *clip.negatives]))})
    ev.__pydantic_extra__["concept_rate"] = section


def recorded_judge(judge: Callable[[], float], replay: list[float] | None) -> tuple[Callable[[], float], list]:
    """`judge`, its verdicts recorded in the list returned with it; the first ones taken from `replay` (an
    interrupted run's) instead of judged again."""
    verdicts: list[float] = []

    def recorded() -> float:
        k = len(verdicts)
        verdicts.append(replay[k] if replay is not None and k < len(replay) else judge())
        return verdicts[-1]

    return recorded, verdicts


def main_process_judge(judge: Callable[[], float], accelerator) -> Callable[[], float]:
    """`judge`, with every process taking the main process's verdict (the others wait, sampling nothing): a
    method that chooses between candidate edits then makes the same choices in every process, where each
    process's own sampling could have kept a different round, and the keys and targets the meta stage holds
    would differ between processes though their weights were broadcast. The main process's judge is the one
    that replays an interrupted run's verdicts (the others may have read the run's record after the main
    one rewrote it). A judge that fails in the main process fails in every process, not leaving the others
    waiting for a verdict."""
    if accelerator.num_processes == 1:
        return judge

    def shared() -> float:
        from accelerate.utils import broadcast_object_list

        verdict, failure = None, None
        if accelerator.is_main_process:
            try:
                verdict = judge()
            except Exception as error:
                broadcast_object_list([(None, f"{type(error).__name__}: {error}")], from_process=0)
                raise
        verdict, failure = broadcast_object_list([(verdict, failure)], from_process=0)[0]
        if failure is not None:
            raise TrainingError(f"the main process could not judge a candidate edit ({failure})")
        return verdict

    return shared


def shared_judge(judge: Callable[[], float], replay: list[float] | None,
                 accelerator) -> tuple[Callable[[], float], list]:
    """The judge a closed form's edit asks, and the list of its verdicts (the main process's, for the run's
    record): `judge` recorded, replaying `replay` first, in the main process alone; every process takes its
    verdicts (main_process_judge)."""
    recorded, verdicts = recorded_judge(judge, replay)
    return main_process_judge(recorded, accelerator), verdicts


def check_one_process_settings(config: StudyConfig) -> None:
    """Meta settings with state of each process's own (a persistent attacker's episode, a running Adam's
    moments), which a checkpoint holds of the main process only: refused for a run across processes."""
    if not config.meta.enabled:
        return
    if config.meta.persistent:
        raise ConfigError("meta.persistent runs in one process only: a resumed multi-process run would give "
                          "every process the main process's attacker; set meta.persistent=0 or run one process")
    if "adam_warm" in config.meta.forms:
        raise ConfigError("meta.inner_step 'adam_warm' runs in one process only: a resumed multi-process run "
                          "would give every process the main process's moments; use another form or one process")


def preservation_data(data: ConceptData) -> RoleData | None:
    parts = [r for r in (data.related, data.unrelated) if r is not None and len(r)]
    return RoleData.concat(parts, role="benign") if parts else None


def denoising_objective(model: DiffusionModel, data: RoleData, name: str, weight: float = 1.0) -> Objective:
    """The plain denoising loss on batches of `data`: preservation, and what attackers train."""
    def objective(ctx: StepContext) -> Terms:
        latents, cond = data.sample(ctx.batch_size, ctx.generator)
        return Terms({name: weight * model.denoising_loss(latents, cond, generator=ctx.generator)})

    return objective


def training_engine(config: StudyConfig, model: DiffusionModel, data: ConceptData, method: Method, accelerator,
                    seed: int, extra: dict[str, Objective] | None = None) -> Engine:
    """The unlearning run's engine over the method's trained weights: the method's loss, preservation,
    `extra` and the meta objective (the method set up, gradient checkpointing on where asked)."""
    cfg = config.method
    own = method.trained_params(cfg)
    # meta.params (a selection containing the method's: the config checks it): the meta terms and
    # preservation train it, the method's loss its own weights only
    trainable = make_trainable(model.unet, config.meta.params if config.meta.enabled and config.meta.params else own)
    own_names = set(select_names(model.unet, own))
    only_meta = [p for name, p in trainable.items() if name not in own_names]
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    method.setup(model, trainable, data)
    objectives: dict[str, Objective] = {"method": Restricted(method.loss, only_meta) if only_meta else method.loss}
    benign = preservation_data(data) if cfg.preservation_weight > 0 else None
    if benign is not None:
        objectives["preserve"] = denoising_objective(model, benign, "preserve", cfg.preservation_weight)
    objectives.update(extra or {})
    if config.meta.enabled:
        from .meta import make_meta

        objectives["meta"] = make_meta(config.meta, model, trainable, data, method, cfg.batch_size)
    stateful = (method, objectives["meta"]) if config.meta.enabled else (method,)  # a persistent attacker
    return Engine(model.unet, trainable, objectives, cfg, seed, accelerator, stateful=stateful,
                  hint="lower method.lr or keep method.grad_clip on")


def unlearn(config: StudyConfig, model: DiffusionModel, data: ConceptData, out_dir: Path, seed: int,
            fingerprint: str, extra: dict[str, Objective] | None = None, progress: bool = True) -> Path:
    """Unlearn into `out_dir` (checkpoints/, log.jsonl, config.yaml, run.json) and
    return `out_dir/model`, a folder stock diffusers loads. Resumes from the last
    checkpoint of an interrupted run with the same fingerprint; returns at once
    when a finished run with the same fingerprint is there. `extra` objectives
    are added to the loss (an extension point for research code)."""
    out_dir = Path(out_dir)
    cfg = config.method
    status = read_json(out_dir / RUN_STATUS)
    # model/'s own done record: the run's, or the one a try of other inputs keeps while under way
    done = released_record(out_dir)
    if done and done.get("fingerprint") == fingerprint:
        if status.get("status") != "done":  # back to the inputs of the finished model a try of others left
            write_json(out_dir / RUN_STATUS, done)
        return out_dir / MODEL
    start = time.perf_counter()
    method = make_method(cfg, config.concepts.guide)
    if method.needs_meta and not config.meta.enabled and not extra:  # else preservation alone would pass for a result
        raise TrainingError(NOTHING_TO_TRAIN.format(name=cfg.name))
    accelerator = make_accelerator(config.model, config.output.trackers, out_dir)
    if accelerator.num_processes > 1:
        check_one_process_settings(config)
    checkpoints, main = out_dir / "checkpoints", accelerator.is_main_process  # the one process that writes
    # an interrupted run's verdicts on candidate edits: replayed, so the resumed run keeps the edit its
    # checkpoints were trained from (sampling on a GPU need not repeat bit for bit), without sampling again;
    # kept in the record from the start, so a run killed again before the edit still replays them
    judged = status.get("judged") if status.get("fingerprint") == fingerprint else None
    running = {"fingerprint": fingerprint, "seed": seed, "status": "running", **({"judged": judged} if judged else {})}
    released = {"released": done} if done else {}
    if main:
        if status.get("fingerprint") not in (None, fingerprint):
            shutil.rmtree(checkpoints, ignore_errors=True)  # checkpoints of other inputs would resume the wrong run
        write_text(out_dir / "config.yaml", config.to_yaml())
        write_json(out_dir / RUN_STATUS, {**running, **released})
    accelerator.wait_for_everyone()  # no process reads the folder while the main one clears it

    model.to(accelerator.device)
    # closed form: before any training step (deterministic, so a resumed run redoes it). Every process edits
    # the main one's weights and takes its verdicts, so each solves the same keys and targets from the same
    # inputs; should a solve differ in its last bits between devices, the main one's edited weights are every
    # process's after it (the keys and targets stay each process's own)
    if accelerator.num_processes > 1 and method.closed_form:
        rank_zeros(model.unet.parameters())
    judge, verdicts = shared_judge(forget_judge(config, model), judged, accelerator)
    method.edit(model, data, judge)
    del judge  # its evaluator (the detector's models) is not needed by the meta stage
    if accelerator.num_processes > 1 and method.closed_form:
        rank_zeros(model.unet.parameters())
    if verdicts:
        running["judged"] = verdicts
        if main:
            write_json(out_dir / RUN_STATUS, {**running, **released})
    steps, earlier = 0, {}
    if not method.closed_form or config.meta.enabled or extra:
        engine = training_engine(config, model, data, method, accelerator, seed, extra)
        engine.run(checkpoints=checkpoints, checkpoint_every=cfg.checkpoint_every, log=out_dir / "log.jsonl",
                   log_every=cfg.log_every, desc=f"unlearn ({cfg.name})", progress=progress,
                   tracker_name=out_dir.name, tracker_config={"method": cfg.name, "seed": seed})
        for param in engine.params.values():
            param.requires_grad_(False)
        steps = cfg.steps
        if engine.resumed_seconds:  # the interrupted run's training time, for the stage's timing.json
            earlier = {"earlier_seconds": round(engine.resumed_seconds, 2)}
    method.finish(model, data)
    check_finite(model.unet, "the unlearned UNet", "lower method.lr or keep method.grad_clip on")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(out_dir / RUN_STATUS, running)  # model/ is about to stop being the earlier finished model
        with atomic_dir(out_dir / MODEL) as tmp:
            model.save(tmp)
            world = world_for(config.model)
            if world is not None:  # a study on top of this model keeps the world's classes and detector
                world.mark(tmp)
            from .model_card import write_model_card

            write_model_card(tmp, config, seed, "meta" if config.meta.enabled else "base")  # numbers: the report's
        # before the done record, so a run killed in between redoes it: the time of the run that finished it,
        # plus the training steps an interrupted run had checkpointed (not its set-up, nor the steps after its
        # last checkpoint)
        seconds = time.perf_counter() - start + earlier.get("earlier_seconds", 0.0)
        write_json(out_dir / "timing.json", {"seconds": round(seconds, 2)})
        write_json(out_dir / RUN_STATUS, {"fingerprint": fingerprint, "seed": seed, "status": "done", "steps": steps,
                                          **earlier, **method.record()})
    accelerator.wait_for_everyone()  # every process returns the finished model, not the one being replaced
    return out_dir / MODEL
