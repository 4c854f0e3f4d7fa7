"""Attention dispatch: `model.attention = auto | xla | cudnn | pallas | splash`.

Inputs are [batch, time, heads, head_dim] (the layout cuDNN and the Pallas kernel want, so no
transposes). `xla` is the reference: it takes every mask gptjax needs (causal with a query
offset for the KV cache, packed-document segment ids, key padding) and dropout on the
probabilities. The fused kernels each take a subset:

  cudnn   plain causal (cuDNN flash attention through jax.nn.dot_product_attention)
  pallas  causal + segment ids, skipping the tiles documents rule out, and dropout on the
          probabilities: gptjax's flash-attention kernel, on Mosaic GPU for Hopper GPUs (H100,
          H200) in half precision (kernels/mosaic_attention.py), on Triton for other NVIDIA GPUs
          and float32 (kernels/triton_attention.py); the Triton one in interpret mode on CPU
          (slow, for tests)
  splash  causal + segment ids on TPU (JAX's splash attention); interpret mode elsewhere

`auto` takes, on an NVIDIA GPU, cuDNN for plain causal attention and the Pallas kernel when
document masks or attention dropout are on; on a TPU, splash where the sequence length suits its
blocks; XLA for everything else (the KV cache, CPUs, attention dropout on TPU). On a mesh the
kernels run per device on that device's rows and heads (`shard_map`): XLA cannot split a kernel
call across devices itself. Attention dropout numbers every probability by its global (batch
row, head, query, key), so XLA and the kernel, on any mesh, drop the same ones for the same key:
a run resumed on another mesh, or `auto` choosing differently, trains on the same masks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptjax import sharding, targets
from gptjax.attention_choices import check
from gptjax.dropout import attention_keep, seed_of
from gptjax.errors import UserError

# Finite, so that a row with every key masked (padding) gives a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def on_nvidia_gpu() -> bool:
    """Whether the code being traced is for an NVIDIA GPU (the host's, or a compile target's)."""
    return targets.current().nvidia


def cudnn_applies(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention can run these inputs on this machine."""
    return on_nvidia_gpu() and jnp.dtype(dtype) in HALF and head_dim % 8 == 0 and head_dim <= 128


def pallas_applies(dtype, head_dim: int) -> bool:
    """Whether `auto` should take the Pallas kernel here: an NVIDIA GPU, half precision, head
    dims up to 256 (padded up to a multiple of 64 on Mosaic GPU, a power of two on Triton)."""
    return on_nvidia_gpu() and jnp.dtype(dtype) in HALF and head_dim <= 256


def pallas_backend(dtype) -> str:
    """Which build of the kernel runs: Mosaic GPU on Hopper in half precision (wgmma takes
    bfloat16 and float16 only), Triton on other NVIDIA GPUs, for float32, and on CPU."""
    return "mosaic" if targets.current().hopper and jnp.dtype(dtype) in HALF else "triton"


def splash_applies(seq_len: int | None) -> bool:
    """Splash attention's blocks are multiples of 128 that divide the sequence."""
    return seq_len is None or (seq_len >= 128 and seq_len % 128 == 0)


def resolve(implementation: str, dtype, head_dim: int, *, needs_mask: bool, needs_dropout: bool,
            segments: bool = False, seq_len: int | None = None) -> str:
    """Turns `auto` into a concrete implementation and rejects one that cannot run these inputs.

    needs_mask: a mask only XLA takes (the KV cache's query offset or key padding).
    segments: packed-document segment ids (XLA, pallas and splash take them).
    seq_len: the sequence length where known (splash needs a multiple of 128)."""
    check(implementation, dropout=needs_dropout, segments=segments)
    backend = targets.current().name
    if implementation == "xla":
        return "xla"
    if implementation == "auto":
        if needs_mask:
            return "xla"
        if backend == "tpu":
            return "splash" if splash_applies(seq_len) and not needs_dropout else "xla"
        if segments or needs_dropout:
            return "pallas" if pallas_applies(dtype, head_dim) else "xla"
        return "cudnn" if cudnn_applies(dtype, head_dim) else "xla"
    if needs_mask:
        raise UserError(f"model.attention={implementation} takes causal and packed-document masks only; "
                        f"use model.attention=auto or xla")
    if implementation == "cudnn":
        if not on_nvidia_gpu():
            raise UserError(f"model.attention=cudnn needs an NVIDIA GPU, but the step is for "
                            f"'{backend}'; use model.attention=auto or xla")
        if not cudnn_applies(dtype, head_dim):
            raise UserError(f"model.attention=cudnn needs bfloat16/float16 compute and a head dim that is a "
                            f"multiple of 8 up to 128 (got {jnp.dtype(dtype).name}, {head_dim}); "
                            f"set model.dtype=bfloat16 or model.attention=auto")
    if implementation == "pallas":
        if head_dim > 256:
            raise UserError(f"model.attention=pallas takes head dims up to 256, got {head_dim}; use auto or xla")
        if backend not in ("gpu", "cpu"):  # CPU: interpret mode, for tests
            raise UserError(f"model.attention=pallas runs on NVIDIA GPUs, not on '{backend}'; "
                            f"use model.attention=auto")
    if implementation == "splash":
        if backend not in ("tpu", "cpu"):
            raise UserError(f"model.attention=splash runs on TPUs, not on '{backend}'; use model.attention=auto")
        if not splash_applies(seq_len):
            raise UserError(f"model.attention=splash needs a sequence length that is a multiple of 128, got "
                            f"{seq_len}; use model.attention=auto")
    return implementation


def xla_attention(q, k, v, *, q_offset=0, segment_ids=None, kv_valid=None,
                  dropout_rate: float = 0.0, dropout_key=None):
    """Causal attention written out; the reference every other implementation is tested against.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]. Query i sits at absolute slot `q_offset + i` and sees
    keys at slots <= its own; `segment_ids` ([B, Tq] = [B, Tk]) confine it to its own document;
    `kv_valid` ([B, Tk]) hides padded keys.
    """
    head_dim = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / head_dim ** 0.5)
    q_pos = q_offset + jnp.arange(q.shape[1])
    k_pos = jnp.arange(k.shape[1])
    mask = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_key is not None:
        # The Pallas kernel's draw for the same key: row (b * heads + h) * Tq + query, column key.
        # Global indices: on a mesh XLA splits these iotas like the probabilities they number.
        b, h, tq, tk = probs.shape
        rows = (jnp.arange(b)[:, None, None] * h + jnp.arange(h)[None, :, None]) * tq + jnp.arange(tq)
        keep = attention_keep(seed_of(dropout_key), rows[..., None], jnp.arange(tk), dropout_rate)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def per_device(kernel, q, k, v, segment_ids, seed=None):
    """kernel(q, k, v, segment_ids, seed, start) on each device's own rows and heads, under the
    mesh the step traces with. A Pallas call is opaque to XLA's partitioner, which would otherwise
    gather q, k and v whole onto every device. Shapes the mesh does not divide run unsplit.
    start (int32 [2]) is the (batch row, head) of the device's block in the whole batch: dropout
    counts from it, so every device draws its part of the one mask of the unsplit batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids, seed, None)
    qkv = sharding.spec(("batch", "length", "heads", "head_dim"))
    rows = sharding.spec(("batch", "length"))
    axes = [() if a is None else (a,) if isinstance(a, str) else a for a in qkv]
    if any(n % math.prod(mesh.shape[x] for x in names) for n, names in zip(q.shape, axes)):
        return kernel(q, k, v, segment_ids, seed, None)

    def first(names, block):
        # Over several mesh axes, the first one is the slowest-varying (as in a PartitionSpec).
        index = 0
        for name in names:
            index = index * mesh.shape[name] + jax.lax.axis_index(name)
        return index * block

    def local(q, k, v, segment_ids, seed):
        start = jnp.asarray([first(axes[0], q.shape[0]), first(axes[2], q.shape[2])], jnp.int32)
        return kernel(q, k, v, segment_ids, seed, start)

    in_specs = (qkv,) * 3 + (None if segment_ids is None else rows, None if seed is None else PartitionSpec())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv, check_vma=False)(
        q, k, v, segment_ids, seed)


def pallas_attention(q, k, v, segment_ids=None, seed=None, start=None, dropout_rate: float = 0.0,
                     heads: int | None = None, backend: str = "triton"):
    """The Pallas kernel's `backend` build (see pallas_backend); `start` and `heads` place q's
    block in the whole batch (see per_device)."""
    # Pallas loads only when used, and only the build that runs.
    if backend == "mosaic":
        from gptjax.kernels.mosaic_attention import flash_attention
    else:
        from gptjax.kernels.triton_attention import flash_attention
    # Decided here, for the platform being traced for, not inside the kernel's jit: its cache
    # would hand a CPU-traced (interpret mode) kernel to a later GPU compile of the same shapes.
    return flash_attention(q, k, v, segment_ids=segment_ids, causal=True, dropout_rate=dropout_rate,
                           dropout_seed=seed, dropout_start=start, dropout_heads=heads,
                           interpret=targets.current().name == "cpu")


def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in (512, 256, 128) if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
    # Built in the trace that uses it, its mask tables constants of that trace: made eagerly (to
    # be cached across traces) they would be computed on the mesh's devices, which a step
    # compiled for a TPU slice from another host does not have.
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids=None, seed=None, start=None):
    """JAX's splash attention (TPU) with the causal mask and segment ids; [B, T, H, D] in and out.
    No dropout, so no use for per_device's seed and start."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    _, t, h, d = q.shape
    kernel = _splash_kernel(h, t, targets.current().name != "tpu")
    q = q * jnp.asarray(1.0 / d ** 0.5, q.dtype)  # splash leaves the scaling to its caller
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # it wants [heads, time, head_dim] per row
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)


def attend(implementation: str, q, k, v, *, q_offset=0, segment_ids=None, kv_valid=None,
           dropout_rate: float = 0.0, dropout_key=None):
    """Causal self-attention through the chosen implementation (see `resolve`)."""
    needs_mask = kv_valid is not None or not isinstance(q_offset, int) or q_offset != 0
    needs_dropout = dropout_rate > 0.0 and dropout_key is not None
    impl = resolve(implementation, q.dtype, q.shape[-1], needs_mask=needs_mask, needs_dropout=needs_dropout,
                   segments=segment_ids is not None, seq_len=q.shape[1])
    if impl == "cudnn":
        return cudnn_attention(q, k, v)
    if impl == "pallas":
        seed = None
        if needs_dropout:
            seed = jax.lax.bitcast_convert_type(seed_of(dropout_key), jnp.int32)
        kernel = functools.partial(pallas_attention, dropout_rate=dropout_rate if needs_dropout else 0.0,
                                   heads=q.shape[2],  # the whole batch's, before per_device splits them
                                   backend=pallas_backend(q.dtype))
        return per_device(kernel, q, k, v, segment_ids, seed)
    if impl == "splash":
        return per_device(splash_attention, q, k, v, segment_ids)
    return xla_attention(q, k, v, q_offset=q_offset, segment_ids=segment_ids, kv_valid=kv_valid,
                         dropout_rate=dropout_rate, dropout_key=dropout_key)
