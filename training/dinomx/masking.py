"""iBOT block masking: which patches of which global crops the student sees masked."""

from __future__ import annotations

import math

import torch


def block_mask(grid: int, num_masked: int, generator: torch.Generator, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 10) -> torch.Tensor:
    """A (grid, grid) bool mask with about ``num_masked`` True patches, made of random rectangles.

    BEiT/iBOT's generator: rectangles of random area (``min_block`` patches up to what is still
    missing) and log-uniform aspect ratio are added until the count is reached or no rectangle
    adds patches ``max_tries`` times in a row; any shortfall is then filled with random single
    patches so the ratio asked for is the ratio obtained.
    """
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    num_masked = max(0, min(num_masked, grid * grid))
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    fails = 0
    while int(mask.sum()) < num_masked and fails < max_tries:
        missing = num_masked - int(mask.sum())
        hi = max(missing, 1)
        lo = min(min_block, hi)
        target = lo + float(torch.rand((), generator=generator)) * (hi - lo)
        ratio = math.exp(log_lo + float(torch.rand((), generator=generator)) * (log_hi - log_lo))
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if not (1 <= h <= grid and 1 <= w <= grid):
            fails += 1
            continue
        top = int(torch.randint(0, grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (), generator=generator))
        block = mask[top:top + h, left:left + w]
        added = int((~block).sum())
        if added == 0 or int(mask.sum()) + added > num_masked:
            fails += 1
            continue
        block[:] = True
        fails = 0
    short = num_masked - int(mask.sum())
    if short > 0:
        free = (~mask).flatten().nonzero().flatten()
        pick = free[torch.randperm(free.numel(), generator=generator)[:short]]
        mask.view(-1)[pick] = True
    return mask


def batch_masks(n_images: int, grid: int, probability: float, ratio: tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """(n_images, grid * grid) bool masks: ``round(probability * n_images)`` images are masked, each
    with a ratio drawn uniformly from ``ratio``; the rest are not masked.

    Drawn for the whole (all-process) batch from one generator, so every process agrees.
    """
    lo, hi = ratio
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"ibot.mask_ratio must be [min, max] within [0, 1], got {list(ratio)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"ibot.mask_probability must be within [0, 1], got {probability}")
    n_masked = int(round(probability * n_images))
    chosen = torch.randperm(n_images, generator=generator)[:n_masked]
    masks = torch.zeros(n_images, grid * grid, dtype=torch.bool)
    for i in chosen.tolist():
        r = lo + float(torch.rand((), generator=generator)) * (hi - lo)
        masks[i] = block_mask(grid, int(round(r * grid * grid)), generator).flatten()
    return masks
