"""Concept data: generated, image-folder and world-class roles, splits, caching, RoleData."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn import Conditioning, ConfigError, DiffusionModel, MetaunlearnError
from metaunlearn.config import ModelConfig, StudyConfig
from metaunlearn.data import ConceptData, RoleData, prepare_concept_data
from metaunlearn.metrics import evaluation_roles
from metaunlearn.worlds import resolve_model_source, world_for
from metaunlearn.worlds.digits import build as digits
from metaunlearn.worlds.digits.dataset import load_split, prompts_for

EIGHT, DOG = "a photo of the digit eight", "a dog"
FAST = {"images_per_prompt": 2, "generation_steps": 2, "batch_size": 4}


def study(concepts: dict, source: str = "digits", **data) -> StudyConfig:
    return StudyConfig.from_dict({"model": {"source": source}, "concepts": concepts, "data": {**FAST, **data}})


def prepare(config, model, split, cache_dir) -> ConceptData:
    return prepare_concept_data(config, model, split, cache_dir, progress=False, log=lambda *_: None)


def refuse_sampling(model, monkeypatch):
    monkeypatch.setattr(model, "sample", lambda *a, **k: pytest.fail("generated images that should not be"))


# ----------------------------------------------------------------- generated roles
def test_generated_seed_ranges_are_apart_from_each_other_and_from_evaluation():
    """Images drawn from one noise share their layout: no two roles or splits of generated data, and no
    evaluation sample (the default seed_offset, the held-out judge's above it), may start from one seed."""
    from metaunlearn.config import EvaluationConfig
    from metaunlearn.data import OTHER_ROLE_SEED_BASE, ROLE_SEED_BASE, SEEDS_PER_PROMPT, SPLIT_SEED_BASE
    from metaunlearn.metrics.evaluate import SEED_STRIDE
    from metaunlearn.unlearn import HELD_OUT_SEEDS

    prompts = 100_000  # what the split bases are spaced for
    ranges = [(r + s, r + s + prompts * SEEDS_PER_PROMPT) for r in [*ROLE_SEED_BASE.values(), OTHER_ROLE_SEED_BASE]
              for s in SPLIT_SEED_BASE.values()]
    offset = EvaluationConfig().seed_offset
    ranges.append((offset, offset + HELD_OUT_SEEDS + prompts * SEED_STRIDE))
    ranges.sort()
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))


def test_prompt_role_is_generated_per_split_deterministic_and_cached(tiny_model, tmp_path, monkeypatch, capsys):
    config = study({"forget": {"prompts": [EIGHT, DOG]}, "unrelated": {"prompts": ["a cat"]}})
    train = prepare_concept_data(config, tiny_model, "train", tmp_path / "a", progress=False)
    assert train.split == "train" and train.related is None
    forget = train.forget
    assert len(forget) == 4 and forget.latents.shape == (4, *tiny_model.latent_shape)
    assert forget.latents.dtype == torch.float32 and torch.isfinite(forget.latents).all()
    assert forget.prompts == [EIGHT, DOG] and forget.prompt_index.tolist() == [0, 0, 1, 1]
    assert forget.sources[0].startswith("generated:seed=") and len(set(forget.sources)) == 4
    assert torch.allclose(forget.cond.hidden, tiny_model.encode_prompts([EIGHT, DOG]).hidden)
    assert len(train.unrelated) == 2 and train.unrelated.prompts == ["a cat"]
    # each role from its own noise: images drawn from one noise share their layout
    assert not set(train.unrelated.sources) & set(forget.sources)
    assert "concept data (train): forget 4, unrelated 2" in capsys.readouterr().out
    assert (tmp_path / "a" / "train" / "forget.png").is_file()

    test = prepare(config, tiny_model, "test", tmp_path / "a")
    assert not set(test.forget.sources) & set(forget.sources)
    assert not torch.allclose(test.forget.latents, forget.latents)

    again = prepare(config, tiny_model, "train", tmp_path / "b")  # recomputed in a fresh cache
    assert torch.equal(again.forget.latents, forget.latents) and again.forget.sources == forget.sources

    refuse_sampling(tiny_model, monkeypatch)
    cached = prepare_concept_data(config, tiny_model, "train", tmp_path / "a", progress=False)
    assert "concept data (train): cached" in capsys.readouterr().out
    assert torch.equal(cached.forget.latents, forget.latents) and cached.related is None
    manifest = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())
    assert manifest["counts"] == {"forget": 4, "related": None, "unrelated": 2}
    assert manifest["fingerprint"] == config.fingerprint("model", "concepts", "data")
    assert not [p for p in (tmp_path / "a" / "train").iterdir() if p.name.startswith(".")]  # no temporaries

    changed = study({"forget": {"prompts": [EIGHT, DOG]}}, images_per_prompt=3)
    with pytest.raises(pytest.fail.Exception):  # a changed config is not served from the cache
        prepare(changed, tiny_model, "train", tmp_path / "a")
    assert not (tmp_path / "a" / "train" / "manifest.json").exists()  # the stale manifest went first


# ----------------------------------------------------------------- image folders
def write_folder(folder, entries: dict[str, str], sizes=((40, 48), (32, 32), (64, 40))):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    lines = []
    for k, (name, text) in enumerate(entries.items()):
        Image.new("RGB", sizes[k % len(sizes)], colors[k % len(colors)]).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_the_data_batch_size_changes_generated_data_by_rounding_only(tiny_model, tmp_path):
    """Every generated image draws from its own seed: what lets data.batch_size stay out of fingerprints."""
    roles = {"forget": {"prompts": [EIGHT, DOG]}}
    four = prepare(study(roles), tiny_model, "train", tmp_path / "a").forget
    one = prepare(study(roles, batch_size=1), tiny_model, "train", tmp_path / "b").forget
    assert one.sources == four.sources
    torch.testing.assert_close(one.latents, four.latents, rtol=0, atol=1e-4)


def test_imagefolder_role_loads_captions_and_splits(tiny_model, tmp_path, monkeypatch):
    flat = write_folder(tmp_path / "flat", {"r.png": EIGHT, "g.png": DOG, "b.png": EIGHT})
    refuse_sampling(tiny_model, monkeypatch)  # prompts beside images are captions, never generated
    config = study({"forget": {"images": str(flat), "prompts": ["a cat"]}})
    forget = prepare(config, tiny_model, "train", tmp_path / "cache").forget
    assert forget.prompts == [EIGHT, DOG] and forget.prompt_index.tolist() == [0, 1, 0]
    assert forget.sources == ["folder:r.png", "folder:g.png", "folder:b.png"]
    assert forget.latents.shape == (3, *tiny_model.latent_shape) and torch.isfinite(forget.latents).all()
    red = tiny_model.encode_images(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32))
    assert torch.allclose(forget.latents[0], red[0], atol=1e-4)  # resized + cropped, colour kept, [-1, 1]
    with pytest.raises(MetaunlearnError, match=r"no data for the 'test' split.*no test/ subfolder"):
        prepare(config, tiny_model, "test", tmp_path / "cache")

    split = tmp_path / "split"
    write_folder(split / "train", {"a.png": EIGHT, "b.png": EIGHT})
    write_folder(split / "attack", {"c.png": "a handwritten 8"})
    config = study({"forget": {"images": str(split)}, "related": {"images": str(flat)}})
    attack = prepare(config, tiny_model, "attack", tmp_path / "cache")
    assert attack.forget.sources == ["folder:attack/c.png"] and attack.forget.prompts == ["a handwritten 8"]
    assert attack.related is None  # a flat folder is train data only
    from metaunlearn.stages import preflight

    preflight(StudyConfig.from_dict({**config.model_dump(), "attacks": [{"name": "a", "data": "forget"}]}))
    flat_related = {**config.model_dump(), "attacks": [{"name": "a", "data": "related"}]}
    with pytest.raises(MetaunlearnError, match=r"concepts.related's attack split, but its image folder .* has no "
                                               r"attack/ subfolder"):  # found before any stage, not after training
        preflight(StudyConfig.from_dict(flat_related))
    # an attacker's own folder: flat, all of it is the attacker's; with split subfolders, its attack/ one
    write_folder(tmp_path / "no-attack" / "train", {"a.png": EIGHT})
    own = [{"name": "flat", "data": {"images": str(flat)}}, {"name": "split", "data": {"images": str(split)}}]
    preflight(StudyConfig.from_dict({**config.model_dump(), "attacks": own}))
    own = [{"name": "b", "data": {"images": str(tmp_path / "no-attack")}}]
    with pytest.raises(MetaunlearnError, match=r"attacks.b.data.images: .* has split subfolders but no attack/"):
        preflight(StudyConfig.from_dict({**config.model_dump(), "attacks": own}))
    assert prepare(config, tiny_model, "train", tmp_path / "cache").forget.sources == [
        "folder:train/a.png", "folder:train/b.png"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "has no images"),
    ("no_metadata", "has no metadata.jsonl"),
    ("missing_file", "line 2 names 'gone.png', which is not in"),
    ("no_text", "line 1 has no text"),
    ("absolute", "line 1 names '/etc/hostname', outside"),
    ("escapes", "line 1 names '../outside.png', outside"),
    ("not_utf8", "metadata.jsonl is not UTF-8 text"),
])
def test_imagefolder_mistakes_are_one_clear_line(tiny_model, tmp_path, case, message):
    folder = tmp_path / "images"
    if case == "empty":
        folder.mkdir()
    elif case != "missing":
        write_folder(folder, {"a.png": EIGHT})
        write_folder(tmp_path, {"outside.png": EIGHT})  # an image beside the folder, not in it
        lines = {"no_metadata": None, "not_utf8": None,
                 "missing_file": [{"file_name": "a.png", "text": EIGHT}, {"file_name": "gone.png", "text": DOG}],
                 "no_text": [{"file_name": "a.png"}],
                 "absolute": [{"file_name": "/etc/hostname", "text": EIGHT}],
                 "escapes": [{"file_name": "../outside.png", "text": EIGHT}]}[case]
        meta = folder / "metadata.jsonl"
        if case == "not_utf8":
            meta.write_bytes(b'{"file_name": "a.png", "text": "\xff\xfe"}')
        else:
            meta.unlink() if lines is None else meta.write_text("\n".join(map(json.dumps, lines)))
    config = study({"forget": {"prompts": [EIGHT]}, "related": {"images": str(folder)}})
    with pytest.raises(MetaunlearnError, match="concepts.related.images") as info:
        prepare(config, tiny_model, "train", tmp_path / "cache")
    assert message in str(info.value) and "\n" not in str(info.value)
    from metaunlearn.stages import preflight

    with pytest.raises(MetaunlearnError, match="concepts.related.images") as info:  # and before any stage
        preflight(config)
    assert message in str(info.value)
    preflight(config, unlearns=False, attacks=[])  # evaluating a model reads no image folder


# ----------------------------------------------------------------- digits world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METAUNLEARN_CACHE", str(tmp_path_factory.mktemp("cache")))
        return digits.get_world(digits.DigitsWorldConfig.reduced(), log=lambda *_: None)


def test_digits_roles_use_real_images_with_matching_captions(world, tmp_path):
    model = DiffusionModel.load(world)
    config = study({"forget": {"classes": ["eight"], "prompts": [EIGHT, "a handwritten 8", "a photo of a 3"]},
                    "related": {"classes": ["3"]}}, source=str(world))
    train = prepare(config, model, "train", tmp_path)
    eights = load_split("train", digits=[8])[0]
    assert len(train.forget) == len(eights) and train.forget.prompts == [EIGHT, "a handwritten 8"]
    assert train.forget.latents.shape == (len(eights), *model.latent_shape)
    assert torch.allclose(train.forget.latents[:4], model.encode_images(eights[:4]), atol=1e-5)
    assert set(train.related.prompts) == set(prompts_for(3))  # no prompt names three: its phrasings
    assert all(s.startswith("digits:train:") for s in train.forget.sources)

    attack = prepare(config, model, "attack", tmp_path)
    assert attack.forget.sources and all(s.startswith("digits:attack:") for s in attack.forget.sources)
    ids = lambda data: {s.rsplit(":", 1)[1] for s in data.sources}  # noqa: E731
    assert not ids(attack.forget) & ids(train.forget) and not ids(attack.related) & ids(train.related)
    folder_world = world_for(config.model)  # a copy of a world's folder is that world
    assert folder_world.name == "digits" and resolve_model_source(config.model) == world


def test_class_roles_need_a_world(tiny_pipeline_dir):
    with pytest.raises(ConfigError, match=r"concepts.forget.classes needs a built-in world as model.source"):
        study({"forget": {"classes": ["eight"]}}, source=str(tiny_pipeline_dir))
    assert world_for(ModelConfig(source=str(tiny_pipeline_dir))) is None


def test_resolve_model_source(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(digits, "get_world", lambda config, rebuild=False, log=print: calls.append(config) or tmp_path)
    assert resolve_model_source(ModelConfig(source="digits")) == tmp_path and calls == [digits.DigitsWorldConfig()]
    reduced = ModelConfig.model_validate({"source": "digits", "digits": {"preset": "reduced"}})
    assert resolve_model_source(reduced) == tmp_path and calls[-1] == digits.DigitsWorldConfig.reduced()
    wide = ModelConfig.model_validate({"source": "digits", "digits": {"preset": "wide"}})
    assert resolve_model_source(wide) == tmp_path  # the default world but for the UNet's channels, its own folder
    default, built = digits.DigitsWorldConfig(), calls[-1]
    assert built.pipeline.unet_channels == tuple(2 * c for c in default.pipeline.unet_channels)
    built.pipeline.unet_channels = default.pipeline.unet_channels
    assert built == default and digits.DigitsWorldConfig.wide().key() != default.key()
    hub = ModelConfig(source="CompVis/stable-diffusion-v1-4")
    assert resolve_model_source(hub) == "CompVis/stable-diffusion-v1-4"


def test_evaluation_prompts_of_a_class_role_come_from_the_world():
    config = study({"forget": {"classes": ["eight"], "prompts": [EIGHT]}, "related": {"classes": ["3", "one"]}})
    roles = evaluation_roles(config, world_for(config.model))
    assert roles == {"forget": [EIGHT], "related": prompts_for(3) + prompts_for(1)}


# ----------------------------------------------------------------- RoleData
def role(name, prompts, index, seed=0, sdxl=True) -> RoleData:
    g = torch.Generator().manual_seed(seed)
    n, p = len(index), len(prompts)
    added = {"text_embeds": torch.randn(p, 6, generator=g), "time_ids": torch.rand(p, 6, generator=g)} if sdxl else {}
    cond = Conditioning(torch.randn(p, 5, 8, generator=g), added)
    return RoleData(name, torch.randn(n, 4, 8, 8, generator=g), torch.tensor(index), prompts, cond,
                    [f"test:{seed}:{i}" for i in range(n)])


def assert_same(a: RoleData, b: RoleData):
    assert (a.role, a.prompts, a.sources) == (b.role, b.prompts, b.sources)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_index, b.prompt_index)
    assert a.prompt_index.dtype == torch.long and torch.equal(a.cond.hidden, b.cond.hidden)
    assert a.cond.added.keys() == b.cond.added.keys()
    assert all(torch.equal(a.cond.added[k], b.cond.added[k]) for k in a.cond.added)


def test_role_data_round_trip_batch_sample_concat(tmp_path):
    data = role("forget", ["p0", "p1", "p2"], [2, 0, 1, 1, 2])
    data.save(tmp_path / "forget.safetensors")
    assert_same(RoleData.load(tmp_path / "forget.safetensors"), data)
    assert [p.name for p in tmp_path.iterdir()] == ["forget.safetensors"]

    index = torch.tensor([4, 0, 4])
    latents, cond = data.batch(index)
    assert torch.equal(latents, data.latents[index]) and len(cond) == 3
    assert torch.equal(cond.hidden[1], data.cond.hidden[2]) and torch.equal(cond.hidden[0], data.cond.hidden[2])
    assert torch.equal(cond.added["text_embeds"][2], data.cond.added["text_embeds"][2])

    a = data.sample(16, torch.Generator().manual_seed(3))
    b = data.sample(16, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].hidden, b[1].hidden) and a[0].shape == (16, 4, 8, 8)
    for latent, hidden in zip(a[0], a[1].hidden):  # each drawn latent comes with its own prompt's row
        k = next(i for i in range(len(data)) if torch.equal(data.latents[i], latent))
        assert torch.equal(hidden, data.cond.hidden[data.prompt_index[k]])

    other = role("related", ["q0", "p1"], [0, 1, 1], seed=1)
    other.cond.hidden[1] = data.cond.hidden[1]  # the shared prompt encodes the same way
    both = RoleData.concat([data, other], "benign")
    assert both.role == "benign" and len(both) == 8 and both.prompts == ["p0", "p1", "p2", "q0"]
    assert both.sources == data.sources + other.sources
    for k, part, j in [(0, data, 0), (4, data, 4), (5, other, 0), (7, other, 2)]:
        _, row = both.batch(torch.tensor([k]))
        _, expected = part.batch(torch.tensor([j]))
        assert torch.equal(row.hidden, expected.hidden) and torch.equal(both.latents[k], part.latents[j])
    with pytest.raises(ValueError, match="inconsistent"):
        RoleData("x", torch.zeros(2, 4, 8, 8), torch.zeros(3, dtype=torch.long), ["p"], data.cond[0], ["a", "b"])


def test_a_damaged_cache_is_recomputed(tiny_model, tmp_path):
    config = study({"forget": {"prompts": [DOG]}})
    first = prepare(config, tiny_model, "train", tmp_path)
    (tmp_path / "train" / "forget.safetensors").write_bytes(b"truncated")
    again = prepare(config, tiny_model, "train", tmp_path)
    assert torch.equal(again.forget.latents, first.forget.latents)
    assert torch.equal(RoleData.load(tmp_path / "train" / "forget.safetensors").latents, first.forget.latents)


def test_a_metadata_file_with_a_byte_order_mark_reads(tmp_path):
    from metaunlearn.imagefolder import read_items

    folder = write_folder(tmp_path / "bom", {"r.png": EIGHT, "g.png": DOG})
    meta = folder / "metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())  # as Windows editors save UTF-8
    assert [item.text for item in read_items(folder, "train", "concepts.forget.images")] == [EIGHT, DOG]


def test_an_own_role_is_made_again_when_its_prompt_file_changes(tiny_model, tmp_path):
    from metaunlearn.config import RoleConfig
    from metaunlearn.data import prepare_role

    prompts = tmp_path / "teach.txt"
    prompts.write_text(f"{EIGHT}\n")
    config, spec = study({"forget": {"prompts": [EIGHT]}}), RoleConfig(prompt_file=str(prompts))
    first = prepare_role(config, "own", spec, tiny_model, "attack", tmp_path / "cache", progress=False)
    assert prepare_role(config, "own", spec, lambda: pytest.fail("made again"), "attack", tmp_path / "cache",
                        progress=False).prompts == first.prompts == [EIGHT]  # cached
    prompts.write_text(f"{DOG}\n")
    again = prepare_role(config, "own", spec, tiny_model, "attack", tmp_path / "cache", progress=False)
    assert again.prompts == [DOG]
