"""MCAN co-attention VQA head (Yu et al., CVPR 2019), encoder-decoder variant, over grid or region tokens.

question ids -> text encoder -> L x SA ------------------------------> AttFlat --+
                                        | final question features          |    LayerNorm(sum) -> answers
visual feats -> VisualEmbed -> L x SGA (self-att, guided-att, FFN) ---> AttFlat --+

The defaults are MCAN as published (MILVLG/mcan-vqa core/model/net.py, mca.py): the projected visual
features get nothing added, and LayerNorm is mcan-vqa's. Additions are named config fields, off unless
asked for: `position_encoding` (grid cells), `box_embedding` (region boxes), `layer_norm="torch"`.

Blocks are post-norm residual, LayerNorm(x + dropout(sublayer(x))), as in MCAN. Attention is
torch's nn.MultiheadAttention: it runs F.scaled_dot_product_attention when weights are not asked for
and returns head-averaged weights when they are (for the attention pictures), so there is no
hand-written attention kernel here. Masks are [B, N] booleans, True = valid, everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gridvqa.errors import ConfigError
from gridvqa.models.text_encoder import build_text_encoder

_POS_ENCS = ("sine", "learned", "none")
LAYER_NORMS = ("mcan", "torch")


@dataclass(frozen=True)
class MCANConfig:
    """Sizes default to MCAN-small (mcan-vqa cfgs/small_model.yml); text and visual-input options sit
    here too so one config builds all."""

    hidden: int = 512
    layers: int = 6
    heads: int = 8
    ffn: int = 2048
    dropout: float = 0.1
    flat_mlp: int = 512
    flat_glimpses: int = 1
    flat_out: int = 1024
    # Question encoder: "lstm" (MCAN: word embeddings + LSTM) or "hf" (local transformers directory).
    text_encoder: str = "lstm"
    word_dim: int = 300
    glove_path: str | None = None
    text_model_path: str | None = None
    freeze_text: bool = False
    # Addition, grid tokens: a position encoding added to the projected cells. "none" (MCAN: nothing is
    # added). "sine": fixed 2-D sine of the cell centre normalised by the image's own grid size, so it
    # has no size limit and "left half" means the same thing at every input resolution (grids change
    # size with the image). "learned": row + column embeddings indexed by absolute cell (at most max_grid).
    position_encoding: str = "none"
    max_grid: int = 64
    # Addition, region tokens: add a linear embedding of (x1, y1, x2, y2, area), normalised to [0, 1]
    # (MCAN: no box information).
    box_embedding: bool = False
    # "mcan": mcan-vqa's LayerNorm (core/model/net_utils.py), a*(x-mean)/(std+1e-6)+b with the unbiased
    # std. "torch": nn.LayerNorm, (x-mean)/sqrt(biased var+1e-5) (a fused kernel).
    layer_norm: str = "mcan"

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"MCAN: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.position_encoding not in _POS_ENCS:
            raise ConfigError(f"MCAN: position_encoding {self.position_encoding!r} is not one of {_POS_ENCS}")
        if self.position_encoding == "sine" and self.hidden % 4:
            raise ConfigError(f"MCAN: sine position encoding needs hidden % 4 == 0, got {self.hidden}")
        if self.layer_norm not in LAYER_NORMS:
            raise ConfigError(f"MCAN: layer_norm {self.layer_norm!r} is not one of {LAYER_NORMS}")
        if min(self.hidden, self.layers, self.heads, self.ffn, self.flat_mlp, self.flat_glimpses,
               self.flat_out, self.word_dim, self.max_grid) <= 0:
            raise ConfigError(f"MCAN: sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MCAN: dropout must be in [0, 1), got {self.dropout}")


MCAN_SIZES: dict[str, MCANConfig] = {
    # Ours, for CPU runs: not an MCAN size.
    "tiny": MCANConfig(hidden=128, layers=2, heads=4, ffn=512, flat_mlp=128, flat_out=256),
    # mcan-vqa cfgs/small_model.yml (FF_SIZE = 4 x HIDDEN_SIZE in cfgs/base_cfgs.py).
    "small": MCANConfig(hidden=512, layers=6, heads=8, ffn=2048, flat_mlp=512, flat_out=1024),
    # mcan-vqa cfgs/large_model.yml: 8 heads of 128.
    "large": MCANConfig(hidden=1024, layers=6, heads=8, ffn=4096, flat_mlp=512, flat_out=2048),
}


def mcan_config(size: str | MCANConfig = "small", **overrides: Any) -> MCANConfig:
    """A named size (`tiny`, `small`, `large`) with any field overridden; an override of None keeps the
    size's own value (what a config's null asks for)."""
    if isinstance(size, MCANConfig):
        base = size
    elif size in MCAN_SIZES:
        base = MCAN_SIZES[size]
    else:
        raise ConfigError(f"MCAN: unknown size {size!r} (expected one of {sorted(MCAN_SIZES)})")
    names = {f.name for f in dataclasses.fields(MCANConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"MCAN: unknown config fields {unknown} (known: {sorted(names)})")
    for key in ("glove_path", "text_model_path"):
        if isinstance(overrides.get(key), os.PathLike):
            overrides[key] = os.fspath(overrides[key])
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


class MCANLayerNorm(nn.Module):
    """mcan-vqa's LayerNorm (core/model/net_utils.py): weight * (x - mean) / (std + eps) + bias, with the
    unbiased std and eps outside the root. Parameter names as nn.LayerNorm's."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 under bf16/fp16 autocast, as nn.LayerNorm does there (8 bits of mantissa
        # make a poor std); the output stays float32 like nn.LayerNorm's, keeping the residual stream.
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def layer_norm(kind: str, size: int) -> nn.Module:
    """The LayerNorm named by `MCANConfig.layer_norm`."""
    if kind == "mcan":
        return MCANLayerNorm(size)
    if kind == "torch":
        return nn.LayerNorm(size)
    raise ConfigError(f"MCAN: layer_norm {kind!r} is not one of {LAYER_NORMS}")


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    # A sample with no valid position would give NaN softmaxes that poison the batch's gradients;
    # let it attend everywhere instead (its output is meaningless either way). No host sync.
    return mask | ~mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention with a validity mask over keys; optionally returns head-averaged weights."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)

    def forward(
        self, query: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mha(
            query, kv, kv, key_padding_mask=~kv_mask, need_weights=need_weights, average_attn_weights=True
        )


def _ffn(hidden: int, ffn: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, hidden)
    )


class SA(nn.Module):
    """Self-attention block: x = LN(x + SA(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.att = Attention(cfg.hidden, cfg.heads, cfg.dropout)
        self.ffn = _ffn(cfg.hidden, cfg.ffn, cfg.dropout)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.norm1, self.norm2 = (layer_norm(cfg.layer_norm, cfg.hidden) for _ in range(2))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, w = self.att(x, x, mask, need_weights)
        x = self.norm1(x + self.drop1(a))
        x = self.norm2(x + self.drop2(self.ffn(x)))
        return x, w


class SGA(nn.Module):
    """Self + guided attention block: self-attention over x, then x attends to the guide y, then FFN."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.self_att = Attention(cfg.hidden, cfg.heads, cfg.dropout)
        self.guided_att = Attention(cfg.hidden, cfg.heads, cfg.dropout)
        self.ffn = _ffn(cfg.hidden, cfg.ffn, cfg.dropout)
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(cfg.dropout) for _ in range(3))
        self.norm1, self.norm2, self.norm3 = (layer_norm(cfg.layer_norm, cfg.hidden) for _ in range(3))

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        a, w_self = self.self_att(x, x, x_mask, need_weights)
        x = self.norm1(x + self.drop1(a))
        a, w_guided = self.guided_att(x, y, y_mask, need_weights)
        x = self.norm2(x + self.drop2(a))
        x = self.norm3(x + self.drop3(self.ffn(x)))
        return x, w_self, w_guided


class MCAEncoderDecoder(nn.Module):
    """L SA layers on the question; L SGA layers on the image, each guided by the *final* question."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(SA(cfg) for _ in range(cfg.layers))
        self.decoder = nn.ModuleList(SGA(cfg) for _ in range(cfg.layers))

    def forward(
        self,
        q: torch.Tensor,
        q_mask: torch.Tensor,
        v: torch.Tensor,
        v_mask: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[torch.Tensor]]]:
        att: dict[str, list[torch.Tensor]] = {"q_self": [], "v_self": [], "guided": []}
        for layer in self.encoder:
            q, w = layer(q, q_mask, need_weights)
            if need_weights:
                att["q_self"].append(w)
        for layer in self.decoder:
            v, w_self, w_guided = layer(v, v_mask, q, q_mask, need_weights)
            if need_weights:
                att["v_self"].append(w_self)
                att["guided"].append(w_guided)
        return q, v, att


class AttFlat(nn.Module):
    """Attention pooling: MLP scores per position, masked softmax over positions, weighted sum, linear."""

    def __init__(self, hidden: int, mid: int, glimpses: int, out: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mid), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(mid, glimpses)
        )
        self.merge = nn.Linear(hidden * glimpses, out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, H], mask [B, N] -> pooled [B, out], weights [B, N, glimpses] (0 on padding)."""
        scores = self.mlp(x).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = scores.softmax(dim=1)
        pooled = torch.einsum("bng,bnh->bgh", weights, x).flatten(1)
        return self.merge(pooled), weights


def sine_position_2d(
    y: torch.Tensor, x: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR-style 2-D sine encoding of coordinates in [0, 1]: [...] -> [..., dim] (half y, half x)."""
    quarter = dim // 4
    freq = temperature ** (-torch.arange(quarter, device=y.device, dtype=torch.float32) / quarter)

    def enc(c: torch.Tensor) -> torch.Tensor:
        a = c.float().unsqueeze(-1) * (2 * math.pi) * freq
        return torch.cat([a.sin(), a.cos()], dim=-1)

    return torch.cat([enc(y), enc(x)], dim=-1)


def _grid_hw_tensor(grid_hw: Any, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(grid_hw, dtype=torch.long, device=device)
    if t.shape == (2,):
        t = t.expand(batch, 2)
    if t.shape != (batch, 2):
        raise ConfigError(f"grid_hw must be (h, w) or [B, 2], got shape {tuple(t.shape)} for batch {batch}")
    return t


class VisualEmbed(nn.Module):
    """Visual features -> hidden-width tokens + mask; grid positions or box geometry added when asked.

    kind="grid": a map [B, C, h, w] (mask [B, h, w] or [B, h*w] for images padded into one map, valid
    cells top-left) or flattened tokens [B, N, C] (mask [B, N]; `grid_hw` (h, w) or [B, 2] gives each
    image's grid, row-major, needed for position encoding). kind="region": tokens [B, N, C], mask
    [B, N], boxes [B, N, 4] as x1, y1, x2, y2 normalised by the image size.
    """

    def __init__(
        self,
        kind: str,
        in_dim: int,
        hidden: int,
        position_encoding: str = "none",
        max_grid: int = 64,
        box_embedding: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("grid", "region"):
            raise ConfigError(f"visual kind {kind!r} is not 'grid' or 'region'")
        if position_encoding not in _POS_ENCS:
            raise ConfigError(f"position_encoding {position_encoding!r} is not one of {_POS_ENCS}")
        self.kind, self.in_dim, self.hidden = kind, in_dim, hidden
        self.pos_enc = position_encoding if kind == "grid" else "none"
        self.max_grid = max_grid
        self.proj = nn.Linear(in_dim, hidden)
        if self.pos_enc == "learned":
            self.row_embed = nn.Embedding(max_grid, hidden)
            self.col_embed = nn.Embedding(max_grid, hidden)
        self.box_proj = nn.Linear(5, hidden) if kind == "region" and box_embedding else None

    def forward(
        self,
        feats: torch.Tensor,
        mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        grid_hw: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> tokens [B, N, hidden], mask [B, N] (True = valid), grid_hw [B, 2] (grid only, else None)."""
        map_hw: tuple[int, int] | None = None  # a batch map: its flat cells are row-major in the map
        if feats.dim() == 4:
            feats, mask, grid_hw, map_hw = self._flatten_map(feats, mask, grid_hw)
        elif feats.dim() != 3:
            raise ConfigError(f"visual features must be [B, C, h, w] or [B, N, C], got {tuple(feats.shape)}")
        mask = self._token_mask(feats, mask)
        b, n = mask.shape
        # Zero padded tokens so that NaN/inf garbage there cannot leak through 0-weight attention.
        x = self.proj(torch.where(mask.unsqueeze(-1), feats, feats.new_zeros(())))
        hw = None
        if self.kind == "grid" and grid_hw is not None:
            hw = _grid_hw_tensor(grid_hw, b, feats.device)
        if self.pos_enc != "none":
            if hw is None:
                raise ConfigError("grid tokens [B, N, C] need grid_hw (h, w) for the position encoding")
            x = x + self._positions(hw, n, map_hw).to(x.dtype)
        if self.box_proj is not None:
            x = x + self._box_embedding(boxes, mask, x.dtype)
        return x, mask, hw

    def _flatten_map(
        self, feats: torch.Tensor, mask: torch.Tensor | None, grid_hw: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any, tuple[int, int]]:
        """A map [B, C, h, w] -> row-major tokens [B, h*w, C], its mask flattened, and the grid size
        (given, else counted from the mask, else the whole map)."""
        if self.kind != "grid":
            raise ConfigError(f"region features must be [B, N, C], got shape {tuple(feats.shape)}")
        b, h, w = feats.shape[0], feats.shape[2], feats.shape[3]
        feats = feats.flatten(2).transpose(1, 2)
        if mask is not None:
            mask = mask.reshape(b, h * w)
            if grid_hw is None:  # valid cells are top-left: count valid rows and columns
                m2 = mask.view(b, h, w)
                grid_hw = torch.stack([m2.any(2).sum(1), m2.any(1).sum(1)], dim=1)
        elif grid_hw is None:
            grid_hw = (h, w)
        return feats, mask, grid_hw, (h, w)

    def _token_mask(self, feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The tokens' validity mask [B, N] (all valid when none is given), checked against the tokens."""
        b, n, c = feats.shape
        if c != self.in_dim:
            raise ConfigError(f"visual features are {c}-d but the model was built for {self.in_dim}-d")
        mask = torch.ones(b, n, dtype=torch.bool, device=feats.device) if mask is None else mask.bool()
        if mask.shape != (b, n):
            raise ConfigError(f"visual mask shape {tuple(mask.shape)} does not match features [{b}, {n}, C]")
        return mask

    def _box_embedding(
        self, boxes: torch.Tensor | None, mask: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """box_proj of (x1, y1, x2, y2, area) per region, 0-input on padding."""
        b, n = mask.shape
        if boxes is None:
            raise ConfigError("region features need boxes [B, N, 4] (normalised x1, y1, x2, y2)")
        if boxes.shape != (b, n, 4):
            raise ConfigError(f"boxes shape {tuple(boxes.shape)} does not match features [{b}, {n}, 4]")
        wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
        geom = torch.cat([boxes, (wh[..., 0] * wh[..., 1]).unsqueeze(-1)], dim=-1)
        return self.box_proj(torch.where(mask.unsqueeze(-1), geom, geom.new_zeros(())).to(dtype))

    def _positions(self, hw: torch.Tensor, n: int, map_hw: tuple[int, int] | None) -> torch.Tensor:
        idx = torch.arange(n, device=hw.device).unsqueeze(0)
        width = hw[:, 1:].clamp(min=1)
        # Flat tokens are row-major in each image's own grid; a batch map is row-major in the map.
        stride = width if map_hw is None else map_hw[1]
        row, col = idx // stride, idx % stride  # [B or 1, N]; cells past the image are padding
        if self.pos_enc == "sine":
            height = hw[:, :1].clamp(min=1)
            return sine_position_2d((row + 0.5) / height, (col + 0.5) / width, self.hidden)
        if hw.device.type == "cpu" and int(hw.max()) > self.max_grid:  # a free check only off-GPU
            raise ConfigError(f"grid {hw.max().item()} cells wide/high exceeds max_grid={self.max_grid}")
        last = self.max_grid - 1
        return self.row_embed(row.clamp(max=last)) + self.col_embed(col.clamp(max=last))


@dataclass
class MCANOutput:
    """Logits [B, num_answers] and, when asked, attention weights for visualisation.

    attention: v_flat [B, Nv] and q_flat [B, T] (AttFlat weights, glimpse-averaged); guided, v_self,
    q_self: one tensor per layer, [B, Nv, T], [B, Nv, Nv], [B, T, T], averaged over heads; grid_hw
    [B, 2] for grid inputs (to fold v_flat back into a map). Weights are exactly 0 on padding.
    """

    logits: torch.Tensor
    attention: dict[str, Any] = field(default_factory=dict)


class MCAN(nn.Module):
    """MCAN encoder-decoder VQA head: question encoder + visual embedding + co-attention + classifier."""

    def __init__(
        self,
        cfg: MCANConfig,
        num_answers: int,
        visual_dim: int,
        vocab_size: int = 0,
        visual_kind: str = "grid",
        vocab: Mapping[str, int] | None = None,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if num_answers <= 0 or visual_dim <= 0:
            raise ConfigError(f"MCAN: num_answers ({num_answers}) and visual_dim ({visual_dim}) must be > 0")
        self.cfg = cfg
        self.text = build_text_encoder(
            cfg.text_encoder,
            cfg.hidden,
            vocab_size=vocab_size,
            word_dim=cfg.word_dim,
            pad_id=pad_id,
            glove_path=cfg.glove_path,
            vocab=vocab,
            model_path=cfg.text_model_path,
            freeze=cfg.freeze_text,
        )
        self.visual = VisualEmbed(
            visual_kind, visual_dim, cfg.hidden, cfg.position_encoding, cfg.max_grid, cfg.box_embedding
        )
        self.encoder_decoder = MCAEncoderDecoder(cfg)
        flat = (cfg.hidden, cfg.flat_mlp, cfg.flat_glimpses, cfg.flat_out, cfg.dropout)
        self.flat_q, self.flat_v = AttFlat(*flat), AttFlat(*flat)
        self.norm = layer_norm(cfg.layer_norm, cfg.flat_out)
        self.classifier = nn.Linear(cfg.flat_out, num_answers)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(
        self,
        q_tokens: torch.Tensor,
        q_mask: torch.Tensor | None,
        v_feats: torch.Tensor,
        v_mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        grid_hw: Any = None,
        return_attention: bool = False,
    ) -> torch.Tensor | MCANOutput:
        """q_tokens [B, T] ids, q_mask [B, T]; v_feats per `VisualEmbed`. Returns logits [B, A]
        (for BCE on soft scores), or an `MCANOutput` with attention weights when `return_attention`."""
        q, q_mask = self.text(q_tokens, q_mask)
        v, v_mask, hw = self.visual(v_feats, v_mask, boxes, grid_hw)
        q_mask, v_mask = _nonempty(q_mask), _nonempty(v_mask)
        q, v, att = self.encoder_decoder(q, q_mask, v, v_mask, need_weights=return_attention)
        q_vec, q_w = self.flat_q(q, q_mask)
        v_vec, v_w = self.flat_v(v, v_mask)
        logits = self.classifier(self.norm(q_vec + v_vec))
        if not return_attention:
            return logits
        att_out: dict[str, Any] = {"v_flat": v_w.mean(-1), "q_flat": q_w.mean(-1), **att}
        if hw is not None:
            att_out["grid_hw"] = hw
        return MCANOutput(logits, att_out)


# State dicts that call the encoder-decoder `backbone` (mcan-vqa's name for it, core/model/net.py; here
# `backbone` means the ResNet) load: their keys `<prefix>backbone.*` are read as `<prefix>encoder_decoder.*`.
_LEGACY_NAMES = {"backbone.": "encoder_decoder."}


def _rename_legacy_keys(
    _module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any
) -> None:
    """A load_state_dict pre-hook: renames, in place, only the keys under this MCAN's own prefix (a VQA
    model's ResNet at `backbone.*` sits beside the head, at another prefix, and is left alone)."""
    metadata = getattr(state_dict, "_metadata", None)  # per-module versions, keyed by module path
    for old, new in _LEGACY_NAMES.items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        old_path, new_path = prefix + old[:-1], prefix + new[:-1]
        for key in [k for k in metadata or () if k == old_path or k.startswith(old_path + ".")]:
            metadata[new_path + key[len(old_path):]] = metadata.pop(key)


def build_mcan(
    size: str | MCANConfig = "small",
    *,
    num_answers: int,
    visual_dim: int,
    vocab_size: int = 0,
    visual_kind: str = "grid",
    vocab: Mapping[str, int] | None = None,
    pad_id: int = 0,
    **overrides: Any,
) -> MCAN:
    """Hydra-friendly builder: a named size plus field overrides (`layers=2, position_encoding="sine"`)."""
    cfg = mcan_config(size, **overrides)
    return MCAN(cfg, num_answers, visual_dim, vocab_size, visual_kind, vocab, pad_id)
