"""Ship an erasure as a LoRA: the UNet weight difference (unlearned - original),
truncated layer by layer to a low rank by SVD and saved in the diffusers LoRA
format, so `pipe.load_lora_weights(folder)` turns the original model into (nearly)
the unlearned one. Only nn.Linear and nn.Conv2d weights have a LoRA form; every
other changed parameter (norms, embeddings...) is reported, never silently lost.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import MetaunlearnError

ADAPTER = "erasure"
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
REPORT = "export.json"


def _load(source):
    from .config import ModelConfig
    from .model import DiffusionModel
    from .worlds import resolve_model_source

    # 'digits' (a world's name) means the built-in world, built on first use; else a folder or hub id
    return DiffusionModel.load(resolve_model_source(ModelConfig(source=str(source))))


def default_out(model_dir) -> Path:
    """Next to the model folder (an unlearn run's model/ gets a sibling lora/); for a hub id ./NAME-lora."""
    path = Path(model_dir)
    return path.resolve().parent / "lora" if path.exists() else Path(f"{path.name}-lora")


def _differences(old, new) -> dict[str, torch.Tensor]:
    """name -> float32 difference of every UNet parameter; one-line errors for models that do not pair up."""
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())
    odd = sorted(old_p.keys() ^ new_p.keys())
    if odd:
        raise MetaunlearnError(f"the two UNets have different architectures: parameter '{odd[0]}' is in only "
                               f"one of them ({len(odd)} such); export a model against its own original")
    for name, p in new_p.items():
        if p.shape != old_p[name].shape:
            raise MetaunlearnError(f"the two UNets have different architectures: '{name}' is "
                                   f"{tuple(p.shape)} in the model but {tuple(old_p[name].shape)} in the base")
    return {name: new_p[name].detach().float() - old_p[name].detach().float() for name in new_p}


def _differing_components(old, new) -> list[str]:
    """Other components that changed too: a UNet LoRA cannot carry them (ESD, UCE... change only the UNet)."""
    def differs(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa)
    return [name for name in ("text_encoder", "text_encoder_2", "vae")
            if getattr(old.pipe, name, None) is not None and differs(getattr(old.pipe, name), getattr(new.pipe, name))]


def export_lora(model_dir, base, out=None, rank: int | None = None, energy: float = 0.9,
                bias: bool = False, fmt: str = "lora") -> dict:
    """Write MODEL_DIR's UNet difference from `base` as a LoRA to `out` (default: default_out); returns
    the report it also writes to out/export.json. `bias` also carries the changed layers' bias
    differences (peft's lora_bias): diffusers loads that, but cannot fuse it into a layer with no bias."""
    if fmt != "lora":
        raise MetaunlearnError(f"cannot export as '{fmt}'; supported: lora")
    if rank is not None and rank < 1:
        raise MetaunlearnError(f"--rank must be at least 1, not {rank}")
    if rank is None and not 0 < energy <= 1:
        raise MetaunlearnError(f"--energy must be in (0, 1], not {energy}")
    out = Path(out) if out is not None else default_out(model_dir)
    if out.exists() and (not out.is_dir() or any(p.name not in (WEIGHTS, REPORT) for p in out.iterdir())):
        raise MetaunlearnError(f"'{out}' exists and holds other files; choose a new folder with --out")
    new, old = _load(model_dir), _load(base)
    if new.family != old.family:
        raise MetaunlearnError(f"the model is {new.family.upper()} but the base is {old.family.upper()}: "
                               "different architectures")
    diffs = _differences(old.unet, new.unet)
    sq = {name: float((d.double() ** 2).sum()) for name, d in diffs.items()}
    total = sum(sq.values())
    if total == 0:
        raise MetaunlearnError("nothing to export: the model's UNet is identical to the base's")

    # The layers a LoRA can change: Linear and (ungrouped) Conv2d whose weight, or carried bias, moved.
    layers, spectra, sizes, carried = {}, {}, {}, set()
    for name, module in old.unet.named_modules():
        if not (isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)):
            continue
        w, b = f"{name}.weight", f"{name}.bias"
        moved_bias = bias and module.bias is not None and sq[b] > 0
        if sq[w] > 0 or moved_bias:
            layers[name] = module
            matrix = diffs[w].reshape(len(diffs[w]), -1)  # conv (out, in, kh, kw) -> (out, in*kh*kw)
            spectra[name], sizes[name] = torch.linalg.svdvals(matrix), max(matrix.shape)
            carried.update([w, b] if moved_bias else [w])
    if not layers:
        raise MetaunlearnError("nothing a LoRA can carry: no Linear or Conv2d weight of the UNet changed "
                               f"(the largest change is in '{max(sq, key=sq.get)}')")
    bias_share = sum(sq[p] for p in carried if p.endswith(".bias")) / total
    energy_of = {name: torch.cumsum(s.double() ** 2, 0) for name, s in spectra.items()}

    def captured(r: int) -> float:  # the top r singular directions of every layer, plus the carried biases
        return bias_share + sum(float(e[min(r, len(e)) - 1]) for e in energy_of.values()) / total

    # Past a difference's numerical rank (torch.linalg.matrix_rank's tolerance) lies float noise, so
    # the largest one is the rank that captures all a LoRA can.
    eps = torch.finfo(torch.float32).eps
    full = max(max(1, int((s > s[0] * sizes[n] * eps).sum())) for n, s in spectra.items())
    reached = None
    if rank is None:
        rank = next((r for r in range(1, full + 1) if captured(r) >= energy - 1e-9), None)
        reached = rank is not None
        rank = rank or full

    # peft adapter on the base UNet: uniform rank (capped where a layer is smaller) and alpha = rank,
    # so scale 1 and the LoRA adds exactly B @ A.
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    small = {n: len(s) for n, s in spectra.items() if len(s) < rank}
    lora_bias = any(p.endswith(".bias") for p in carried)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(layers), rank_pattern=small,
                        alpha_pattern=small, lora_bias=lora_bias, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lora_bias=True.*")  # said once, in the report
        old.unet.add_adapter(config, adapter_name=ADAPTER)
    with torch.no_grad():
        for name in layers:
            diff, layer = diffs[f"{name}.weight"], old.unet.get_submodule(name)
            u, s, vh = torch.linalg.svd(diff.reshape(len(diff), -1), full_matrices=False)
            down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            r = down.weight.shape[0]
            down.weight.copy_(vh[:r].reshape(down.weight.shape))  # conv: (r, in, kh, kw)
            up.weight.copy_((u[:, :r] * s[:r]).reshape(up.weight.shape))  # conv: (out, r, 1, 1)
            if up.bias is not None:  # lora_bias is all or nothing: zero where the bias did not move
                up.bias.copy_(diffs[f"{name}.bias"]) if f"{name}.bias" in carried else up.bias.zero_()
    # peft's own key names (lora_A/lora_B), not convert_state_dict_to_diffusers as the training scripts
    # do: that renames attention layers only (to_q.lora.down...) and diffusers' loader, which picks the
    # format from the first key alone, then silently drops one kind when conv and attention layers mix.
    with warnings.catch_warnings():  # peft takes a 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=".*invalid shape.*")
        state = get_peft_model_state_dict(old.unet, adapter_name=ADAPTER)
    out.mkdir(parents=True, exist_ok=True)
    type(new.pipe).save_lora_weights(out, unet_lora_layers=state, safe_serialization=True,
                                     unet_lora_adapter_metadata=old.unet.peft_config[ADAPTER].to_dict())

    kept = min(captured(rank), sum(sq[p] for p in carried) / total)  # float32 spectra may overshoot a hair
    not_carried = sorted((p for p in sq if p not in carried and sq[p] > 0), key=sq.get, reverse=True)
    report = {
        "model": str(model_dir), "base": str(base), "weights": str(out / WEIGHTS), "rank": rank,
        "rank_rule": "fixed" if reached is None else f"energy {energy}", "energy_reached": reached,
        "captured_share": kept,
        "matrix_share": sum(sq[f"{n}.weight"] for n in layers) / total,  # the most any rank can capture
        "truncated_share": sum(sq[p] for p in carried) / total - kept,   # cut off by the rank
        "not_representable_share": sum(sq[p] for p in not_carried) / total,
        "not_captured_top": [{"name": p, "share": sq[p] / total} for p in not_carried[:5]],
        "layers": len(layers), "biases": lora_bias,
        "fusable": not lora_bias or all(m.bias is not None for m in layers.values()),
        "adapter_mb": round((out / WEIGHTS).stat().st_size / 2 ** 20, 3), "dtype": "float32",
        "other_components_differ": _differing_components(old, new),
    }
    from .layout import write_json

    write_json(out / REPORT, report)
    return report


def summary(report: dict) -> str:
    """Three lines for the command line: what was written, what it captures, how to load it."""
    rule = report["rank_rule"]
    if report["energy_reached"] is False:
        rule += f" unreachable: rank {report['rank']} captures all a LoRA can"
    top = ", ".join(p["name"] for p in report["not_captured_top"][:3]) or "none"
    load = f"load: pipe.load_lora_weights('{Path(report['weights']).parent}')"
    load += ", then pipe.fuse_lora() if you like" if report["fusable"] else \
        " (unfused only: it carries biases of layers that have none)"
    if report["other_components_differ"]:
        load += f"; not exported: {', '.join(report['other_components_differ'])} differ(s) too"
    what = (f"LoRA rank {report['rank']} ({rule}): {report['layers']} layers, {report['adapter_mb']:.2f} MB "
            f"in {Path(report['weights']).parent}")
    share = (f"captures {report['captured_share']:.1%} of the UNet difference (squared norm); the rank cuts "
             f"{report['truncated_share']:.1%}, parameters a LoRA cannot carry hold "
             f"{report['not_representable_share']:.1%} (largest: {top})")
    return f"{what}\n{share}\n{load}"
