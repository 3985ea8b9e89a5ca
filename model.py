"""
A decoder-only transformer for the Llama and Qwen2/Qwen2.5 families, written out in full.

One class, `Transformer`, and one forward, with three ways to say how tokens attend:
  1. a padded batch              model(idx, attention_mask=mask)            -> logits (B, T, V)
  2. packed sequences (training) model(idx, cu_seqlens=cu)                  -> logits (1, T, V)
  3. your own attention          model(idx, attend=fn, positions=pos)       -> logits (B, T, V)
The third is how rollout.py's sampler runs the model against its KV cache: fn(layer, q, k, v) gets
each layer's rotated queries, keys and values and returns the attention output, and may read and
write a cache on the way; everything else (norms, projections, rotary, MLP) is this forward's.
Pass `return_hidden=True` to get the final hidden states (B, T, H) instead of logits: the RL loss
fuses the lm_head into its kernel (srpo_kernels/) so the (T, V) logits never exist. Or pass `head=fn`
to have fn(hidden, lm_head_weight) run inside forward: with FSDP2 that is where the sharded
lm_head weight is whole.

Weights come in and go out through weights.py (Hugging Face folders and GGUF files). transformers
gives us configs and tokenizers; the network itself is below, parameter names matching Hugging
Face's so no renaming table is needed.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# flash-attn is optional (a CUDA-only extra). Without it we use torch's own attention kernels.
try:
    from flash_attn import flash_attn_varlen_func
except (ImportError, OSError) as e:
    flash_attn_varlen_func = None
    if getattr(e, "name", None) != "flash_attn":
        # Installed but unusable (built for another torch or CUDA): not the quiet "not installed" case.
        warnings.warn(f"flash-attn is installed but does not import ({type(e).__name__}: {e}); packed "
                      f"attention falls back to flex_attention")

SUPPORTED_ARCHS = ("llama", "qwen2")

# -----------------------------------------------------------------------------
# Config: a flat view of the Hugging Face config, with the few fields the network uses.


@dataclass
class ModelConfig:
    arch: str                 # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int          # H
    intermediate_size: int    # the SwiGLU MLP's inner width
    n_layers: int
    n_heads: int              # query heads
    n_kv_heads: int           # key/value heads; n_heads % n_kv_heads == 0 (grouped-query attention)
    head_dim: int
    rms_eps: float
    qkv_bias: bool            # Qwen2 has biases on q, k, v (not on o); Llama has none by default
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool      # lm_head shares the token embedding matrix (SmolLM2, small Qwens)

    @staticmethod
    def from_hf(hf) -> "ModelConfig":
        arch = getattr(hf, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}: model.py implements "
                             f"{', '.join(SUPPORTED_ARCHS)} (Llama, SmolLM, Qwen2, Qwen2.5)")
        if arch == "qwen2" and getattr(hf, "use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention is not implemented (use_sliding_window=True)")
        n_heads = hf.num_attention_heads
        return ModelConfig(
            arch=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, n_layers=hf.num_hidden_layers, n_heads=n_heads,
            n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // n_heads,
            rms_eps=hf.rms_norm_eps,
            qkv_bias=True if arch == "qwen2" else bool(getattr(hf, "attention_bias", False)),
            o_bias=False if arch == "qwen2" else bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        )


def rope_inv_freq(hf, head_dim: int) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim/2,), fp32. Plain RoPE is one line; scaled variants
    (Llama 3's, YaRN, ...) come from transformers' own table rather than being re-derived here."""
    params = getattr(hf, "rope_parameters", None) or {}       # transformers >= 5
    scaling = getattr(hf, "rope_scaling", None) or {}         # transformers 4.x
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        theta = params.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    if attention_factor != 1.0:
        raise ValueError(f"rope_type {rope_type!r} with attention scaling {attention_factor} "
                         f"is not supported")
    return inv_freq.float()

# -----------------------------------------------------------------------------
# The network


def compute_dtype(device_type: str, weights: torch.dtype) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on (over fp32 weights), else the weights'."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weights


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 (the residual stream is fp32), scale by the weight as the compute dtype
        # holds it, and round once to that dtype for the matmuls that read the result: the same
        # roundings whether the weights are fp32 under autocast or bf16 (FSDP2, the sampler's copy).
        dt = compute_dtype(x.device.type, self.weight.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(dt)).to(dt)


class Rotary(nn.Module):
    """cos/sin tables for rotary position embeddings, computed from positions on the fly, so packed
    sequences (positions restart per document) and decoding (one position per row) cost nothing extra."""

    def __init__(self, inv_freq):
        super().__init__()
        self.inv_freq_master = inv_freq  # fp32 on CPU, never touched by .to()
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the frequencies, and at position 4000 a rounded
        # frequency is a visibly wrong angle. Follow the device, keep fp32.
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq_master.to(self.inv_freq.device)
        return self

    def forward(self, positions):
        # fp32 tables in every precision: a bf16 angle at position 4000 is visibly wrong
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]      # (B, 1, T, D): broadcast over heads
        return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    # The "rotate half" convention of the Hugging Face checkpoints: pairs are (i, i + D/2).
    # Rotated in fp32 (the tables' dtype), then back to x's dtype: in bf16 q and k reach attention
    # in bf16 beside a bf16 v, rounded once.
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


@dataclass
class AttnInputs:
    """How the tokens of one forward call may attend, worked out once and shared by all layers."""
    positions: torch.Tensor                  # (B, T) each token's position, for rotary
    mask: torch.Tensor | None = None         # bool, True = may attend: (B|1, 1, T, T) for SDPA
    cu_seqlens: torch.Tensor | None = None   # (n_docs + 1,) int32, packed sequences for flash-attn
    max_seqlen: int = 0
    block_mask: object = None                # flex_attention's BlockMask, packed sequences

    def attend(self, layer: int, q, k, v):
        """Forward's own `attend` (modes 1 and 2): q (B, nh, T, D), k and v (B, nkv, T, D)
        -> y (B, nh, T, D)."""
        if self.cu_seqlens is not None:
            # flash-attn's varlen kernel: documents side by side in one row, no mask materialised.
            y = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                       self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                       causal=True)
            return y.transpose(0, 1)[None]                                   # (1, nh, T, D)
        if self.block_mask is not None:
            # Past dynamo's recompile limit the compiled function would run flex eagerly, and quietly.
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return _flex_attention()(q, k, v, block_mask=self.block_mask, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, attend):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend(self.layer_idx, q, k, v)                                  # (B, nh, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, hf_config):
        super().__init__()
        self.hf_config = hf_config  # kept whole, so weights.save_model writes back exactly what came in
        self.config = cfg = ModelConfig.from_hf(hf_config)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        # The rotary table is computed, never loaded: make it on the CPU even when the model is
        # built on the meta device (sharded loading), so that .to_empty() can restore it from there.
        with torch.device("cpu"):
            self.rotary = Rotary(rope_inv_freq(hf_config, cfg.head_dim))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Activation checkpointing: keep only each block's input during the forward and recompute
        # the block in the backward. About a third more compute for a fraction of the activation
        # memory; what lets long packed micro-batches of a 1.5B model fit in 80 GB.
        self.grad_ckpt = False

    @property
    def lm_head_weight(self):  # (V, H)
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx, *, attention_mask=None, cu_seqlens=None, branches=None, attend=None,
                positions=None, return_hidden=False, head=None, packed_attention="auto"):
        """idx: (B, T) token ids. At most one of:
          attention_mask (B, T): 1 = real token, 0 = padding (left or right); padding is never attended.
          cu_seqlens (n+1,): packed sequences in one row (B = 1), boundaries at cu_seqlens[i];
              positions restart at 0 for each, and no token attends across a boundary.
              With branches (T,) int: each sequence is a trunk (branches 0, first) and branches after
              it (1, 2, ..., each a contiguous run): a branch token attends to the whole trunk and to
              its own branch, and its positions continue from the trunk's end. The G responses to one
              prompt, sharing the prompt's forward (srpo.policy_update).
          attend + positions (B, T): the caller's attention, e.g. against a KV cache (rollout.py). Row b's
              tokens sit at positions[b]; each layer calls attend(layer, q, k, v) -> y with q (B, nh, T, D),
              k and v (B, nkv, T, D) after rotary, y (B, nh, T, D).
        With none of them, every row is one causal sequence from position 0.
        packed_attention: the attention kernel for packed sequences (cu_seqlens). "auto": flash-attn's
            varlen kernel when it is installed and the tensors are on a GPU, else flex_attention on a
            GPU, else SDPA with a dense mask. "flash", "flex" or "sdpa" forces one, e.g. "sdpa" as the
            plain reference when debugging. On a CPU, flex_attention runs forward only (no backward):
            tests use it to check its document mask.
        Returns logits (B, T, V) in fp32, hidden states (B, T, H) if return_hidden, or head(hidden, W)."""
        if idx.dim() == 1:
            idx = idx[None]
        if sum(x is not None for x in (attention_mask, cu_seqlens, attend)) > 1:
            raise ValueError("pass at most one of attention_mask, cu_seqlens, attend")
        if branches is not None and cu_seqlens is None:
            raise ValueError("branches (T,) describe packed sequences: pass cu_seqlens with them")
        if (attend is None) != (positions is None):
            raise ValueError("attend and positions (B, T) go together: the positions of the caller's "
                             "attention")
        x = self.embed_tokens(idx)                                   # (B, T, H)
        # One numeric recipe for the trainer (fp32 weights under autocast, or FSDP2's bf16 weights)
        # and the sampler (a bf16 copy), so that they give a token the same log-prob up to kernel
        # rounding: matmuls in the compute dtype (autocast's, else the weights': bf16 on GPUs, fp32
        # on a CPU); the residual stream, the norms' arithmetic and the rotary tables in fp32; the
        # embeddings and the norms' weights as the compute dtype holds them.
        dtype = compute_dtype(idx.device.type, x.dtype)
        x = x.to(dtype).float()                                      # (B, T, H) fp32 residual stream
        if attend is None:
            a = self._attention_inputs(idx, attention_mask, cu_seqlens, dtype, branches, packed_attention)
            attend, positions = a.attend, a.positions
        cos, sin = self.rotary(positions)                            # (B, 1, T, D) each, fp32
        for block in self.layers:  # the one layer loop: training, scoring and sampling all come here
            if self.grad_ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attend, use_reentrant=False)
            else:
                x = block(x, cos, sin, attend)
        x = self.norm(x)                                             # (B, T, H)
        if head is not None:
            return head(x, self.lm_head_weight)
        if return_hidden:
            return x
        return F.linear(x, self.lm_head_weight).float()              # (B, T, V)

    def _attention_inputs(self, idx, attention_mask, cu_seqlens, dtype, branches=None,
                          packed_attention="auto") -> AttnInputs:
        """Only what the chosen kernel reads: a dense (T, T) mask is built for SDPA alone (at 16k
        packed tokens it is 256 MiB of bools, plus as much again in temporaries while it is built)."""
        B, T = idx.shape
        dev = idx.device
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed sequences go in one row: idx must be (1, T), "
                                 f"got {tuple(idx.shape)}")
            cu_seqlens = cu_seqlens.to(device=dev, dtype=torch.int32)
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {cu_seqlens.tolist()}")
            lengths = cu_seqlens.diff()
            doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths)  # (T,)
            positions = (torch.arange(T, device=dev) - cu_seqlens[:-1].long()[doc])[None]   # (1, T)
            if branches is not None:
                branches = branches.to(dev)
                positions = branch_positions(doc, branches, positions[0])[None]
            impl = _packed_attention(idx.is_cuda, dtype, packed_attention)
            if impl == "flash" and branches is None:  # flash-attn reads the document boundaries themselves
                return AttnInputs(positions=positions, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))
            if impl in ("flash", "flex"):
                # A block-sparse document mask (flash-attn has no mask for branches), always with
                # branches (none: all trunk), so that every call has the same mask_mod and the compiled
                # flex_attention is not recompiled for a second one (inductor's CPU code for that
                # recompile fails to build on torch 2.13).
                trunk = branches if branches is not None else torch.zeros_like(doc)
                return AttnInputs(positions=positions, block_mask=document_block_mask(doc, branches=trunk))
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()               # (T, T)
            mask = causal & (doc[:, None] == doc[None, :])
            if branches is not None:  # a branch sees the trunk and itself
                mask &= (branches[None, :] == 0) | (branches[None, :] == branches[:, None])
            return AttnInputs(positions=positions, mask=mask[None, None])
        if attention_mask is not None:
            valid = attention_mask.to(dev).bool()                                      # (B, T)
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding: the first real token is 0
            # Padding keys are hidden. A padding *query* would then see no key at all and give NaN,
            # so it may see itself; its output is junk that nobody reads.
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()               # (T, T)
            eye = torch.eye(T, dtype=torch.bool, device=dev)
            mask = (causal[None] & valid[:, None, :]) | eye[None]                      # (B, T, T)
            return AttnInputs(mask=mask[:, None], positions=positions)
        return AttnInputs(positions=torch.arange(T, device=dev)[None].expand(B, T))  # SDPA's own causal path


def _packed_attention(on_gpu: bool, dtype: torch.dtype, choice: str = "auto") -> str:
    """The packed-attention kernel for a forward on a GPU or not, computing in `dtype`, given the
    caller's `choice` (Transformer.forward's packed_attention)."""
    # flash-attn's kernels take fp16/bf16 only: an fp32 forward (--dtype fp32, or a model left in
    # fp32 without autocast) must not be handed to it, or it stops the run.
    flash = flash_attn_varlen_func is not None and on_gpu and dtype in (torch.float16, torch.bfloat16)
    if choice == "auto":
        return "flash" if flash else "flex" if on_gpu else "sdpa"
    if choice not in ("flash", "flex", "sdpa"):
        raise ValueError(f"packed_attention is {choice!r}: use auto, flash, flex or sdpa")
    if choice == "flash" and not flash:
        raise RuntimeError(f"packed_attention='flash' needs flash-attn installed, a GPU and fp16/bf16 "
                           f"(this forward computes in {dtype})")
    return choice


def branch_positions(doc: torch.Tensor, branches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(T,) positions of packed documents made of a trunk and branches (Transformer.forward): a trunk
    token keeps its place in its document; a branch token is at the trunk's length plus its place in
    its branch. doc, branches and positions (the place in the document) are (T,)."""
    T = doc.shape[0]
    start = torch.ones(T, dtype=torch.bool, device=doc.device)          # where a run of one branch begins
    start[1:] = (branches[1:] != branches[:-1]) | (doc[1:] != doc[:-1])
    run_start = torch.nonzero(start).squeeze(1)[start.long().cumsum(0) - 1]          # (T,)
    trunk = torch.zeros(int(doc[-1]) + 1, dtype=torch.long, device=doc.device).index_add_(
        0, doc, (branches == 0).long())                                  # (n_docs,) trunk lengths
    in_branch = torch.arange(T, device=doc.device) - run_start
    return torch.where(branches == 0, positions, trunk[doc] + in_branch)


def document_block_mask(doc: torch.Tensor, block: int = 128, branches: torch.Tensor | None = None):
    """flex_attention's BlockMask for causal attention within documents, worked out per pair of
    128-token tiles from the documents the tiles hold. torch's create_block_mask would evaluate the
    mask at all (T, T) pairs first: 256 MiB at 16k tokens, and several times that in temporaries.
    doc: (T,) the document of each token, non-decreasing (documents are contiguous runs).
    branches: (T,) or None, as in Transformer.forward: a branch token sees the trunk and its branch."""
    from torch.nn.attention.flex_attention import BlockMask
    T = doc.shape[0]
    n = -(-T // block)                                                # tiles per side
    start = torch.arange(n, device=doc.device) * block
    first = doc[start]                                                # (n,) document of a tile's first token
    last = doc[(start + block).clamp(max=T) - 1]                      # (n,) and of its last
    i, j = torch.arange(n, device=doc.device)[:, None], torch.arange(n, device=doc.device)[None, :]
    # Query tile i sees something of key tile j iff j <= i and they share a document; documents run
    # in order, so that is: j's last document is not before i's first.
    seen = (j <= i) & (last[None, :] >= first[:, None])              # (n, n)
    # It sees all of it iff every key is earlier (j < i), both tiles are whole (not cut by T) and
    # lie in one document, the same one: then flex skips the mask there.
    one = (first == last) & (start + block <= T)                     # (n,)
    full = (j < i) & one[:, None] & one[None, :] & (first[:, None] == first[None, :])
    if branches is not None:  # a key tile is seen whole only if it is all trunk
        pad = torch.zeros(n * block - T, dtype=branches.dtype, device=doc.device)
        trunk = torch.cat([branches, pad]).view(n, block).eq(0).all(-1)                # (n,)
        full &= trunk[None, :]
    partial = seen & ~full

    def ordered(tiles):  # (n, n) bool -> tiles per row (1, 1, n), their columns first (1, 1, n, n)
        t = tiles.to(torch.int32)
        cols = torch.argsort(t, dim=-1, descending=True, stable=True)
        return t.sum(-1).to(torch.int32)[None, None], cols.to(torch.int32)[None, None]

    if branches is None:
        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (k <= q)
    else:
        def mask_mod(b, h, q, k):
            return (doc[q] == doc[k]) & (k <= q) & ((branches[k] == 0) | (branches[k] == branches[q]))
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, seq_lengths=(T, T),
                                    mask_mod=mask_mod)


_compiled_flex = None


def _flex_attention():
    # flex_attention is only fast compiled; compile once, on first use. fullgraph: a graph break
    # would run part of it eagerly, quietly.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention, dynamic=True, fullgraph=True)
    return _compiled_flex


def require_compiled_flex(device, dtype):
    """Stop now, with the reason, unless flex_attention compiles and runs compiled on `device`.
    Run eagerly it builds the whole (T, T) score matrix (about 30 GB for a 16k-token micro-batch of
    the qwen preset) and runs out of memory far from the cause, so on a GPU it never runs eagerly:
    called at start-up wherever the update will use it (the shared-prompt update always does). A
    tiny packed batch with branches, in the compute dtype, goes forward, and backward where flex has
    one (not on a CPU)."""
    fix = ("; packed attention must not run flex_attention eagerly (the whole T x T score matrix: out of "
           "memory at training lengths). Use a torch whose torch.compile works here (Python version, a C "
           "compiler, Triton), or --no_shared_prompts with flash-attn installed (flex is then not used)")
    if torch._dynamo.config.disable:
        raise RuntimeError("torch.compile is switched off (TORCHDYNAMO_DISABLE=1?)" + fix)
    try:
        flex = _flex_attention()
        doc = torch.tensor([0] * 96 + [1] * 64, device=device)                      # (T,) two documents
        branches = torch.tensor([0] * 32 + [1] * 32 + [2] * 32 + [0] * 16 + [1] * 48, device=device)  # (T,)
        grad = device.type == "cuda"
        q = torch.randn(1, 4, 160, 64, device=device, dtype=dtype, requires_grad=grad)  # (1, nh, T, D)
        k, v = (torch.randn(1, 2, 160, 64, device=device, dtype=dtype, requires_grad=grad)    # (1, nkv, T, D)
                for _ in range(2))
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            y = flex(q, k, v, block_mask=document_block_mask(doc, branches=branches), enable_gqa=True)
        if y.requires_grad:
            y.sum().backward()
    except Exception as e:
        raise RuntimeError(f"flex_attention does not compile on {device} ({type(e).__name__}: "
                           f"{str(e).strip()[:300]})" + fix) from e


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
