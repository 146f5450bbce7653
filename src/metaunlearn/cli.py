"""The `metaunlearn` command. Commands only parse arguments and call the library;
a MetaunlearnError becomes one line on stderr and exit code 1."""

from __future__ import annotations

import enum
import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import MetaunlearnError, filesystem_error

app = typer.Typer(help="Make unlearned text-to-image diffusion models resist relearning (meta-unlearning).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class WorldPreset(str, enum.Enum):
    default = "default"
    reduced = "reduced"
    wide = "wide"


def user_errors(fn):
    """Turn expected failures into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetaunlearnError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except OSError as err:  # the filesystem said no: name the path and what to do
            typer.echo(f"error: {filesystem_error(err)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def world(
    name: Annotated[str, typer.Argument(help="Which built-in world (registered: digits).")] = "digits",
    out: Annotated[Optional[Path], typer.Option(help="Also copy the finished world to this folder.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild even if a cached world exists.")] = False,
    preset: Annotated[WorldPreset, typer.Option(help="'reduced' builds in seconds for smoke tests (its quality "
                                                     "is meaningless); 'wide' has twice the UNet's channels."
                                                     )] = WorldPreset.default,
):
    """Build (or reuse from the cache) a built-in tiny text-to-image world and print its quality."""
    import shutil

    from .config import ModelConfig
    from .registry import WORLDS

    if name not in WORLDS:  # before its options are validated against a world that does not exist
        raise MetaunlearnError(f"unknown world '{name}'")
    model = ModelConfig.model_validate({"source": name, name: {"preset": preset.value}}) \
        if preset is not WorldPreset.default else ModelConfig(source=name)
    from .worlds import world_for

    built = world_for(model)
    if built is None:
        raise MetaunlearnError(f"unknown world '{name}'")
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):  # before minutes of building
        raise MetaunlearnError(f"'{out}' exists and is not {'empty' if out.is_dir() else 'a folder'}; "
                               "choose a new folder")
    folder = built.folder(rebuild=rebuild)
    if out is not None:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        folder = out
    typer.echo(built.describe(folder))


ConfigArg = Annotated[Path, typer.Argument(help="Study YAML file (see configs/).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one config value, e.g. --set method.steps=200 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Run this seed only (default: every seed of the study).")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="Model folder (default: the study's original model).")]
LabelOpt = Annotated[Optional[str], typer.Option(help="Name of the model in the run folder (default: from --model).")]


def _config(path: Path, overrides: Optional[list[str]], meta: Optional[bool] = None):
    from .config import load_config

    overrides = list(overrides or [])
    if meta is not None:
        overrides.append(f"meta.enabled={str(meta).lower()}")
    return load_config(path, overrides)


@app.command()
@user_errors
def data(config: ConfigArg, set_: SetOpt = None,
         split: Annotated[str, typer.Option(help="train, test or attack (the attacker's held-out images).")] = "train"):
    """Make or collect the forget, related and unrelated data and cache their latents and prompt embeddings."""
    from .config import ROLES
    from .layout import RunLayout
    from .stages import concept_data

    cfg = _config(config, set_)
    data = concept_data(cfg, split=split)  # loads the model only if the cache cannot serve the split
    for role in ROLES:
        part = getattr(data, role)
        count = f"{len(part)} items, {len(part.prompts)} prompts" if part is not None else "none"
        typer.echo(f"{role:>9}: {count}")
    typer.echo(f"cached in {RunLayout.of(cfg).data(split)}")


@app.command()
@user_errors
def unlearn(config: ConfigArg, set_: SetOpt = None, seed: SeedOpt = None,
            meta: Annotated[Optional[bool], typer.Option("--meta/--no-meta", help="Add the meta objective "
                                                         "(overrides meta.enabled).", show_default=False)] = None,
            fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints of an interrupted run "
                                                "instead of resuming from them.")] = False):
    """Unlearn the forget concept with the base method (optionally plus meta); resumes an interrupted run."""
    import shutil

    from . import methods  # noqa: F401  (registers the methods)
    from .config import MAX_SEED
    from .errors import ConfigError
    from .layout import RunLayout, unlearn_label
    from .registry import METHODS
    from .stages import preflight, run_unlearn
    from .unlearn import NOTHING_TO_TRAIN

    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed}: seeds are whole numbers from 0 to {MAX_SEED:,}")
    cfg = _config(config, set_, meta)
    if METHODS.get(cfg.method.name, "method.name").impl.needs_meta and not cfg.meta.enabled:
        raise ConfigError(NOTHING_TO_TRAIN.format(name=cfg.method.name) + "; add --meta")
    preflight(cfg, attacks=[])  # it runs no attack
    for s in [seed] if seed is not None else cfg.seeds:
        if fresh:  # the checkpoints only: a finished model of these settings stays (and is returned as done)
            shutil.rmtree(RunLayout.of(cfg).unlearn(unlearn_label(cfg, s)) / "checkpoints", ignore_errors=True)
        out = run_unlearn(cfg, s)
        typer.echo(f"seed {s}: unlearned model in {out}")


@app.command()
@user_errors
def evaluate(config: ConfigArg, set_: SetOpt = None, model: ModelOpt = None, label: LabelOpt = None):
    """Sample every role's prompts and compute the study's metrics (concept rates by default)."""
    from .stages import preflight, run_evaluate

    cfg = _config(config, set_)
    preflight(cfg, unlearns=False, attacks=[])
    results, path = run_evaluate(cfg, model, _label(cfg, model, label))
    for spec in results["specs"]:
        typer.echo(f"{spec['label']:>24}: {_value(results['values'].get(spec['key']), spec)}")
    typer.echo(f"results: {path}")


def _label(cfg, model: Optional[Path], label: Optional[str]) -> str:
    """The name a model's results get in the run folder (--label, else from --model), checked: it names
    files there, and the original's or one of the study's own models' names would overwrite their results."""
    import re

    from .config import NAME_PATTERN
    from .layout import ORIGINAL, RunLayout, model_label, unlearned_models

    name = label or model_label(model)
    if not re.match(NAME_PATTERN, name):
        raise MetaunlearnError(f"the label '{name}' is not a name (letters, digits, '_', '.', '-'): it names files "
                               "in the run folder; give --label")
    own = {m.label for m in unlearned_models(cfg)}
    if model is None:  # the original model, under another name: never one of the study's own models'
        if name in own:
            raise MetaunlearnError(f"the label '{name}' is one of this study's models, not the original; give "
                                   "--model with it, or another --label")
        return name
    if name == ORIGINAL:
        raise MetaunlearnError("the label 'original' is the study's original model's; give this model another --label")
    if name in own and Path(model).resolve() != RunLayout.of(cfg).model(name).resolve():
        raise MetaunlearnError(f"the label '{name}' is one of this study's models, not {model}; give another --label")
    return name


def _value(value, spec: dict) -> str:
    if value is None:
        return "not measured (the metric cannot judge this role)"
    return f"{value:.1%}" if spec.get("fraction", True) else f"{value:.4g}"


@app.command()
@user_errors
def attack(config: ConfigArg, set_: SetOpt = None, model: ModelOpt = None, label: LabelOpt = None):
    """Run the study's relearning and benign finetuning attacks on a model (the original gives the
    reference curves) and write their curves."""
    from .stages import preflight, run_attacks

    cfg = _config(config, set_)
    if not cfg.attacks:
        raise MetaunlearnError("the study lists no attacks; add an 'attacks:' section")
    preflight(cfg, unlearns=False)  # the study's attacks
    for curve in run_attacks(cfg, model, _label(cfg, model, label)):
        spec = curve["specs"][0]
        steps = "  ".join(f"{p['step']}:{_value(p['values'].get(spec['key']), spec)}" for p in curve["points"])
        typer.echo(f"{curve['attack']['name']} seed {curve['seed']}: {spec['label']} by step  {steps}")
    typer.echo(f"curves: {cfg.run_dir() / 'attacks'}")


@app.command()
@user_errors
def durability(config: ConfigArg,
               grid: Annotated[Path, typer.Argument(help="Grid YAML file of attackers (see configs/grids/).",
                                                    show_default=False)],
               set_: SetOpt = None):
    """Attack every unlearned model of a study with a grid of attackers the study never names; print
    each attacker's meta/base relearning window and the worst case (unlearns what is missing first)."""
    from .durability import load_grid, run_grid, table

    cfg, spec = _config(config, set_), load_grid(grid)
    summary = run_grid(cfg, spec, log=lambda _: None)
    typer.echo(table(summary))
    typer.echo(f"summary: {cfg.run_dir() / f'durability-{spec.name}.json'}")
    if summary["failed"]:  # the others were measured and summarised; as `run`, the command says it was not all
        raise typer.Exit(1)


@app.command()
@user_errors
def select(config: ConfigArg,
           grid: Annotated[Path, typer.Argument(help="Selection grid YAML file: attackers the durability grid "
                                                     "you report does not hold (configs/grids/digits-select.yaml).",
                                                show_default=False)],
           set_: SetOpt = None,
           variant: Annotated[str, typer.Option(help="Which of the study's variants to choose from.")] = "meta",
           tolerance: Annotated[float, typer.Option(help="How much (as a share) a model may trail another on a "
                                                         "rate (before-attack quality, collateral) and still "
                                                         "be chosen.")] = 0.05,
           to: Annotated[Optional[Path], typer.Option(help="Copy the chosen model to this new folder.")] = None,
           collateral: Annotated[bool, typer.Option("--collateral/--no-collateral", help=(
               "Whether unrelated accuracy lost in the attacks can rule a model out (it trades against the "
               "window)."))] = True):
    """Attack each seed's unlearned model with a selection grid and name the one to release: the lowest
    relearning window among those no other model beats on quality or collateral (unlearns what is missing
    first)."""
    from .durability import load_grid
    from .selection import run_select, table

    cfg, spec = _config(config, set_), load_grid(grid)
    selection = run_select(cfg, spec, variant=variant, tolerance=tolerance, to=to, log=lambda _: None,
                           collateral=collateral)
    typer.echo(table(selection))
    typer.echo(f"selection: {cfg.run_dir() / f'selection-{variant}-{spec.name}.json'}")
    if to is not None and selection["chosen"] and not selection["failed"]:
        typer.echo(f"released: {to}")
    elif to is not None:
        typer.echo(f"nothing copied to {to}: the selection is incomplete", err=True)
    if selection["failed"] or not selection["chosen"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def run(config: ConfigArg, set_: SetOpt = None,
        progress: Annotated[bool, typer.Option("--progress/--quiet", help="Show the study's progress bar.")] = True,
        executor: Annotated[str, typer.Option(help="'sequential' (one process), or 'ray': the stage graph as Ray "
                                                   "tasks (pip install 'metaunlearn\\[ray]').")] = "sequential",
        address: Annotated[Optional[str], typer.Option(
            help="With --executor ray: a running Ray cluster ('auto', 'ray://host:10001'); default: a local one.")
        ] = None,
        workers: Annotated[Optional[int], typer.Option(min=1, help="With --executor ray and no address: CPUs of "
                                                                   "the local Ray (default: every core).")] = None):
    """Run (or resume) every stage of a study and write its report; exits non-zero if a stage failed."""
    if executor != "ray" and (address or workers):
        raise MetaunlearnError("--address and --workers apply to --executor ray only")
    if address and workers:
        raise MetaunlearnError("--workers sizes a local Ray; a cluster at --address has its own")
    cfg = _config(config, set_)
    if executor == "ray":
        from .ray_executor import run_study_on_ray

        _finish(run_study_on_ray(cfg, address=address, workers=workers, progress=progress))
    elif executor == "sequential":
        from .study import run_study

        _finish(run_study(cfg, progress=progress))
    else:
        raise MetaunlearnError(f"--executor '{executor}' is not known; use sequential or ray")


@app.command()
@user_errors
def report(run_dir: Annotated[Path, typer.Argument(help="The run folder of a study (`metaunlearn run`).",
                                                   show_default=False)]):
    """Write report.html, report.md and results.json from the files in a run folder."""
    from .report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run folder for the demo's outputs.")] = Path("runs/demo"),
):
    """The packaged study on the built-in digits world (base vs meta, 2 seeds, 3 attacks), on a CPU."""
    from .demo import run_demo

    _finish(run_demo(out), printed=True)


@app.command()
@user_errors
def export(
    model_dir: Annotated[str, typer.Argument(help="The unlearned model: a diffusers pipeline folder or hub id.",
                                             show_default=False)],
    base: Annotated[str, typer.Option(help="The original it was unlearned from: a folder, a hub id, or a "
                                           "built-in world ('digits').", show_default=False)],
    as_: Annotated[str, typer.Option("--as", help="Export format (only 'lora').")] = "lora",
    rank: Annotated[Optional[int], typer.Option(help="Fixed LoRA rank (overrides --energy).")] = None,
    energy: Annotated[float, typer.Option(help="Without --rank: the smallest rank capturing this share of the "
                                               "UNet weight difference (squared norm).")] = 0.9,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Also carry the changed layers' bias "
                                       "differences (peft lora_bias): diffusers loads them, but cannot fuse "
                                       "them into a layer that has no bias.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: 'lora' next to the model "
                                                     "folder; NAME-lora here for a hub id).")] = None,
):
    """Export the UNet difference (model - base) as a LoRA that pipe.load_lora_weights(OUT) loads;
    writes OUT/export.json with what it captures."""
    from .export import export_lora, summary

    typer.echo(summary(export_lora(model_dir, base, out, rank=rank, energy=energy, bias=bias, fmt=as_)))


def _finish(outcome, printed: bool = False) -> None:
    if outcome.report is not None and not printed:
        typer.echo(f"report: {outcome.report}")
    for failure in outcome.failures:
        typer.echo(f"failed: {failure['stage']}: {failure['error']}", err=True)
    if outcome.failures:
        typer.echo(f"{len(outcome.failures)} stage(s) failed; see {outcome.run_dir / 'study.log'}", err=True)
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    from .engine import leave

    try:
        app()
    except SystemExit as done:  # typer ends with one, whatever the outcome
        leave(done.code)
    leave(0)
