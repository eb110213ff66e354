"""Mask-guided attention on a timm ViT, through timm's ``attn_mask`` hook (METHOD.md 4.1).

In the last ``mask_layers`` blocks the CLS query may attend only to the prefix tokens
(CLS, registers) and to the patches whose mask coverage (mask average-pooled over the
patch) is at least 0.5; patch queries are unchanged. This is an additive attention
bias of shape (B, 1, N, N): zero everywhere except row 0 (the CLS query), which holds
a large negative number at the masked keys. timm's ``Block.forward(x, attn_mask=...)``
passes it to ``F.scaled_dot_product_attention`` (fused) or adds it to the scores
(unfused), so no ViT code is vendored. Row 0 always keeps the CLS key, so no row is
fully masked and there is no NaN in any precision.

The bias is per key and may be soft (``cls_attention_bias``), which is how a
ProtoAnomalyNCD mode passes a learned region guidance; the hard mask is the special
case 0 / -large.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

KEEP_THRESHOLD = 0.5  # a patch is visible to CLS when its pooled mask coverage is >= this
FEATURES = ("cls", "patch", "cls+patch")  # what the heads see (``model.feature``)
MASK_ALIGN = 16  # row stride of the bias buffer, in elements (SDPA kernels want aligned masks)


def patch_coverage(masks: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Fraction of each patch covered by the mask, in timm's (row-major) token order.

    Args:
        masks: (B, 1, H, W) values in [0, 1].
        patch_size: (ph, pw).

    Returns:
        (B, (H // ph) * (W // pw)) average-pooled coverage.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
    pooled = F.avg_pool2d(masks.float(), kernel_size=patch_size, stride=patch_size)
    return pooled.flatten(1)


def masked_value(dtype: torch.dtype) -> float:
    """The additive bias of a masked key: the most negative finite value of ``dtype``.

    (-3.4e38 in fp32, equivalent to upstream's -1e9 after softmax; finite in fp16 / bf16.)
    """
    return torch.finfo(dtype).min


def hard_key_bias(
    coverage: Tensor,
    num_prefix_tokens: int,
    dtype: torch.dtype,
    threshold: float = KEEP_THRESHOLD,
) -> Tensor:
    """Per-key CLS bias of the hard mask: 0 for prefix tokens and covered patches.

    Args:
        coverage: (B, N_patches) from :func:`patch_coverage`.
        num_prefix_tokens: CLS (+ register) tokens placed before the patches.
        dtype: dtype of the attention scores.
        threshold: keep patches with ``coverage >= threshold`` (0.5 keeps exactly-half patches).

    Returns:
        (B, num_prefix_tokens + N_patches) in ``dtype``: 0 or ``masked_value(dtype)``.
    """
    b = coverage.shape[0]
    keep = torch.cat(
        [torch.ones(b, num_prefix_tokens, dtype=torch.bool, device=coverage.device), coverage >= threshold], dim=1
    )
    bias = torch.zeros(keep.shape, dtype=dtype, device=coverage.device)
    return bias.masked_fill(~keep, masked_value(dtype))


def cls_attention_bias(bias_per_key: Tensor) -> Tensor:
    """Attention bias that applies ``bias_per_key`` to the CLS query row only.

    Args:
        bias_per_key: (B, N) additive bias of each key for the CLS query (N = all tokens,
            prefix included); may be soft and require grad.

    Returns:
        (B, 1, N, N): row 0 is ``bias_per_key``, all other rows 0 (broadcast over heads).
        It is a view of a (B, 1, N, N_pad) buffer with ``N_pad`` a multiple of
        ``MASK_ALIGN``: CUDA's memory-efficient SDPA kernel otherwise copies a padded mask
        in every call (measured on an H100, ViT-B/8 shapes: 1.18 -> 0.66 ms per call).
    """
    b, n = bias_per_key.shape
    n_pad = -(-n // MASK_ALIGN) * MASK_ALIGN
    row = F.pad(bias_per_key, (0, n_pad - n))[:, None, None, :]
    rest = bias_per_key.new_zeros(b, 1, n - 1, n_pad)
    return torch.cat([row, rest], dim=2)[..., :n]


def _attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype the attention scores will have: the autocast dtype when active."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MaskGuidedViT(nn.Module):
    """A timm ViT whose CLS query is restricted by a region mask in its last blocks.

    ``forward(images, masks) -> cls``: (B, 3, H, W), (B, 1, H, W) in [0, 1] -> (B, D),
    the final-norm CLS token. Blocks ``[0, depth - mask_layers)`` are vanilla; an
    all-ones mask gives exactly the backbone's own CLS output.

    Trainable parameters: only ``blocks.{i}`` with ``i >= grad_from_block`` (patch
    embedding, CLS/register tokens, position embedding and final norm stay frozen, as
    upstream). Blocks before the first parameter that needs a gradient run under
    ``torch.no_grad()`` (no activations stored for them).

    ``feature`` chooses the region feature the heads see: ``cls`` (the paper's), ``patch``
    (the patch tokens of block ``feature_block``, final-normed, averaged with weights
    ``context + (1 - context) * coverage`` of the region mask: the mask as a soft weight,
    with some context) or ``cls+patch`` (both, each L2-normalised, concatenated).
    """

    def __init__(self, backbone: VisionTransformer, mask_layers: int, grad_from_block: int,
                 feature: str = "cls", feature_block: int = -1, feature_context: float = 0.1) -> None:
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm"):
            if not hasattr(backbone, attr):
                raise TypeError(f"{type(backbone).__name__} is not a timm VisionTransformer (no {attr})")
        if getattr(backbone, "cls_token", None) is None:
            raise ValueError("mask-guided attention needs a ViT with a class token")
        depth = len(backbone.blocks)
        if not 0 <= mask_layers <= depth:
            raise ValueError(f"model.mask_layers={mask_layers} must be in [0, {depth}] for a {depth}-block ViT")
        if not 0 <= grad_from_block <= depth:
            raise ValueError(f"model.grad_from_block={grad_from_block} must be in [0, {depth}]")
        for i, blk in enumerate(backbone.blocks):
            if "attn_mask" not in inspect.signature(blk.forward).parameters:
                raise TypeError(f"block {i} ({type(blk).__name__}) does not accept attn_mask in this timm version")
        self.backbone = backbone
        self.depth = depth
        self.mask_layers = mask_layers
        self.first_masked_block = depth - mask_layers
        self.grad_from_block = grad_from_block
        if feature not in FEATURES:
            raise ValueError(f"model.feature={feature!r}; valid: {', '.join(FEATURES)}")
        if not -depth <= feature_block < depth:
            raise ValueError(f"model.feature_block={feature_block} must be in [{-depth}, {depth - 1}]")
        if not 0.0 <= feature_context <= 1.0:
            raise ValueError(f"model.feature_context={feature_context} must be in [0, 1]")
        self.feature, self.feature_block, self.feature_context = feature, feature_block % depth, feature_context
        self.freeze()

    @property
    def feature_dim(self) -> int:
        """The region feature's size: D, or 2D for ``cls+patch``."""
        d = int(self.backbone.num_features)
        return 2 * d if self.feature == "cls+patch" else d

    @property
    def patch_size(self) -> tuple[int, int]:
        ps = self.backbone.patch_embed.patch_size
        return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.backbone.num_prefix_tokens)

    def freeze(self) -> None:
        """Set ``requires_grad``: True only for ``blocks.{i}.*`` with ``i >= grad_from_block``."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for blk in self.backbone.blocks[self.grad_from_block :]:
            for p in blk.parameters():
                p.requires_grad_(True)

    def _first_grad_block(self, images: Tensor, key_bias: Tensor | None) -> int:
        """Index of the first block that must run with autograd (0: everything does).

        A bias that needs a gradient only enters the masked blocks, so the blocks before
        them still run without autograd when their parameters are frozen.
        """
        if images.requires_grad:
            return 0
        bb = self.backbone
        stem = [bb.patch_embed, bb.norm_pre]
        tokens = [getattr(bb, n, None) for n in ("cls_token", "reg_token", "pos_embed")]
        if any(p.requires_grad for m in stem for p in m.parameters()) or any(
            t is not None and t.requires_grad for t in tokens
        ):
            return 0
        first = next((i for i, blk in enumerate(bb.blocks) if any(p.requires_grad for p in blk.parameters())),
                     self.depth)
        if key_bias is not None and key_bias.requires_grad:
            first = min(first, self.first_masked_block)
        return first

    def tokens(self, images: Tensor) -> Tensor:
        """(B, N, D) token sequence entering block 0 (patch embedding, prefix tokens, pos-embed)."""
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def key_bias(self, masks: Tensor, n_tokens: int, dtype: torch.dtype) -> Tensor:
        """(B, N) hard per-key CLS bias of ``masks`` (B, 1, H, W) for a sequence of ``n_tokens``."""
        coverage = patch_coverage(masks, self.patch_size)
        if coverage.shape[1] + self.num_prefix_tokens != n_tokens:
            raise ValueError(
                f"mask {tuple(masks.shape[-2:])} pools to {coverage.shape[1]} patches with patch size "
                f"{self.patch_size}, but the ViT has {n_tokens - self.num_prefix_tokens} patch tokens; "
                "masks must have the image's size"
            )
        return hard_key_bias(coverage, self.num_prefix_tokens, dtype)

    def forward(self, images: Tensor, masks: Tensor | None) -> Tensor:
        """Region feature (B, ``feature_dim``) with the mask-guided CLS attention; ``masks=None``:
        vanilla ViT (patch pooling then weighs every patch alike)."""
        return self._run(images, masks=masks, key_bias=None, region=masks)

    def forward_with_key_bias(self, images: Tensor, key_bias: Tensor | None, region: Tensor | None = None) -> Tensor:
        """Region feature with a given (soft) per-key CLS bias (B, N) in the masked blocks;
        ``region`` (B, 1, H, W) weighs the patch pooling."""
        return self._run(images, masks=None, key_bias=key_bias, region=region)

    def pooled_patches(self, x: Tensor, region: Tensor | None) -> Tensor:
        """(B, D) final-normed patch tokens of ``x`` (B, N, D) averaged with the soft region weights."""
        patches = self.backbone.norm(x[:, self.num_prefix_tokens :])
        if region is None:
            return patches.mean(1)
        w = self.feature_context + (1.0 - self.feature_context) * patch_coverage(region, self.patch_size)
        w = w.to(patches.dtype)
        return (w[..., None] * patches).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)

    def _run(self, images: Tensor, masks: Tensor | None, key_bias: Tensor | None,
             region: Tensor | None = None) -> Tensor:
        start = self._first_grad_block(images, key_bias) if torch.is_grad_enabled() else 0
        blocks = self.backbone.blocks
        with torch.no_grad() if start > 0 else contextlib.nullcontext():
            x = self.tokens(images)
        attn_bias: Tensor | None = None
        if self.mask_layers > 0 and (masks is not None or key_bias is not None):
            dtype = _attention_dtype(x)
            if key_bias is None:
                key_bias = self.key_bias(masks, x.shape[1], dtype)  # type: ignore[arg-type]
            elif key_bias.shape != x.shape[:2]:
                raise ValueError(f"key_bias must be (B, N) = {tuple(x.shape[:2])}, got {tuple(key_bias.shape)}")
            attn_bias = cls_attention_bias(key_bias.to(dtype))  # outside no_grad: a learned bias keeps its graph
            if attn_bias.requires_grad and attn_bias.is_cuda:
                # the memory-efficient kernel's backward rejects the padded view at some
                # lengths (197 tokens: "LSE is not correctly aligned"); a dense copy passes
                attn_bias = attn_bias.contiguous()
        pooled: Tensor | None = None
        for i, blk in enumerate(blocks):
            bias = attn_bias if i >= self.first_masked_block else None
            with torch.no_grad() if i < start else contextlib.nullcontext():
                x = blk(x, attn_mask=bias)
            if i == self.feature_block and self.feature != "cls":
                pooled = self.pooled_patches(x, region)
        cls = self.backbone.norm(x)[:, 0]
        if pooled is None:
            return cls
        if self.feature == "patch":
            return pooled
        return torch.cat([F.normalize(cls, dim=-1), F.normalize(pooled, dim=-1)], dim=-1)
