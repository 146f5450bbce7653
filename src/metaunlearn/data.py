"""Concept data: the forget, related and unrelated sets of the paper (hrm, tgt,
irt), per split, as VAE latents + one text embedding per unique prompt.

Training never runs the text encoder or the VAE per step: every image is
encoded once here and every caption once, and both are cached under
`cache_dir/<split>/` with a manifest that says what made them. A role's images
come from a built-in world's dataset (`classes`), an image folder (`images`),
or, as in the paper, from the model itself (`prompts` only).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import imagefolder
from .conditioning import Conditioning
from .config import ROLES, RoleConfig, StudyConfig, with_prompt_file_digest
from .errors import MetaunlearnError
from .images import grid, save_png
from .layout import DATA_FORMAT, MANIFEST, atomic_file, data_manifest_key, write_json
from .model import DiffusionModel
from .worlds import Chunks, world_for

SPLITS = ("train", "test", "attack")  # train: unlearning + meta; test: held out; attack: the attacker's only
# Generated images: seed = base(role) + base(split) + prompt_number * SEEDS_PER_PROMPT + i. Split bases
# 1e9 apart (not 1e6) keep the splits disjoint for up to 100k prompts, not just 100; role bases keep the
# roles apart, so a forget prompt and a related one never start from the same noise (images drawn from
# one noise share their layout, which would tie the roles' data together), and clear of the evaluation
# seeds (evaluation.seed_offset, 3e9 by default) for the same reason.
SPLIT_SEED_BASE = {"train": 0, "test": 1_000_000_000, "attack": 2_000_000_000}
ROLE_SEED_BASE = {"forget": 0, "related": 100_000_000_000, "unrelated": 200_000_000_000}
OTHER_ROLE_SEED_BASE = 300_000_000_000  # an attacker's own concept
SEEDS_PER_PROMPT = 10_000


@dataclass
class RoleData:
    role: str
    latents: torch.Tensor  # (N, C, h, w) float32 scaled VAE latents
    prompt_index: torch.Tensor  # (N,) long, index into prompts
    prompts: list[str]  # unique captions
    cond: Conditioning  # row i encodes prompts[i]
    sources: list[str]  # per item: "digits:train:123", "generated:seed=17", "folder:img.png"

    def __post_init__(self):
        n = len(self.latents)
        if len(self.prompt_index) != n or len(self.sources) != n or len(self.cond) != len(self.prompts):
            raise ValueError(f"inconsistent role data '{self.role}': {n} latents, {len(self.prompt_index)} indices, "
                             f"{len(self.sources)} sources, {len(self.prompts)} prompts, {len(self.cond)} rows")

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, Conditioning]:
        return self.latents[index], self.cond[self.prompt_index[index]]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
        return self.batch(torch.randint(0, len(self), (n,), generator=generator))

    def save(self, path: Path) -> None:
        tensors = {"latents": self.latents.contiguous(), "prompt_index": self.prompt_index.contiguous(),
                   **self.cond.to_tensors("cond.")}
        metadata = {"format": str(DATA_FORMAT), "role": self.role, "prompts": json.dumps(self.prompts),
                    "sources": json.dumps(self.sources)}
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> RoleData:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(meta["role"], tensors["latents"], tensors["prompt_index"], json.loads(meta["prompts"]),
                   Conditioning.from_tensors(tensors, "cond."), json.loads(meta["sources"]))

    @staticmethod
    def concat(parts: list[RoleData], role: str) -> RoleData:
        """One set from several (e.g. related + unrelated for a preservation loss);
        a prompt shared by parts keeps one conditioning row."""
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("concat needs at least one RoleData")
        prompts, rows, indices = [], [], []
        for part in parts:
            for i, text in enumerate(part.prompts):
                if text not in prompts:
                    prompts.append(text)
                    rows.append(part.cond[i])
            remap = torch.tensor([prompts.index(t) for t in part.prompts], dtype=torch.long)
            indices.append(remap[part.prompt_index])
        return RoleData(role, torch.cat([p.latents for p in parts]), torch.cat(indices), prompts,
                        Conditioning.cat(rows), [s for p in parts for s in p.sources])


@dataclass
class ConceptData:
    forget: RoleData
    related: RoleData | None
    unrelated: RoleData | None
    split: str


def _folder_feed(items: list[imagefolder.FolderItem], size: int, batch: int) -> tuple[int, Chunks]:
    chunks = ((torch.stack([imagefolder.load_image(it.path, size) for it in items[i:i + batch]]),
               [it.text for it in items[i:i + batch]], [f"folder:{it.name}" for it in items[i:i + batch]])
              for i in range(0, len(items), batch))
    return len(items), chunks


def _generated_feed(name: str, prompts: list[str], split: str, config: StudyConfig,
                    model: DiffusionModel) -> tuple[int, Chunks]:
    data = config.data
    if data.images_per_prompt > SEEDS_PER_PROMPT:
        raise MetaunlearnError(f"data.images_per_prompt is at most {SEEDS_PER_PROMPT}")
    base = ROLE_SEED_BASE.get(name, OTHER_ROLE_SEED_BASE) + SPLIT_SEED_BASE[split]
    jobs = [(p, base + k * SEEDS_PER_PROMPT + i)
            for k, p in enumerate(prompts) for i in range(data.images_per_prompt)]

    def chunks() -> Chunks:
        for i in range(0, len(jobs), data.batch_size):
            texts, seeds = map(list, zip(*jobs[i:i + data.batch_size]))
            images = model.sample(texts, seeds, steps=data.generation_steps, guidance_scale=data.guidance_scale,
                                  batch_size=data.batch_size, progress=False)  # our bar counts the whole role
            yield images * 2 - 1, texts, [f"generated:seed={s}" for s in seeds]

    return len(jobs), chunks()


def _build_role(name: str, role: RoleConfig, config: StudyConfig, model: DiffusionModel, split: str,
                preview: Path, progress: bool, where: str = "") -> RoleData | None:
    where, batch = where or f"concepts.{name}", config.data.batch_size
    feeds = []
    if role.classes:
        world = world_for(config.model)
        if world is None:
            raise MetaunlearnError(f"{where}.classes needs a built-in world as model.source")
        feeds.append(world.class_feed(role, split, model, batch))
    if role.images:
        whole = split == "attack" and where.startswith("attacks.") and not imagefolder.has_split_folders(
            Path(role.images))  # an attacker's own folder without split subfolders is all its data
        items = imagefolder.read_items(role.images, "train" if whole else split, f"{where}.images")
        feeds.append(_folder_feed(items, model.image_size, batch))
    if role.generated():  # prompts beside classes or images are their captions only
        feeds.append(_generated_feed(name, role.all_prompts(), split, config, model))

    latents, captions, origins, shown = [], [], [], []
    with tqdm(total=sum(n for n, _ in feeds), desc=f"{name} ({split})", unit="img", disable=not progress,
              leave=False) as bar:
        for _, chunks in feeds:
            for images, texts, came_from in chunks:
                latents.append(model.encode_images(images, batch_size=batch).float().cpu())
                captions += texts
                origins += came_from
                if sum(map(len, shown)) < 16:
                    shown.append(images[:16].float().cpu())
                bar.update(len(images))
    if not captions:
        return None
    prompts = list(dict.fromkeys(captions))
    position = {p: i for i, p in enumerate(prompts)}
    cond = model.encode_prompts(prompts, batch_size=batch).to("cpu", torch.float32)
    with atomic_file(preview) as tmp:  # a glance at what the role trains on; nothing reads it back
        save_png(grid((torch.cat(shown)[:16] + 1) / 2, nrow=8, scale=max(1, 64 // model.image_size)), tmp)
    return RoleData(name, torch.cat(latents), torch.tensor([position[c] for c in captions], dtype=torch.long),
                    prompts, cond, origins)


def _load_cached(folder: Path, key: dict) -> dict[str, RoleData | None] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if any(manifest.get(k) != v for k, v in key.items()):
            return None
        return {name: None if manifest["counts"][name] is None else RoleData.load(folder / f"{name}.safetensors")
                for name in ROLES}
    except (OSError, ValueError, KeyError, SafetensorError):  # absent, unreadable or partial: recompute
        return None


def prepare_concept_data(config: StudyConfig, model: DiffusionModel | Callable[[], DiffusionModel], split: str,
                         cache_dir: Path, progress: bool = True, log: Callable[[str], None] = print) -> ConceptData:
    """The three roles of one split, from the cache when nothing that determines them changed.
    `model` may be a loader, called only when the cache cannot serve the split."""
    if split not in SPLITS:
        raise MetaunlearnError(f"unknown data split '{split}'; choose one of {', '.join(SPLITS)}")
    from .layout import exclusive

    with exclusive(Path(cache_dir) / f".{split}.lock"):  # Ray's workers: one makes it, the others read it
        return _prepare_concept_data(config, model, split, Path(cache_dir) / split, progress, log)


def _prepare_concept_data(config: StudyConfig, model, split: str, folder: Path, progress: bool,
                          log: Callable[[str], None]) -> ConceptData:
    key = data_manifest_key(config)
    cached = _load_cached(folder, key)
    if cached is not None:
        log(f"concept data ({split}): cached")
        return ConceptData(**cached, split=split)

    if not isinstance(model, DiffusionModel):
        model = model()
    folder.mkdir(parents=True, exist_ok=True)
    # No manifest while the role files change: a stale one must never vouch for new files.
    (folder / MANIFEST).unlink(missing_ok=True)
    roles: dict[str, RoleData | None] = {}
    for name in ROLES:
        role = getattr(config.concepts, name)
        data = None
        if role.given():
            data = _build_role(name, role, config, model, split, folder / f"{name}.png", progress)
        if data is None and name == "forget":
            hint = (f": image folder '{role.images}' has no {split}/ subfolder (a folder without "
                    f"train/, test/, attack/ subfolders is train data only)") if role.images else ""
            raise MetaunlearnError(f"concepts.forget has no data for the '{split}' split{hint}")
        if data is not None:
            data.save(folder / f"{name}.safetensors")
        else:  # leftovers of an earlier config must not pass for this one's
            for stale in (folder / f"{name}.safetensors", folder / f"{name}.png"):
                stale.unlink(missing_ok=True)
        roles[name] = data
    counts = {name: None if d is None else len(d) for name, d in roles.items()}
    write_json(folder / MANIFEST, {**key, "split": split, "counts": counts})
    summary = ", ".join(f"{name} {n}" for name, n in counts.items() if n is not None)
    log(f"concept data ({split}): {summary} items -> {folder}")
    return ConceptData(**roles, split=split)


def prepare_role(config: StudyConfig, name: str, spec: RoleConfig, model: DiffusionModel | Callable[[], DiffusionModel],
                 split: str, folder: Path, progress: bool = True) -> RoleData:
    """One role outside the study's three (e.g. an attacker's own concept), cached in
    `folder` under `name` with the key of what made it; `model` may be a loader."""
    from .layout import exclusive

    with exclusive(Path(folder) / f".{name}.lock"):  # attacks on several models under Ray make it once
        return _prepare_role(config, name, spec, model, split, folder, progress)


def _prepare_role(config: StudyConfig, name: str, spec: RoleConfig, model, split: str, folder: Path,
                  progress: bool) -> RoleData:
    from .layout import digest, read_json

    key = digest(data_manifest_key(config), with_prompt_file_digest(spec.model_dump(mode="json")), split,
                 imagefolder.signature(spec.images) if spec.images else None)
    path, manifest = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"
    if read_json(manifest).get("key") == key:
        try:
            return RoleData.load(path)
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # damaged: made again below
    if not isinstance(model, DiffusionModel):
        model = model()
    manifest.unlink(missing_ok=True)
    role = _build_role(name, spec, config, model, split, Path(folder) / f"{name}.png", progress, where=name)
    if role is None:
        raise MetaunlearnError(f"{name} has no data for the '{split}' split")
    role.save(path)
    write_json(manifest, {"key": key, "items": len(role)})
    return role
