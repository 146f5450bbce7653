"""CLIP score per role (registered as metric 'clip_score'): how well samples
match their prompts, 100 x the cosine of CLIP's image and text embeddings,
clamped at 0 (Hessel et al. 2021), computed by torchmetrics' CLIPScore with
the literature's ViT-L/14 by default. Prompts longer than CLIP's 77 tokens are
truncated by the tokenizer.

On the forget role a lower score means the concept is gone from the images;
on related and unrelated roles it should stay where the original model's is.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field

from ..config import ROLES
from ..registry import METRICS, Options
from .base import Context, Metric, Result, Samples, Value, device_of
from .hf_models import DEFAULT_CLIP, ClipEmbedder, to_uint8


class ClipScoreOptions(Options):
    model: str = Field(DEFAULT_CLIP, description="CLIP model: a hub id or a local folder (ViT-L/14 by default).")
    roles: list[Literal["forget", "related", "unrelated"]] = Field(list(ROLES), min_length=1, description=(
        "Roles whose samples are scored against their prompts."))


@METRICS.register("clip_score", ClipScoreOptions, help="CLIP score of samples against their prompts (utility)")
class ClipScore(Metric):
    def __init__(self, options: ClipScoreOptions, context: Context):
        super().__init__(options, context)
        self.values = [Value(f"clip_score_{role}", f"CLIP score {role}", role, higher_is_better=role != "forget",
                             fraction=False, group="utility") for role in options.roles]
        self.embedder = ClipEmbedder(options.model, device_of(context))

    def compute(self, samples: Samples, model=None) -> Result:
        from torchmetrics.multimodal.clip_score import CLIPScore

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notice that prompts get truncated: we truncate them ourselves
            # its running sums on CLIP's device, where the scores it adds to them are computed
            metric = CLIPScore(model_name_or_path=lambda: (self.embedder, self.embedder)).to(self.embedder.device)
        values, roles = {v.key: None for v in self.values}, {}
        batch = self.context.config.evaluation.batch_size
        for role in self.options.roles:
            total, count, prompts = 0.0, 0, []
            for k, (r, prompt) in enumerate(samples.entries):
                if r != role:
                    continue
                metric.reset()
                images = samples.of(k)
                for i in range(0, len(images), batch):
                    chunk = list(to_uint8(images[i:i + batch]).to(self.embedder.device))
                    metric.update(chunk, [prompt] * len(chunk))
                total, count = total + float(metric.score), count + int(metric.n_samples)
                prompts.append({"prompt": prompt, "clip_score": float(metric.compute())})
            if count:
                values[f"clip_score_{role}"] = max(total / count, 0.0)  # torchmetrics' compute, over the role
                roles[role] = {"score": values[f"clip_score_{role}"], "n": count, "prompts": prompts}
        return Result(values, {"conventions": {"model": self.options.model, "score": "100 x max(cos, 0)",
                                               "max_tokens": self.embedder.max_length}, "roles": roles})
