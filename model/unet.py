"""The Stable Diffusion UNet (openaimodel ``UNetModel`` with ``SpatialTransformer``s), SD1 / SD2 / SDXL.

Attribute paths are the checkpoint keys below ``model.diffusion_model.``. Where the original applies
GroupNorm -> SiLU -> conv, the SiLU is fused into the GroupNorm call and an ``nn.Identity`` keeps the SiLU's
index in the ``nn.Sequential`` so the following layer's key (``in_layers.2``, ``out_layers.3``, ``out.2``) stays
the original's; the GroupNorm (+ SiLU) is applied in that conv's input load (``Conv2d(..., norm_in=...)``). The
time-embedding add and the residual adds are fused into the convolutions' epilogue; in the transformer blocks,
the LayerNorms into the prologue of the Linear GEMMs that read them, the residual adds and the GEGLU gate into
their epilogue (``dispatch.linear``).

Each GroupNorm's statistics come from the kernel that wrote its input (issue 22, item 6): every layer names the
GroupNorm it applies first (``in_norm``), ``forward_stats(x, ..., x_stats, out_norm)`` takes x's statistics for
it and returns the output with ``out_norm``'s (the next layer's, computed in its last conv's epilogue), and the
decoder's skip concatenation is a Triton concat that computes the output block's first norm's. Where no Triton
kernel made them (the reference, conv_in on cuDNN, a linear proj_out, a ControlNet residual added), the stats are
None and the consumer computes them itself.

The decoder's concatenation ``cat([h, skip], 1)`` is not stored where the output block's ResBlock has a conv
shortcut (issue 22, item 7): the concat's launch computes the statistics alone (``dispatch.concat_stats``), and
in_layers' conv and the shortcut conv each read h and skip themselves (``x2``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.model import hoist
from tritonsd.model.config import UNetConfig
from tritonsd.model.layers import (Conv2d, GroupNorm, LayerNorm, Upsample, in_norm, stack_rows_, stacked_rows,
                                  timestep_embedding)


class UNetShapeError(ValueError):
    """An input the UNet cannot take (latent sides, channels, missing conditioning)."""


class ResBlock(nn.Module):
    """GN -> SiLU -> conv (+ time embedding) -> GN -> SiLU -> conv (+ skip). ``emb`` is SiLU(time embedding),
    shared by every block (each original block starts its ``emb_layers`` with that SiLU)."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(32, channels), nn.Identity(), Conv2d(channels, out_channels, 3,
                                                                                      padding=1))
        self.emb_layers = nn.Sequential(nn.Identity(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm(32, out_channels), nn.Identity(), nn.Identity(),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    @property
    def in_norm(self) -> GroupNorm:
        return self.in_layers[0]

    def forward(self, x: torch.Tensor, emb: StepEmbedding | torch.Tensor) -> torch.Tensor:
        """``emb``: the step's ``StepEmbedding``, or SiLU(time embedding) itself (the ControlNet's blocks). Each
        GroupNorm + SiLU is applied in the next conv's input load (the normalised tensor is never stored)."""
        return self.forward_stats(x, emb)[0]

    @property
    def reads_two_inputs(self) -> bool:
        """Whether both convs that read the input can take it as two tensors (``x2``): a conv shortcut; an
        Identity one adds the input itself, which must then be stored."""
        return isinstance(self.skip_connection, Conv2d)

    def forward_stats(self, x: torch.Tensor, emb: StepEmbedding | torch.Tensor,
                      x_stats: dispatch.GroupStats | None = None,
                      out_norm: GroupNorm | None = None,
                      x2: torch.Tensor | None = None) -> tuple[torch.Tensor, dispatch.GroupStats | None]:
        """``forward``, with ``x_stats`` (``in_layers[0]``'s statistics of x, made by x's producer, or None) and
        the output's statistics for ``out_norm`` (the GroupNorm reading it next). in_layers' conv computes
        out_layers[0]'s statistics in its epilogue. ``x2``: the input is ``torch.cat([x, x2], 1)`` (a decoder
        block's h and skip), which in_layers' conv and the conv shortcut read from x and x2 (``x_stats`` are then
        the concatenation's)."""
        if x2 is not None and not self.reads_two_inputs:
            x, x2 = dispatch.concat_channels(x, x2), None
        proj = emb.projection(self) if isinstance(emb, StepEmbedding) else self.emb_layers[1](emb)
        h, h_stats = self.in_layers[2].forward_stats(
            x, self.out_layers[0], emb=proj, norm_in=self.in_layers[0].as_prologue(silu=True, stats=x_stats),
            **_second_input(x2))
        return self.out_layers[3].forward_stats(
            h, out_norm, residual=self.skip_connection(x, **_second_input(x2)),
            norm_in=self.out_layers[0].as_prologue(silu=True, stats=h_stats))


def _second_input(x2: torch.Tensor | None) -> dict:
    """``{"x2": x2}`` for a conv reading two inputs, else nothing (an Identity shortcut takes no keywords)."""
    return {} if x2 is None else {"x2": x2}


class StepEmbedding:
    """What one step's time embedding gives the ResBlocks: ``silu`` = SiLU(time embedding) [B, time_embed_dim] and,
    when made by ``UNetModel.step_embedding`` before the loop, every ResBlock's projection of it (its
    ``emb_layers``, [B, C]), so that the step launches none of them. Without them a ResBlock projects ``silu``
    itself, as the original does. For SDXL, whose embedding adds the conditioning's ``label_emb(y)``, only
    ``time`` (the time MLP's output before that add) is made before the loop, ``silu`` is None."""

    def __init__(self, silu: torch.Tensor | None, projections: dict[nn.Module, torch.Tensor] | None = None,
                 time: torch.Tensor | None = None):
        self.silu = silu
        self.projections = projections
        self.time = time

    @property
    def batch(self) -> int:
        return (self.silu if self.silu is not None else self.time).shape[0]

    def projection(self, block: ResBlock) -> torch.Tensor:
        if self.projections is None:
            return block.emb_layers[1](self.silu)
        return self.projections[block]


class StepEmbedder:
    """``UNetModel.step_embedding`` for the sampler's per-step tables (``sampler/denoise.StepTables``), with the
    weights' ``version``: the tables recompute their rows in place when it changes (a LoRA switch writes into
    ``time_embed`` / ``emb_layers`` weights; a captured graph keeps reading the rows' storage)."""

    def __init__(self, unet: UNetModel):
        self.unet = unet

    def __call__(self, t_emb: torch.Tensor, out: StepEmbedding | None = None) -> StepEmbedding:
        return self.unet.step_embedding(t_emb, out)

    def version(self) -> tuple:
        params = self.unet.step_embedding_parameters()
        try:
            return tuple((p.data_ptr(), p._version) for p in params)
        except RuntimeError:  # inference tensors keep no version counter (and cannot be written outside one)
            return tuple(p.data_ptr() for p in params)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None).

    ``fused_qkv`` (self-attention): the to_q, to_k and to_v weights are views of one [3 * inner, query_dim]
    storage (``layers.stack_rows_``), so self-attention projects q, k and v in one GEMM that reads x once, and
    attention reads its three [B, N, inner] column slices in place. The Parameters stay separate objects with the
    checkpoint's names (LoRA deltas and loads write into their rows of the shared storage); it is re-established
    after a load that assigns new tensors and after ``.to()``, and while it does not hold (weights replaced some
    other way) the three projections run apart, with the same result. ``kernel_layout`` False (``model/sd.py``
    ``load_weights_``, for a model only the torch reference runs: as ``layers.Conv2d``'s) keeps the loaded weights
    apart, mapped from the file rather than copied into a shared storage."""

    kernel_layout = True  # see the class docstring

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, fused_qkv: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # [1] was Dropout
        self.fused_qkv = fused_qkv and query_dim == context_dim
        if self.fused_qkv:
            self._stack_qkv()
            self.register_load_state_dict_post_hook(_restack_qkv)  # module-level functions: the module pickles
            self._register_state_dict_hook(_unshare_qkv)

    def _qkv_params(self) -> list[nn.Parameter]:
        return [self.to_q.weight, self.to_k.weight, self.to_v.weight]

    def _stack_qkv(self) -> None:
        if self.kernel_layout:
            stack_rows_(self._qkv_params())

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy / unpickling: Parameter copies of their own
        if self.fused_qkv:
            self._stack_qkv()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # .to() / .half() give each parameter its own new tensor
        if self.fused_qkv:
            self._stack_qkv()
        return out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                norm: dispatch.Norm | None = None) -> torch.Tensor:
        """``to_out(attention(norm(x), context)) + residual``: the LayerNorm ``norm`` in the prologue of the GEMM(s)
        that read x (with a context: in the attention kernel, which projects q itself), the residual add in the
        out-projection's epilogue. to_q's weight is read at each call (a LoRA changes it in place)."""
        if context is not None:  # q projected inside the attention kernel (dispatch.cross_attention)
            k, v = self._context_kv(context)
            out = dispatch.cross_attention(x, self.to_q.weight, self.to_q.bias, k, v, self.heads, norm=norm)
            return dispatch.linear(out, self.to_out[0].weight, self.to_out[0].bias, residual=residual)
        fuse = self.fused_qkv and dispatch.is_fused("qkv")
        qkv = stacked_rows(self._qkv_params()) if fuse else None
        if qkv is not None:  # [B, N, 3 * inner] -> 3 x [B, N, inner] views
            q, k, v = dispatch.linear(x, qkv, norm=norm).chunk(3, dim=-1)
        else:
            if norm is not None:  # self-attention apart: k and v read the normalised x too
                x, norm = dispatch.layer_norm(x, *norm), None
            q = dispatch.linear(x, self.to_q.weight, self.to_q.bias)
            k, v = self.to_k(x), self.to_v(x)
        out = dispatch.attention(q, k, v, self.heads)
        return dispatch.linear(out, self.to_out[0].weight, self.to_out[0].bias, residual=residual)

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of the context, once per distinct context in a run (model/hoist.py): the same at every step."""
        return hoist.once(self, (context, self.to_k.weight, self.to_v.weight),
                          lambda: (self.to_k(context), self.to_v(context)))


def _restack_qkv(module: CrossAttention, _incompatible_keys) -> None:
    """After a load (an assigning one gives each weight its own new tensor): the q / k / v rows stacked again."""
    module._stack_qkv()


def _unshare_qkv(module: CrossAttention, state: dict, prefix: str, _meta) -> None:
    """``state_dict()`` gives to_q / to_k / to_v as tensors of their own (files cannot hold shared storage);
    ``keep_vars=True`` gives the Parameters themselves."""
    for name in ("to_q", "to_k", "to_v"):
        key = f"{prefix}{name}.weight"
        if key in state and not isinstance(state[key], nn.Parameter):
            state[key] = state[key].clone()


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor, norm: dispatch.Norm | None = None) -> torch.Tensor:
        """``a * gelu(gate)`` of ``proj(norm(x))``'s halves, in the projection's epilogue (no 2F-wide product
        stored); the LayerNorm ``norm`` in its prologue."""
        return dispatch.linear(x, self.proj.weight, self.proj.bias, geglu=True, norm=norm)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))  # [1] was Dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                norm: dispatch.Norm | None = None) -> torch.Tensor:
        out = self.net[2]
        return dispatch.linear(self.net[0](x, norm=norm), out.weight, out.bias, residual=residual)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, fused_qkv=True)
        self.ff = FeedForward(dim, dim * 4)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # each LayerNorm in the prologue of the GEMM(s) reading its output, each residual add in the last epilogue
        x = self.attn1(x, residual=x, norm=self.norm1.as_prologue())
        x = self.attn2(x, context, residual=x, norm=self.norm2.as_prologue())
        return self.ff(x, residual=x, norm=self.norm3.as_prologue())


class SpatialTransformer(nn.Module):
    """GN -> proj_in (1x1 conv, or Linear when ``linear``) -> transformer blocks -> proj_out, plus the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm(32, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    @property
    def in_norm(self) -> GroupNorm | None:
        """The GroupNorm applied in proj_in's load; None for a linear proj_in (that norm runs apart)."""
        return None if self.linear else self.norm

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.forward_stats(x, context)[0]

    def forward_stats(self, x: torch.Tensor, context: torch.Tensor, x_stats: dispatch.GroupStats | None = None,
                      out_norm: GroupNorm | None = None) -> tuple[torch.Tensor, dispatch.GroupStats | None]:
        """``forward`` with the norm's statistics of x made by its producer (``x_stats``) and ``out_norm``'s of
        the output (the conv proj_out's epilogue; a linear proj_out makes none)."""
        b, c, h, w = x.shape
        if self.linear:
            y = self.norm(x)
        else:  # the GroupNorm in the 1x1 conv's input load
            y = self.proj_in(x, norm_in=self.norm.as_prologue(stats=x_stats))
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, H, W] -> [B, H*W, C]
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:  # the input added in proj_out's epilogue, read as [B, H*W, C] through x's strides
            y = dispatch.linear(y, self.proj_out.weight, self.proj_out.bias,
                                residual=x.permute(0, 2, 3, 1).reshape(b, h * w, c))
            return y.reshape(b, h, w, c).permute(0, 3, 1, 2), None  # [B, H*W, C] -> [B, C, H, W] (channels-last)
        # [B, H*W, C] -> [B, C, H, W], a channels-last view: the conv reads it as it lies (no copy either way)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj_out.forward_stats(y, out_norm, residual=x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def forward_stats(self, x: torch.Tensor, out_norm: GroupNorm | None = None):
        return self.op.forward_stats(x, out_norm)


class TimestepBlock(nn.Sequential):
    """One entry of input_blocks / output_blocks / middle_block: layers that each take what they need.

    Each layer's output is what the next layer reads first: where that layer starts with a GroupNorm
    (``in_norm``: a ResBlock's in_layers[0], a SpatialTransformer's norm), the layer before computes its
    statistics in its last kernel's epilogue and hands them on (issue 22, item 6); the last layer does the same
    for ``out_norm``, the GroupNorm after the block (``forward_stats``)."""

    @property
    def in_norm(self) -> GroupNorm | None:
        return in_norm(self[0])

    def forward(self, x: torch.Tensor, emb: StepEmbedding | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Each layer called as a module (its hooks run), no statistics handed on: the torch reference's path."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    @property
    def reads_two_inputs(self) -> bool:
        """Whether the block can take its input as two tensors (``forward_stats``'s ``x2``): it starts with a
        ResBlock that can."""
        return isinstance(self[0], ResBlock) and self[0].reads_two_inputs

    def forward_stats(self, x: torch.Tensor, emb: StepEmbedding | torch.Tensor, context: torch.Tensor,
                      x_stats: dispatch.GroupStats | None = None,
                      out_norm: GroupNorm | None = None,
                      x2: torch.Tensor | None = None) -> tuple[torch.Tensor, dispatch.GroupStats | None]:
        """``forward``; ``x_stats``: the first layer's GroupNorm statistics of x (from x's producer) or None;
        returns the output and ``out_norm``'s statistics of it (None where no Triton kernel made them).
        ``x2``: the input is ``torch.cat([x, x2], 1)``, which the first layer reads apart (``reads_two_inputs``;
        other blocks get the concatenation)."""
        if x2 is not None and not self.reads_two_inputs:
            x, x2 = dispatch.concat_channels(x, x2), None
        stats = x_stats
        for i, layer in enumerate(self):
            nxt = in_norm(self[i + 1]) if i + 1 < len(self) else out_norm
            if isinstance(layer, ResBlock):
                x, stats = layer.forward_stats(x, emb, stats, nxt, x2=x2 if i == 0 else None)
            elif isinstance(layer, SpatialTransformer):
                x, stats = layer.forward_stats(x, context, stats, nxt)
            elif isinstance(layer, (Conv2d, Downsample, Upsample)):  # they read x as it is: stats unused
                x, stats = layer.forward_stats(x, nxt)
            else:
                x, stats = layer(x), None
        return x, stats


def time_layers(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Sequential | None]:
    """``time_embed`` and, for SDXL's vector conditioning, ``label_emb`` (None without one)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    if cfg.adm_in_channels is None:
        return time_embed, None
    return time_embed, nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(),
                                                   nn.Linear(ted, ted)))


def _transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    return SpatialTransformer(ch, cfg.heads_at(ch), depth, cfg.context_dim, cfg.use_linear_in_transformer)


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """``input_blocks`` (conv_in, then per level its ResBlocks [+ transformers] and, but for the last level, a
    Downsample) and each block's output channels: the skips the decoder takes, and the ControlNet's zero convs
    (the ControlNet is a copy of this encoder)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    blocks = nn.ModuleList([TimestepBlock(Conv2d(cfg.in_channels, mc, 3, padding=1))])
    channels = [mc]
    ch = mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, mult * mc, ted)]
            ch = mult * mc
            if cfg.transformer_depth[level]:
                layers.append(_transformer(cfg, ch, cfg.transformer_depth[level]))
            blocks.append(TimestepBlock(*layers))
            channels.append(ch)
        if level != last:
            blocks.append(TimestepBlock(Downsample(ch)))
            channels.append(ch)
    return blocks, channels


def middle_block(cfg: UNetConfig, ch: int) -> TimestepBlock:
    return TimestepBlock(ResBlock(ch, ch, cfg.time_embed_dim), _transformer(cfg, ch, cfg.transformer_depth_middle),
                         ResBlock(ch, ch, cfg.time_embed_dim))


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        time_embed, label_emb = time_layers(cfg)
        self.time_embed = time_embed
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg, ch)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * mc, ted)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(_transformer(cfg, ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(GroupNorm(32, ch), nn.Identity(), Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None, t_emb: torch.Tensor | None = None,
                step_emb: StepEmbedding | None = None, control: list[torch.Tensor] | None = None,
                only_mid_control: bool = False) -> torch.Tensor:
        """x [B, in_channels, H, W], timesteps [B] or scalar (may be fractional), context [B, N, context_dim],
        y [B, adm_in_channels] (SDXL only) -> [B, out_channels, H, W]. ``t_emb`` [B, model_channels] float32, any
        strides: ``timestep_embedding(timesteps, model_channels)`` computed by the caller (the sampler's per-step
        tables), which the step then skips. ``step_emb``: ``step_embedding(t_emb)`` made by the caller before the
        loop (no ``y``): the step then skips the time MLP and every ResBlock's projection too.

        ``control``: ControlNet residuals, already scaled (``control/apply.py``), one per input block plus the
        middle block's, added as the original ``ControlledUnetModel`` adds them: the last to h after the middle
        block, then output block j gets ``cat([h, skip + control[-2 - j]])`` (``only_mid_control``: the middle
        one only). A residual of another size than its skip is first resized to it (nearest), as
        sd-webui-controlnet's ``aligned_adding`` does. None: the plain UNet, unchanged."""
        self._check_inputs(x, context, y)
        dtype = self.time_embed[0].weight.dtype
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.numel() not in (1, x.shape[0]):
            raise UNetShapeError(f"got {t.numel()} timesteps for a batch of {x.shape[0]}")
        t = t.expand(x.shape[0])  # one timestep for every row, or one per row
        if step_emb is not None and step_emb.batch != x.shape[0]:
            raise UNetShapeError(f"step_emb is for a batch of {step_emb.batch}, not {x.shape[0]}")
        if step_emb is not None and y is None and step_emb.silu is not None:
            emb = step_emb
        elif step_emb is not None and y is not None and step_emb.time is not None:  # SDXL: y joins per call
            emb = StepEmbedding(self._label_silu(step_emb.time, y))
        else:
            if t_emb is None:
                t_emb = timestep_embedding(t, self.cfg.model_channels)
            emb = StepEmbedding(self._time_silu(t_emb, x.shape[0], y))

        h = x.to(dtype)
        context = hoist.once(("context", dtype), (context,), lambda: context.to(dtype))
        skips = []
        stats = None  # the GroupNorm statistics of h for the next block's first norm, when its producer made them
        for i, block in enumerate(self.input_blocks):
            nxt = self.input_blocks[i + 1] if i + 1 < len(self.input_blocks) else self.middle_block
            h, stats = _run_block(block, h, emb, context, stats, nxt.in_norm)
            skips.append(h)
        h, _ = _run_block(self.middle_block, h, emb, context, stats, None)  # it feeds a concat, which makes its own
        control = self._check_control(control, len(skips))
        if control is not None:
            h = _aligned_add(h, control.pop())
            if only_mid_control:
                control = None
        for j, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if control is not None:
                skip = _aligned_add(skip, control.pop())
            if h.shape[-2:] != skip.shape[-2:]:  # odd sizes (A1111's sd_hijack_unet): upsampled -> skip's size
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h, x2, stats = _block_input(block, h, skip)
            last = j + 1 == len(self.output_blocks)
            h, stats = _run_block(block, h, emb, context, stats, self.out[0] if last else None, x2)
        return self.out[2](h, norm_in=self.out[0].as_prologue(silu=True, stats=stats))

    def _time_silu(self, t_emb: torch.Tensor, batch: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(time_embed(t_emb) [+ label_emb(y)]): what every ResBlock's ``emb_layers`` projects."""
        return self._label_silu(self._time_mlp(t_emb, batch), y)

    def _time_mlp(self, t_emb: torch.Tensor, batch: int) -> torch.Tensor:
        if tuple(t_emb.shape) != (batch, self.cfg.model_channels):
            raise UNetShapeError(f"t_emb must be [{batch}, {self.cfg.model_channels}], got {list(t_emb.shape)}")
        dtype = self.time_embed[0].weight.dtype
        return self.time_embed(t_emb.to(dtype).contiguous())  # a table row expanded over the batch: made dense

    def _label_silu(self, emb: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        dtype = self.time_embed[0].weight.dtype
        if y is not None:  # the conditioning's vector: the same at every step of a run (model/hoist.py)
            label = hoist.once(("label_emb", dtype), (y, *self.label_emb.parameters()),
                               lambda: self.label_emb(y.to(dtype)))
            emb = emb + label
        return F.silu(emb)

    def res_blocks(self) -> list[ResBlock]:
        return [m for m in self.modules() if isinstance(m, ResBlock)]

    def step_embedding(self, t_emb: torch.Tensor, out: StepEmbedding | None = None) -> StepEmbedding:
        """The time MLP and every ResBlock's projection for ``t_emb`` [B, model_channels] (the sinusoid, as
        ``forward`` takes it), by the very operations ``forward`` runs on it, so a step given the result computes
        what it would have. For a UNet with ``y`` (SDXL), whose embedding adds the conditioning's, the time MLP
        alone. ``out``: a previous result whose tensors receive the values in place (a captured graph reads them)."""
        time = self._time_mlp(t_emb, t_emb.shape[0])
        if self.cfg.adm_in_channels is not None:
            if out is None:
                return StepEmbedding(None, time=time)
            out.time.copy_(time)
            return out
        silu = self._label_silu(time, None)
        projections = {block: block.emb_layers[1](silu) for block in self.res_blocks()}
        if out is None:
            return StepEmbedding(silu, projections)
        out.silu.copy_(silu)
        for block, value in projections.items():
            out.projections[block].copy_(value)
        return out

    def step_embedding_parameters(self) -> list[torch.Tensor]:
        """The weights ``step_embedding`` reads."""
        return [*self.time_embed.parameters(), *(p for b in self.res_blocks() for p in b.emb_layers.parameters())]

    @staticmethod
    def _check_control(control, skips: int) -> list[torch.Tensor] | None:
        """A copy of the residual list (popped from the end), or None; one line when it does not pair up."""
        if control is None:
            return None
        if len(control) != skips + 1:
            raise UNetShapeError(f"got {len(control)} control residuals; this UNet takes {skips + 1} (one per "
                                 "input block and the middle block's)")
        return list(control)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise UNetShapeError(f"UNet input must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise UNetShapeError(f"latent height and width must be at least 1, got {x.shape[2]}x{x.shape[3]}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise UNetShapeError(f"context must be [B, N, {cfg.context_dim}], got {list(context.shape)}")
        if (y is None) != (cfg.adm_in_channels is None):
            need = f"a [B, {cfg.adm_in_channels}] vector y" if cfg.adm_in_channels else "no y"
            raise UNetShapeError(f"this UNet needs {need}")


def _stats_path(h: torch.Tensor) -> bool:
    """Whether the blocks hand statistics on (``forward_stats``): where Triton kernels make them."""
    return dispatch.use_triton(h) and dispatch.is_fused("group_stats")


def _block_input(block: TimestepBlock, h: torch.Tensor, skip: torch.Tensor):
    """(x, x2, statistics) for an output block: ``torch.cat([h, skip], 1)`` with its first GroupNorm's statistics
    (the Triton concat computes them as it writes), x2 None; or, on the statistics path where the block's
    ResBlock has a conv shortcut (issue 22 item 7), h and skip apart with the statistics alone: its two convs
    read both, and the concatenation is never stored."""
    norm = block.in_norm.as_prologue()
    if (_stats_path(h) and dispatch.is_fused("skip_concat") and dispatch.is_fused("group_norm")
            and block.reads_two_inputs):
        return h, skip, dispatch.concat_stats(h, skip, stats_for=norm)
    x, stats = dispatch.concat_channels(h, skip, stats_for=norm)
    return x, None, stats


def _run_block(block: TimestepBlock, h: torch.Tensor, emb, context: torch.Tensor,
               stats: dispatch.GroupStats | None, out_norm: GroupNorm | None, x2: torch.Tensor | None = None):
    """(output, out_norm's statistics or None): ``forward_stats`` where Triton kernels can make statistics;
    elsewhere the block called as a module, as the original calls it (forward hooks on blocks and layers run).
    ``x2``: the block's input is ``torch.cat([h, x2], 1)``, read apart (``_block_input``)."""
    if _stats_path(h):
        return block.forward_stats(h, emb, context, stats, out_norm, x2=x2)
    if x2 is not None:
        h = dispatch.concat_channels(h, x2)
    return block(h, emb, context), None


def _aligned_add(base: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``base + residual``, the residual first resized to base's size (nearest) when its own differs and is more
    than 1x1 (sd-webui-controlnet ``hook.aligned_adding``)."""
    if residual.shape[-2:] != base.shape[-2:] and (residual.shape[-2] > 1 or residual.shape[-1] > 1):
        residual = F.interpolate(residual, size=base.shape[-2:], mode="nearest")
    return base + residual.to(base.dtype)
