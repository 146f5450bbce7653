"""The run folder: where every artifact of a study lives, what each depends
on (fingerprints), when a stage counts as done, and how files get there
(atomically: written under a temporary name and renamed, so an interrupted
stage never leaves anything that looks finished).

    <run>/study.yaml, study.log, timings.json, environment.json, failures.json
    <run>/data/<split>/{forget,related,unrelated}.safetensors, manifest.json
    <run>/unlearn/<label>/model/          released model (save_pretrained)
                         /checkpoints/    resumable
                         /run.json        fingerprint, seed, status
    <run>/eval/<label>.json, <label>.png  metric values of a model, a grid of its samples
    <run>/eval/cache/                     reference features, computed once per study
    <run>/attacks/<label>/<attack>-seed<s>/curve.json, samples-step<N>.png
    <run>/report.html, report.md, results.json

Every other module asks this one for paths, fingerprints and done-checks; it
imports nothing heavier than the config.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ROLES, AttackConfig, StudyConfig, with_prompt_file_digest

STUDY_FILE, LOG, TIMINGS, FAILURES, ENVIRONMENT = "study.yaml", "study.log", "timings.json", "failures.json", \
    "environment.json"
RUN_STATUS, MODEL, CURVE, MANIFEST = "run.json", "model", "curve.json", "manifest.json"
DATA_FORMAT = 2  # bump when the cached concept data change meaning (2: generated roles' own seeds)
ORIGINAL = "original"


# ----------------------------------------------------------------- atomic files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp create private (0600, 0700) paths; a released model or report is read by others
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and
    renamed onto `path`, on failure removed. The one way files are written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """The rename itself to disk (a power cut, not only a kill, then finds the new file or the old one)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`, swapped into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        for attempt in range(3):
            if path.exists():  # out of the way first: a kill between the renames leaves no half-deleted folder
                trash = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
                with contextlib.suppress(FileNotFoundError):  # another writer moved it away meanwhile
                    os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(tmp, path)
                _sync_folder(path.parent)
                break
            except OSError as err:  # another writer of the same folder (an orphaned worker) got there between
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing): processes of one machine that would
    make the same cached file (Ray's workers) take turns, and the second finds the first one's."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks (some network mounts): no turns, as before locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from disk; {} when missing or unreadable (never half-written: see atomic_file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------- variants and labels
@dataclass(frozen=True)
class Unlearned:
    """One unlearned model of a study."""

    variant: str  # 'base' or 'meta'
    seed: int
    config: StudyConfig  # the study config with meta.enabled set for the variant
    label: str  # its folder name under unlearn/


def variant_config(config: StudyConfig, variant: str) -> StudyConfig:
    """The config of one variant of a study: 'base' (meta off) or 'meta' (meta on)."""
    return config.model_copy(update={"meta": config.meta.model_copy(update={"enabled": variant == "meta"})})


def unlearn_label(config: StudyConfig, seed: int) -> str:
    if config.method.name == "none":
        name = "meta-only"
    else:
        name = f"{config.method.name}-meta" if config.meta.enabled else config.method.name
    return f"{name}-seed{seed}"


def unlearned_models(config: StudyConfig) -> list[Unlearned]:
    out = []
    for variant in config.variants:
        vcfg = variant_config(config, variant)
        out += [Unlearned(variant, seed, vcfg, unlearn_label(vcfg, seed)) for seed in config.seeds]
    return out


def attack_seeds(config: StudyConfig, attack: AttackConfig, unlearn_seed: int | None) -> list[int]:
    """The attack's own seeds, else the unlearning run's seed (one attack per unlearned
    model, so cost stays linear in seeds). The original model is the reference that
    tells relearning from an attack that destroys everything: its first seed suffices."""
    if attack.seeds:
        return list(attack.seeds)
    return list(config.seeds[:1]) if unlearn_seed is None else [unlearn_seed]


# ----------------------------------------------------------------- the folder
class RunLayout:
    """Paths of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of(cls, config: StudyConfig) -> RunLayout:
        return cls(config.run_dir())

    def file(self, name: str) -> Path:
        return self.root / name

    def data_root(self) -> Path:
        return self.root / "data"

    def data(self, split: str) -> Path:
        return self.data_root() / split

    def unlearn(self, label: str) -> Path:
        return self.root / "unlearn" / label

    def model(self, label: str) -> Path:
        return self.unlearn(label) / MODEL

    def eval(self, label: str) -> Path:
        return self.root / "eval" / f"{label}.json"

    def eval_grid(self, label: str) -> Path:
        return self.eval(label).with_suffix(".png")

    def eval_cache(self) -> Path:
        """What metrics compute once per study and reuse (reference features for FID/KID)."""
        return self.root / "eval" / "cache"

    def attacks(self, label: str) -> Path:
        return self.root / "attacks" / label

    def attack(self, label: str, attack: str, seed: int) -> Path:
        return self.attacks(label) / f"{attack}-seed{seed}"

    def released(self, label: str) -> bool:
        """The original, or an unlearned model whose run finished and whose folder is there."""
        if label == ORIGINAL:
            return True
        return read_json(self.unlearn(label) / RUN_STATUS).get("status") == "done" and model_complete(self.model(label))


def released_fingerprint(status: dict) -> str | None:
    """The fingerprint of the model an unlearning folder's model/ holds, from its run.json: the run's
    own once done; while a run with other inputs is under way, the finished one it will replace (model/
    changes only at the end of a run; its done record is kept under 'released'). Going back to those inputs
    restores that record without training
    (unlearn.unlearn); meanwhile the folder counts as not released (no report or card of it)."""
    return status.get("fingerprint") if status.get("status") == "done" else (status.get("released") or {}).get(
        "fingerprint")


def released_record(folder: Path) -> dict | None:
    """The done record of the model an unlearning folder's model/ holds (see released_fingerprint), or None
    when model/ is no complete model."""
    status = read_json(Path(folder) / RUN_STATUS)
    if not model_complete(Path(folder) / MODEL):
        return None
    return (status if status.get("status") == "done" else status.get("released")) or None


def model_complete(folder: Path) -> bool:
    """A saved pipeline folder with its index and its UNet's weights (what unlearning changes):
    a folder whose weights were deleted or never finished writing is not a model."""
    unet = Path(folder) / "unet"
    return (Path(folder) / "model_index.json").is_file() and unet.is_dir() and \
        any(p.suffix == ".safetensors" and p.stat().st_size > 0 for p in unet.iterdir())


def model_label(model_dir: str | os.PathLike | None) -> str:
    """'original' for the study's model, else the run folder's name (unlearn/<label>/model)."""
    if model_dir is None:
        return ORIGINAL
    path = Path(model_dir)
    return path.parent.name if path.name == MODEL else path.name


def unlearn_seed_of(model_dir: str | os.PathLike | None) -> int | None:
    """The unlearning seed recorded beside a released model; None for the original or a foreign folder."""
    if model_dir is None:
        return None
    seed = read_json(Path(model_dir).parent / RUN_STATUS).get("seed")
    return seed if isinstance(seed, int) else None


def needs_attack_split(attacks: list[AttackConfig]) -> bool:
    """Whether an attacker finetunes on a role's held-out attack split (the others bring their own data)."""
    return any(isinstance(a.data, str) for a in attacks)


# ----------------------------------------------------------------- fingerprints
def data_fingerprint(config: StudyConfig) -> str:
    return config.fingerprint("model", "concepts", "data")


def outside_inputs(config: StudyConfig) -> dict:
    """What a stage's output depends on that the config's text does not show: the files of the concepts'
    image folders, the seeding of generated images (DATA_FORMAT) when a role is generated, and the model
    under `model.source` when it is a folder: a released model of another run (a study on top of
    another's) by that run, any other folder of weights by its files. Empty for studies of a built-in
    world or a hub id on real images, so their fingerprints stay the config's."""
    from .imagefolder import signature

    out: dict = {}
    folders = {role: signature(spec.images) for role in ROLES
               if (spec := getattr(config.concepts, role)).images}
    if folders:
        out["folders"] = folders
    if any(getattr(config.concepts, role).generated() for role in ROLES):
        out["generated"] = DATA_FORMAT  # how generated images are seeded: models trained on them depend on it
    source = config.model.source
    if (Path(source).expanduser().parent / RUN_STATUS).is_file() or folder_of_weights(source):
        out["source"] = model_identity(source)  # another run's model, or a folder by its files
    return out


def data_manifest_key(config: StudyConfig) -> dict:
    """What a split's cache must have been made from to serve this config: the data
    fingerprint and the signatures of its image folders (files change without the config)."""
    outside = outside_inputs(config)
    key = {"format": DATA_FORMAT, "fingerprint": data_fingerprint(config), "folders": outside.get("folders", {})}
    return {**key, "source": outside["source"]} if "source" in outside else key


def unlearn_fingerprint(config: StudyConfig, seed: int) -> str:
    """What an unlearned model depends on: the meta section only when meta is on, so
    tuning meta leaves a finished base model alone; what the judge reads when the method chooses
    between candidate edits by sampling (RECE); and the inputs outside the config."""
    from .registry import METHODS

    sections = ("model", "concepts", "data", "method") + (("meta",) if config.meta.enabled else ())
    outside = outside_inputs(config)
    if METHODS.get(config.method.name, "method.name").impl.judges_edits:
        outside = {**outside, "judge": judge_inputs(config)}
    text = config.fingerprint(*sections)
    return f"{digest(text, outside) if outside else text}-{seed}"


def model_identity(source: str | os.PathLike) -> str:
    """A released model's identity: the fingerprint of the run that made what its folder holds when it
    has one; a folder of weights from elsewhere by its path and files (retrained in place, it is another
    model); a built world's folder (named by its own config's hash) or a hub id by its name."""
    from .imagefolder import signature

    fingerprint = released_fingerprint(read_json(Path(source).parent / RUN_STATUS))
    if fingerprint:
        return fingerprint
    return f"{source}#{signature(Path(source).expanduser())}" if folder_of_weights(source) else str(source)


def folder_of_weights(source: str | os.PathLike) -> bool:
    """Whether `source` is a local folder of weights, known by its files: not a built-in world's name (a
    folder of that name here is not what loads) nor a built world's cache folder (named by its config's
    hash, and built once)."""
    from .registry import WORLDS
    from .worlds import worlds_root

    path = Path(source).expanduser()
    if str(source) in WORLDS or not path.is_dir():
        return False
    return path.resolve().parent != worlds_root().resolve()


# What a method that picks among candidate edits by the forget rate of held-out samples (RECE's judge,
# unlearn.forget_judge) reads of the evaluation section, besides the forget prompts
JUDGE_READS = ("samples_per_prompt", "steps", "guidance_scale", "seed_offset", "half_precision", "concept_rate")


def label_free_clip(evaluation) -> bool:
    """Whether the concept rate's detector is clip without labels: it judges each image against every
    evaluation prompt, so RECE's judge keeps the other roles' prompts (unlearn._keep_clip_candidates) and
    depends on them ('auto' never picks clip)."""
    if "concept_rate" not in evaluation.metrics:
        return False
    section = evaluation.options("concept_rate")
    return section.detector == "clip" and not section.options("clip").labels


def judge_inputs(config: StudyConfig) -> dict:
    """How the judge samples and judges, and the forget prompts it samples (a prompt file by content): not
    the metrics or batch size, which leave its verdicts as they are, nor the other roles' prompts, except
    for a label-free clip detector, which judges against them (unlearn._keep_clip_candidates)."""
    from .prompt_files import file_digest

    evaluation = config.evaluation.model_dump(mode="json")
    read = ["forget"] + ["related", "unrelated"] * label_free_clip(config.evaluation)
    given = {role: evaluation["prompts"].get(role) for role in read}
    return {**{k: evaluation.get(k) for k in JUDGE_READS},
            **{role: f"{p}#{file_digest(p)}" if isinstance(p, str) else p for role, p in given.items()
               if role == "forget" or p}}


def evaluation_fingerprint(config: StudyConfig, source: str | os.PathLike) -> str:
    outside = outside_inputs(config)
    return digest(model_identity(source), config.fingerprint("model", "concepts", "evaluation"),
                  *([outside] if outside else []))


NOT_RECORDED = object()


def attack_fingerprint(config: StudyConfig, attack: AttackConfig, seed: int, source: str | os.PathLike,
                       recorded_seeds: Any = NOT_RECORDED) -> str:
    """`recorded_seeds`: the fingerprint a curve made before an attack's seed list was left out of it holds,
    with the list that curve recorded (so such curves stay valid)."""
    outside = outside_inputs(config)
    inputs = attack_inputs(attack)
    if recorded_seeds is not NOT_RECORDED:
        inputs["seeds"] = recorded_seeds
    return digest(inputs, seed, model_identity(source),
                  config.fingerprint("model", "concepts", "data", "evaluation"), *([outside] if outside else []))


def attack_inputs(attack: AttackConfig) -> dict:
    """The attack's settings (but its list of seeds: a curve is one seed's), with its own concept's prompt file
    by content and image folder by signature."""
    from .imagefolder import signature

    dumped = attack.curve_settings()
    data = dumped["data"]
    if isinstance(data, dict):
        with_prompt_file_digest(data)
        if data.get("images"):
            data["images_signature"] = signature(data["images"])
        if attack.data.generated():
            data["generated"] = DATA_FORMAT
    return dumped


# ----------------------------------------------------------------- done checks
def data_done(config: StudyConfig, split: str) -> bool:
    folder = RunLayout.of(config).data(split)
    manifest = read_json(folder / MANIFEST)
    return bool(manifest) and all(manifest.get(k) == v for k, v in data_manifest_key(config).items()) and all(
        _nonempty(folder / f"{role}.safetensors") for role, n in manifest.get("counts", {}).items() if n is not None)


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def unlearn_done(config: StudyConfig, seed: int) -> bool:
    layout, label = RunLayout.of(config), unlearn_label(config, seed)
    status = read_json(layout.unlearn(label) / RUN_STATUS)
    return status.get("fingerprint") == unlearn_fingerprint(config, seed) and layout.released(label)


def evaluation_done(config: StudyConfig, source: str | os.PathLike, label: str) -> bool:
    layout = RunLayout.of(config)
    return read_json(layout.eval(label)).get("fingerprint") == evaluation_fingerprint(config, source) and \
        layout.eval_grid(label).is_file()


def attack_done(config: StudyConfig, attack: AttackConfig, seed: int, source: str | os.PathLike,
                label: str) -> bool:
    curve = read_json(RunLayout.of(config).attack(label, attack.name, seed) / CURVE)
    if not curve.get("points"):
        return False
    if curve.get("fingerprint") == attack_fingerprint(config, attack, seed, source):
        return True
    # made before the seed list was left out of the fingerprint: the same settings, with the list it recorded
    recorded = curve.get("attack") or {}
    return "seeds" in recorded and attack.made_curve(curve) and \
        curve.get("fingerprint") == attack_fingerprint(config, attack, seed, source, recorded["seeds"])
