"""Text conditioning of a batch: everything the UNet needs besides x_t and t.

SD-1.x needs only the text encoder's hidden states. SDXL also needs a pooled
text embedding and the size/crop "time ids" (its `added_cond_kwargs`). Keeping
both in one small container lets every other module slice, cache and batch
conditioning without knowing which model family it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    hidden: torch.Tensor  # (B, L, D): encoder_hidden_states
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> Conditioning:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning(self.hidden[index], {k: v[index] for k, v in self.added.items()})

    def to(self, device=None, dtype=None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.hidden), {k: move(v) for k, v in self.added.items()})

    def expand(self, n: int) -> Conditioning:
        """Repeat a single conditioning n times (e.g. the empty prompt for a batch)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {n}")
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        keys = parts[0].added.keys()
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in keys})

    def unet_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": dict(self.added) if self.added else None}

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping, for safetensors caches."""
        out = {f"{prefix}hidden": self.hidden.contiguous()}
        out.update({f"{prefix}added.{k}": v.contiguous() for k, v in self.added.items()})
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "") -> Conditioning:
        added = {k[len(prefix) + 6:]: v for k, v in tensors.items() if k.startswith(f"{prefix}added.")}
        return Conditioning(tensors[f"{prefix}hidden"], added)
