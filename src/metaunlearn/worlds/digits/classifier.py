"""The digits world's concept detector: a small CNN that names the digit in a
32x32 RGB image in [0, 1] (what DiffusionModel.sample returns)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * width, 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images (B, 3, H, W) in [0, 1] of any size. The digits hold
        8x8 pixels of information, so 16x16 loses nothing and is 4x cheaper."""
        images = F.interpolate(images.float(), size=(16, 16), mode="area")
        return self.head(self.features(images * 2 - 1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate activations: what the classifier knows of an image, the
        digits world's features for FID/KID (as Inception's pool layer is for photographs)."""
        images = F.interpolate(images.float(), size=(16, 16), mode="area")
        return self.head[:-1](self.features(images * 2 - 1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "classifier.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": self.width}))

    @classmethod
    def load(cls, folder: str | Path) -> DigitClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(**json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_file(folder / "classifier.safetensors"))
        return model.eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 px and mild contrast/noise changes, so the
    detector judges generated digits by shape rather than by exact pixels."""
    n = len(images)
    shifts = torch.randint(-3, 4, (n, 2), generator=generator)
    padded = F.pad(images, (3, 3, 3, 3))
    out = torch.stack([padded[i, :, 3 + dy:35 + dy, 3 + dx:35 + dx] for i, (dy, dx) in enumerate(shifts.tolist())])
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    return (out * gain + 0.05 * torch.randn(out.shape, generator=generator)).clamp(0, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 1500, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, width: int = 32, progress=None) -> DigitClassifier:
    """Train on images in [0, 1]; deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(loss.item())
    return model.eval()
