"""The report's at-a-glance sample figure: prompts as rows, models as column
groups, each model's samples before and after an attack side by side, cut
from the sample grids the stages saved (plots.save_samples) and scaled so the
whole figure fits a 1280-pixel-wide browser window.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .plots import GRID_MIN_SIDE, GRID_PAD, GRID_PER_PROMPT, grid_scale

MAX_WIDTH = 1200  # px: the report's column (1100 px of CSS) at most, so nothing scrolls sideways
LABEL_WIDTH = 230
HEADER = 40
GAP = 8
SHOWN = 2  # samples per prompt in the figure (the full grids stay in the details)


def grid_cells(path: Path, prompts: int, samples_per_prompt: int) -> list[list[Image.Image]]:
    """Each prompt's first samples, cut from a grid saved by plots.save_samples."""
    grid = Image.open(path).convert("RGB")
    k = min(GRID_PER_PROMPT, samples_per_prompt)
    # the one (sample size, scale) pair that save_samples turns into this width
    def fits(side: int, s: int) -> bool:
        return side > 0 and grid_scale(side) == s and s * (k * (side + GRID_PAD) + GRID_PAD) == grid.width \
            and s * (prompts * (side + GRID_PAD) + GRID_PAD) == grid.height

    side, scale = next(((side, s) for s in range(1, GRID_MIN_SIDE + 1)
                        if fits(side := (grid.width // s - GRID_PAD) // k - GRID_PAD, s)), (None, None))
    if side is None:
        raise ValueError(f"{path} is not a sample grid of {prompts} prompts x {k} samples")
    step, pad, size = (side + GRID_PAD) * scale, GRID_PAD * scale, side * scale
    return [[grid.crop((pad + c * step, pad + r * step, pad + c * step + size, pad + r * step + size))
             for c in range(min(SHOWN, k))] for r in range(prompts)]


def compare_figure(columns: list[tuple[str, Path | None, Path | None]], prompts: list[str],
                   rows: list[int], samples_per_prompt: int, out: Path, after_label: str) -> Path | None:
    """columns: (model name, grid before, grid after); rows: which prompts (indices) to show.
    None when no grid exists."""
    cells = [(name, *(grid_cells(p, len(prompts), samples_per_prompt) if p and p.is_file() else None
                      for p in (before, after))) for name, before, after in columns]
    cells = [c for c in cells if c[1] is not None or c[2] is not None]
    if not cells:
        return None
    shown = min(SHOWN, samples_per_prompt)
    blocks, thumb = 2 * len(cells), thumb_size(len(cells), shown)
    width = LABEL_WIDTH + blocks * (shown * thumb + GAP)
    height = HEADER + len(rows) * (thumb + 4)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    x = LABEL_WIDTH
    for name, before, after in cells:
        draw.text((x, 2), _fit(draw, name, font, 2 * (shown * thumb + GAP)), fill="black", font=font)
        for label, grid in (("before", before), (after_label, after)):
            draw.text((x, 20), label, fill="#555", font=font)
            for i, r in enumerate(rows):
                for c in range(shown):
                    if grid is not None:
                        canvas.paste(grid[r][c].resize((thumb, thumb), Image.NEAREST if thumb >= grid[r][c].width
                                                       else Image.LANCZOS), (x + c * thumb, HEADER + i * (thumb + 4)))
            x += shown * thumb + GAP
    for i, r in enumerate(rows):
        draw.text((4, HEADER + i * (thumb + 4) + thumb // 2 - 7), _fit(draw, prompts[r], font, LABEL_WIDTH - 8),
                  fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def thumb_size(models: int, shown: int) -> int:
    """The side of one sample in the figure: as large as fits MAX_WIDTH, 24 to 96 px."""
    blocks = 2 * models
    return max(24, min(96, (MAX_WIDTH - LABEL_WIDTH - GAP * blocks) // (blocks * shown)))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def rows_to_show(prompts: list[list[str]], per_role: int = 3) -> list[int]:
    """The first `per_role` prompts of each role (a study may evaluate hundreds)."""
    seen: dict[str, int] = {}
    keep = []
    for k, (role, _) in enumerate(prompts):
        seen[role] = seen.get(role, 0) + 1
        if seen[role] <= per_role:
            keep.append(k)
    return keep
