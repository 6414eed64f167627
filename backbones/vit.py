"""Vision Transformers for 112x112 faces as InsightFace arcface_torch defines them: vit_t/s/b/l.

Owns the architecture of arcface_torch's ``backbones/vit.py``, re-implemented with the same
layers, order and state-dict key names (``patch_embed.proj``, ``pos_embed``, ``mask_token``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``feature.0..3``), so
weights trained with arcface_torch load with ``load_state_dict``. Does not own the optimizer
(AdamW is the recipe's choice, see ``launch/configs/recipes/webface42m_vit_t_cosface.yaml``).

Architecture facts (arcface_torch):
  * patch embedding: a 9x9 convolution of stride 9 (with bias) to ``embed_dim``; a 112x112
    image gives 12x12 = 144 patches (the last 4 rows and columns are not covered, as there);
    no class token; learned position embeddings ``[1, 144, embed_dim]``;
  * ``depth`` pre-norm blocks: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``,
    attention without qkv bias, scale ``head_dim ** -0.5``, MLP ``embed_dim -> mlp_ratio *
    embed_dim -> embed_dim`` with ReLU6; stochastic depth rising linearly from 0 to
    ``drop_path_rate`` over the blocks;
  * a final LayerNorm in fp32, then the feature head on *all* patch tokens flattened:
    ``Linear(144 * embed_dim -> embed_dim, no bias) -> BatchNorm1d(eps 2e-5) -> Linear(embed_dim
    -> D, no bias) -> BatchNorm1d(D, eps 2e-5)``;
  * in training, a random ``mask_ratio`` of the patches (per sample) is dropped after the
    position embedding and the blocks see only the rest; after the final LayerNorm the dropped
    positions are filled with the learned ``mask_token`` and the tokens are put back in order.

Variants (embed_dim, depth, heads, mlp_ratio, drop_path_rate, mask_ratio) and parameters at
D=512, 112x112 (pinned by the tests):
  vit_t 256/12/8/4, 0.1, 0.1: 19,137,792;  vit_s 512/12/8/4, 0.1, 0.1: 76,023,296;
  vit_b 512/24/8/4, 0.1, 0.1: 113,833,472; vit_l 768/24/8/4, 0.05, 0.05: 255,684,352
(arcface_torch names the last one ``vit_l_dp005_mask_005``; it has no plain ``vit_l``).

Differences from arcface_torch, none of which changes the parameters or the eval-mode maths:
  * arcface_torch's forward calls its masking function without passing ``mask_ratio``, so it
    always masks 10% and ``mask_ratio`` only switches masking on or off. Here ``mask_ratio`` is
    the fraction masked (the same for vit_t/s/b; vit_l masks 5% as its name states; pass
    ``mask_ratio=0.1`` to reproduce arcface_torch's vit_l exactly).
  * attention runs through ``F.scaled_dot_product_attention`` in the autocast dtype;
    arcface_torch computes ``q k^T`` and the softmax in fp32 by hand. The fused kernels
    accumulate in fp32, so bf16 training needs no such guard.
  * with ``mask_ratio=0`` the unused ``mask_token`` is frozen, so DDP does not wait for its
    gradient.
  * ``dropout`` (default 0, absent there) acts on the flattened tokens before the feature head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import register
from backbones.common import autocast_off, check_checkpointing, pair, run_stage, upcast

_HEAD_BN_EPS = 2e-5  # arcface_torch's feature head


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty(x.shape[0], *(1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x * mask.bernoulli_(keep) / keep


class Attention(nn.Module):
    """Multi-head self-attention ``[B, N, D] -> [B, N, D]`` without qkv bias.

    Args:
        dim: D.
        num_heads: heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vit embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # [B, N, 3, heads, head_dim] -> 3 x [B, heads, N, head_dim]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as there
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def functional_macs(self, inputs: tuple[Tensor, ...], out: Tensor) -> tuple[str, int]:
        """MACs of the two products outside submodules (``q k^T`` and ``attn v``) for
        ``backbones.info``: ``2 * B * N^2 * D``, arcface_torch's ``extra_gflops``."""
        batch, tokens, dim = out.shape
        return "attention", 2 * batch * tokens * tokens * dim


class Mlp(nn.Module):
    """``Linear(D -> hidden) -> ReLU6 -> Linear(hidden -> D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block ``[B, N, D] -> [B, N, D]`` with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution: ``[B, 3, H, W] -> [B, N, D]``."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TokenStem(nn.Module):
    """The stem as one unit for ``stages()`` and checkpointing: patch embedding plus position
    embedding. It also holds ``mask_token`` so that freezing the stem freezes every parameter
    that makes input tokens. Stored unregistered (see ``common.unregistered_view``): it shares
    the owner's modules and parameters and adds no state-dict keys."""

    def __init__(self, patch_embed: PatchEmbed, pos_embed: nn.Parameter, mask_token: nn.Parameter):
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_embed = pos_embed
        self.mask_token = mask_token

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_embed(x) + self.pos_embed


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT: image ``[B, 3, H, W]`` float -> embedding ``[B, D]`` float32.

    Args:
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        embedding_size: D.
        dropout: dropout on the flattened tokens before the feature head.
        mask_ratio: fraction of patches dropped per sample in training (0 disables).
        drop_path_rate: stochastic-depth probability of the last block (0 for the first).
        input_size: H, W the network is built for (the patch count depends on it).
        patch_size: side of a square patch.
        checkpointing: "none", "stage" or "block"; a block is a stage here, so both recompute
            each transformer block (the stem is recomputed whole).
    """

    _stem: _TokenStem  # see _TokenStem

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        mask_ratio: float = 0.1,
        drop_path_rate: float = 0.1,
        input_size: int | tuple[int, int] = 112,
        patch_size: int = 9,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        height, width = pair(input_size)
        if height < patch_size or width < patch_size:
            raise ValueError(f"vit input_size {(height, width)} is smaller than a patch")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"vit drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.checkpointing = check_checkpointing(checkpointing)
        self.input_size = (height, width)
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.embed_dim = embed_dim
        self.num_kept = self._num_kept(mask_ratio)
        self.mask_ratio = mask_ratio

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=_HEAD_BN_EPS),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=_HEAD_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        object.__setattr__(
            self, "_stem", _TokenStem(self.patch_embed, self.pos_embed, self.mask_token)
        )
        self._init_weights()
        if mask_ratio == 0.0:
            self.mask_token.requires_grad_(False)  # never used: DDP must not wait for it

    def _num_kept(self, mask_ratio: float) -> int:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"vit mask_ratio must be in [0, 1), got {mask_ratio}")
        kept = int(self.num_patches * (1.0 - mask_ratio))  # arcface_torch's rounding
        if mask_ratio > 0.0 and not 0 < kept < self.num_patches:
            raise ValueError(
                f"vit mask_ratio={mask_ratio} keeps {kept} of {self.num_patches} patches; "
                "it must drop at least one and keep at least one"
            )
        return kept

    def _init_weights(self) -> None:
        # arcface_torch: truncated N(0, 0.02) for Linear weights, the position embedding and
        # (untruncated) the mask token; zero biases; unit LayerNorms; PyTorch's defaults for the
        # patch convolution and the BatchNorms.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Module]:
        """``[stem (patch + position embedding, mask token), block 0, ..., block depth-1]``;
        the final LayerNorm and the feature head form the embedding head."""
        return [self._stem, *self.blocks]

    def _mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keeps ``num_kept`` random tokens per sample: ``[B, N, D] -> [B, kept, D]`` and the
        permutation ``[B, N]`` that puts (kept, dropped) tokens back in patch order."""
        batch, tokens, dim = x.shape
        noise = torch.rand(batch, tokens, device=x.device)
        shuffle = noise.argsort(dim=1)  # a random permutation per sample; its head is kept
        restore = shuffle.argsort(dim=1)
        keep = shuffle[:, : self.num_kept]
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim)), restore

    def _unmask(self, x: Tensor, restore: Tensor) -> Tensor:
        """``[B, kept, D]`` -> ``[B, N, D]`` with ``mask_token`` at the dropped positions."""
        batch, kept, dim = x.shape
        fill = self.mask_token.to(x.dtype).expand(batch, self.num_patches - kept, dim)
        x = torch.cat([x, fill], dim=1)
        return x.gather(1, restore.unsqueeze(-1).expand(-1, -1, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float -> ``[B, D]`` float32 (not L2-normalised)."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"vit was built for input {self.input_size}, got {tuple(x.shape[-2:])}; "
                "pass input_size=(H, W) to the builder"
            )
        x = run_stage(self._stem, x, self.checkpointing, atomic=True)
        restore = None
        if self.training and self.mask_ratio > 0.0:
            x, restore = self._mask(x)
        for block in self.blocks:
            x = run_stage(block, x, self.checkpointing)
        with autocast_off(x.device.type):
            # As arcface_torch: the final LayerNorm in fp32, mask tokens after it.
            x = self.norm(upcast(x))
            if restore is not None:
                x = self._unmask(x, restore)
            return self.feature(self.dropout(x.flatten(1)))


_VARIANTS: dict[str, tuple[int, int, int, float, float, float, int]] = {
    # name: embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, mask_ratio, params at D=512
    "vit_t": (256, 12, 8, 4.0, 0.1, 0.1, 19_137_792),
    "vit_s": (512, 12, 8, 4.0, 0.1, 0.1, 76_023_296),
    "vit_b": (512, 24, 8, 4.0, 0.1, 0.1, 113_833_472),
    "vit_l": (768, 24, 8, 4.0, 0.05, 0.05, 255_684_352),
}


def _variant(name: str):
    """Registers ``name``: a :class:`VisionTransformer` with the sizes of ``_VARIANTS[name]``."""
    dim, depth, heads, mlp_ratio, dpr, ratio, params = _VARIANTS[name]

    @register(name)
    def build(
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        mask_ratio: float = ratio,
        drop_path_rate: float = dpr,
        checkpointing: str = "none",
        input_size: int | tuple[int, int] = 112,
    ) -> VisionTransformer:
        return VisionTransformer(
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            embedding_size=embedding_size,
            dropout=dropout,
            mask_ratio=mask_ratio,
            drop_path_rate=drop_path_rate,
            input_size=input_size,
            checkpointing=checkpointing,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"ViT, width {dim}, {depth} blocks, {heads} heads, patch 9; drop_path_rate {dpr}, "
        f"mask_ratio {ratio}; {params:,} parameters at D=512, 112x112."
    )
    return build


vit_t = _variant("vit_t")
vit_s = _variant("vit_s")
vit_b = _variant("vit_b")
vit_l = _variant("vit_l")
