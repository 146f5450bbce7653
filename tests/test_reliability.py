"""Faults and bad input that used to pass silently or end in a traceback: a
device torch cannot use, a concept in two roles, weights that overflowed, a
damaged latest checkpoint."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from metaunlearn import DiffusionModel
from metaunlearn.checkpoint import list_checkpoints, load_newest_intact, save_checkpoint
from metaunlearn.cli import app
from metaunlearn.config import ConfigError, StudyConfig
from metaunlearn.errors import TrainingError
from metaunlearn.unlearn import unlearn

from helpers import concept_data, one_line_error
from test_engine import flat, toy
from test_train import make_config

runner = CliRunner()


def study(**concepts) -> dict:
    roles = {"forget": {"classes": ["eight"], "prompts": ["a photo of the digit eight"]},
             "related": {"classes": ["three"], "prompts": ["the number three"]}}
    return {"model": {"source": "digits"}, "concepts": {**roles, **concepts}}


@pytest.mark.parametrize("related, message", [
    ({"classes": ["8"]}, "concepts.related.classes has 'eight', which concepts.forget has too"),
    ({"prompts": ["A photo of  the digit EIGHT"]},
     "concepts.related.prompts has 'a photo of the digit eight', which concepts.forget has too"),
])
def test_a_concept_in_two_roles_is_refused(related, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict(study(related=related))
    StudyConfig.from_dict(study(unrelated={"classes": ["one"], "prompts": ["the number one"]}))  # apart: fine


def test_a_device_name_torch_does_not_know_is_a_config_error():
    with pytest.raises(ConfigError, match="model.device: 'banana' is not a device; use auto, cpu, cuda"):
        StudyConfig.from_dict({"model": {"device": "banana"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(tiny_pipeline_dir, tmp_path):
    import yaml

    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({"model": {"source": str(tiny_pipeline_dir), "device": "cuda:1"},
                                    "concepts": {"forget": {"prompts": ["a photo of the digit eight"]}},
                                    "output": {"dir": str(tmp_path / "run")}}))
    line = one_line_error(runner.invoke(app, ["evaluate", str(file)]))
    assert "model.device 'cuda:1' is not available here (torch sees 0 CUDA devices)" in line
    assert not (tmp_path / "run" / "eval").exists()


def test_weights_that_overflowed_are_never_saved_or_marked_done(tiny_model, tiny_pipeline_dir, tmp_path,
                                                                monkeypatch):
    # weights that overflowed in the last step: its loss was still finite, so the NaN guard saw nothing
    from metaunlearn.methods.esd import EsdMethod

    def overflow(self, model, data):
        with torch.no_grad():
            next(model.unet.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(EsdMethod, "finish", overflow)
    config = make_config(tiny_pipeline_dir, "method.steps=1")
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="the unlearned UNet has non-finite weights in .* nothing was saved"):
        unlearn(config, tiny_model, concept_data(tiny_model), out, 0, "fp", progress=False)
    assert json.loads((out / "run.json").read_text())["status"] == "running" and not (out / "model").exists()


def damage(checkpoint, how):
    if how == "truncated params":
        data = (checkpoint / "params.safetensors").read_bytes()
        (checkpoint / "params.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "corrupt step.json":
        (checkpoint / "step.json").write_text("{step: ")
    elif how == "truncated training state":
        (checkpoint / "training_state.pt").write_bytes(b"PK\x03")


@pytest.mark.parametrize("how", ["truncated params", "corrupt step.json", "truncated training state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, how):
    module, engine = toy({"steps": 6})
    engine.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)  # keeps the newest two
    older, newest = list_checkpoints(tmp_path)
    damage(newest, how)
    _, fresh = toy({"steps": 6})
    with pytest.warns(UserWarning, match=f"{newest} is damaged .*; resuming from {older.name}"):
        done = fresh.resume(tmp_path)
    assert done == int(older.name.removeprefix("step-")) and fresh.last_good == older.name
    expected = load_newest_intact(tmp_path, {"weight", "bias"})[0]["params"]
    assert torch.equal(flat(fresh.module), torch.cat([expected["weight"].flatten(), expected["bias"].flatten()]))
    aside = tmp_path / f"damaged-{newest.name}"
    assert aside.is_dir() and not newest.exists()  # set aside for a post-mortem, out of the newest kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged in the way any more
        fresh.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)
    state, skipped = load_newest_intact(tmp_path, {"weight", "bias"})
    assert skipped == [] and state["path"] == newest and aside.is_dir()  # redone and intact


def test_a_save_after_falling_back_past_every_checkpoint_keeps_itself_and_sets_the_damaged_aside(tmp_path):
    """Both kept checkpoints damaged: the run starts over, and its first checkpoints used to be pruned at
    once as older than the damaged ones (the run had none it could resume from until it passed them)."""
    _, engine = toy({"steps": 8})
    engine.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)  # steps 4 and 6 kept (8 is the model)
    damaged = list_checkpoints(tmp_path)
    for checkpoint in damaged:
        damage(checkpoint, "truncated params")
    _, fresh = toy({"steps": 4})  # saves step 2 only
    with pytest.warns(UserWarning, match="resuming from the start"):
        fresh.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert load_newest_intact(tmp_path, {"weight", "bias"})[1] == []
    # the newest damaged one is kept for a post-mortem, only it: each is a whole checkpoint in size
    assert [p.name for p in tmp_path.glob("damaged-*")] == [f"damaged-{damaged[-1].name}"]


def test_the_temporary_folders_of_killed_checkpoint_writes_are_cleared(tmp_path):
    """kill -9 mid-write skips atomic_dir's cleanup: a whole checkpoint's worth of disk each time. An
    old one goes at the next save; a fresh one (a concurrent writer's live write) stays."""
    import os
    import time

    from metaunlearn.checkpoint import STALE_SECONDS

    killed, trash, live = (tmp_path / n for n in (".step-000002-k1ll", ".old-step-000001-x", ".step-000004-l1ve"))
    for folder in (killed, trash, live):
        folder.mkdir()
        (folder / "params.safetensors").write_bytes(b"0" * 64)
    stale = time.time() - STALE_SECONDS - 60
    for folder in (killed, trash):
        os.utime(folder, (stale, stale))
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {})
    assert not killed.exists() and not trash.exists() and live.is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]


def test_checkpoints_missing_a_trained_tensor_are_passed_over(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    save_checkpoint(tmp_path, 2, {"v": torch.ones(2)}, {})  # another run's tensors
    state, skipped = load_newest_intact(tmp_path, {"w"})
    assert state["step"] == 1 and len(skipped) == 1 and "KeyError: 'no tensor w'" in skipped[0]
    damage(list_checkpoints(tmp_path)[0], "truncated params")
    assert load_newest_intact(tmp_path, {"w"})[0] is None  # none intact: the run starts over


def test_a_done_run_whose_weights_are_gone_is_redone_not_reported(tiny_model, tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    from metaunlearn.layout import unlearn_done, unlearn_fingerprint

    config = make_config(tiny_pipeline_dir, "method.name=uce", f"output.dir={tmp_path / 'run'}")
    out, fingerprint = tmp_path / "run" / "unlearn" / "uce-seed0", unlearn_fingerprint(config, 0)
    model = unlearn(config, tiny_model, concept_data(tiny_model), out, 0, fingerprint, progress=False)
    assert unlearn_done(config, 0)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    saved = load_file(weights)
    weights.unlink()  # the folder and its model_index.json stay
    assert json.loads((out / "run.json").read_text())["status"] == "done" and not unlearn_done(config, 0)
    again = unlearn(config, DiffusionModel.load(tiny_pipeline_dir), concept_data(tiny_model), out, 0, fingerprint,
                    progress=False)
    assert unlearn_done(config, 0)
    assert all(torch.equal(saved[k], v) for k, v in load_file(again / "unet" / weights.name).items())


def test_model_folders_load_only_safetensors_and_utf8_indexes(tiny_pipeline_dir, tmp_path):
    import shutil

    from diffusers import StableDiffusionPipeline

    from metaunlearn.errors import ModelError

    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None).save_pretrained(
        pickled, safe_serialization=False)  # .bin weights: unpickling can run code
    assert not list((pickled / "unet").glob("*.safetensors")) and list((pickled / "unet").glob("*.bin"))
    with pytest.raises(ModelError, match=f"cannot load the pipeline at '{pickled}'"):
        DiffusionModel.load(pickled)
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_pipeline_dir, garbled)
    (garbled / "model_index.json").write_bytes(b'{"_class_name": "\xff"}')
    with pytest.raises(ModelError, match="model_index.json' is not UTF-8 text"):
        DiffusionModel.load(garbled)


def test_a_full_disk_while_checkpointing_is_named_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from metaunlearn import checkpoint
    from metaunlearn.errors import filesystem_error

    first = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})

    def full(*args, **kwargs):  # what torch.save says when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "step-000002")
    line = filesystem_error(info.value)
    assert line.startswith("No space left on device: '") and "free some space" in line and "\n" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary folder, the old one kept


def test_a_filesystem_error_in_a_command_is_one_line(tmp_path):
    import yaml

    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({"model": {"source": "digits"}, "output": {"dir": "/proc/metaunlearn/run"},
                                    "concepts": {"forget": {"classes": ["eight"], "prompts": ["an eight"]}}}))
    line = one_line_error(runner.invoke(app, ["run", str(file)]))
    assert "'/proc/metaunlearn" in line and "finished work is kept" in line


def test_an_lr_that_would_overflow_float32_is_refused():
    with pytest.raises(ConfigError, match="method.lr: input should be less than or equal to 10000"):
        StudyConfig.from_dict(study(), ["method.lr=1e39"])


def test_a_run_folder_turning_read_only_midway_ends_in_one_line(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The failure bookkeeping itself cannot write: the study stops with the path named, no traceback."""
    import errno

    import yaml

    from metaunlearn import stages, study as study_module
    from test_study import tiny_study

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    write_json = study_module.write_json

    def read_only(path, value):
        if path.name == "failures.json" and value:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return write_json(path, value)

    monkeypatch.setattr(stages, "run_unlearn", boom)
    monkeypatch.setattr(study_module, "write_json", read_only)
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump(tiny_study(tiny_pipeline_dir, tmp_path / "run", seeds=[0], attacks=[])))
    line = one_line_error(runner.invoke(app, ["run", str(file), "--quiet"]))
    assert line == (f"error: Read-only file system: '{tmp_path / 'run' / 'failures.json'}'; the disk is read-only; "
                    "set output.dir elsewhere; finished work is kept")
    assert "FAILED  unlearn/esd-seed0: RuntimeError: boom" in (tmp_path / "run" / "study.log").read_text()


def test_a_folder_another_writer_puts_in_place_meanwhile_is_replaced_not_an_error(tmp_path, monkeypatch):
    """An orphaned worker of a killed run can finish the same stage while the resumed run saves it: the
    swap finds the folder there between its check and its rename, and replaces it (same inputs, same
    output), as it replaces one that was there before."""
    from metaunlearn import layout

    target, real_replace, raced = tmp_path / "model", os.replace, []

    def replace(src, dst):
        if Path(dst) == target and not raced:  # the other writer lands first
            raced.append(True)
            target.mkdir()
            (target / "theirs.txt").write_text("other writer")
        return real_replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", replace)
    with layout.atomic_dir(target) as tmp:
        (tmp / "ours.txt").write_text("this run")
    assert raced and sorted(p.name for p in target.iterdir()) == ["ours.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or trash folder left


def test_a_folder_another_writer_moves_away_meanwhile_is_no_error(tmp_path, monkeypatch):
    """The other side of the race above: the folder is there at the check and gone at the rename."""
    from metaunlearn import layout

    target, real_exists = tmp_path / "model", Path.exists
    monkeypatch.setattr(layout.Path, "exists", lambda self: True if self == target else real_exists(self))
    with layout.atomic_dir(target) as tmp:
        (tmp / "ours.txt").write_text("this run")
    assert sorted(p.name for p in target.iterdir()) == ["ours.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_written_files_and_folders_get_the_umask_s_modes_not_private_ones(tmp_path, monkeypatch):
    from metaunlearn import layout

    assert (layout.FILE_MODE, layout.DIR_MODE) == (0o666 & ~layout._umask(), 0o777 & ~layout._umask())
    mask = os.umask(0o022)
    try:
        monkeypatch.setattr(layout, "FILE_MODE", 0o644)  # what the module computes from this umask
        monkeypatch.setattr(layout, "DIR_MODE", 0o755)
        file = layout.write_text(tmp_path / "run.json", "{}")
        with layout.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"0")
    finally:
        os.umask(mask)
    assert file.stat().st_mode & 0o777 == 0o644 and (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    weights = {"w": torch.zeros(2)}
    for step in (999_999, 1_000_000):
        save_checkpoint(tmp_path, step, weights, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-999999", "step-1000000"]


def test_a_checkpoint_a_gpu_run_saved_resumes_on_a_machine_without_one(tmp_path, monkeypatch):
    """Its optimizer state names CUDA storage: read as saved, a CPU-only machine found every checkpoint
    'damaged' and restarted the run from step 0."""
    import warnings

    _, gpu_run = toy({"steps": 4})
    with monkeypatch.context() as patch:  # torch.save tags every storage as a GPU's, as it does on one
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        gpu_run.run(checkpoints=tmp_path, checkpoint_every=2, progress=False)
    _, resumed = toy({"steps": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint reported damaged
        assert resumed.resume(tmp_path) > 0


def test_makers_of_one_cached_file_take_turns(tmp_path):
    """`exclusive`: a second holder (here a thread with its own open file, as another process has) waits
    until the first lets go, so it finds the first one's file instead of making it again."""
    import threading
    import time

    from metaunlearn.layout import exclusive

    lock, order = tmp_path / "cache" / ".role.lock", []

    def second():
        with exclusive(lock):
            order.append("second")

    with exclusive(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
