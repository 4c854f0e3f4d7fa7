"""The GPT decoder: GPT-1 (post-LN) and GPT-2 (pre-LN) blocks from one definition.

    tokens -> wte[tokens] + wpe[positions] -> dropout -> n_layer x Block -> (final LN, pre-LN only)
           -> hidden @ wte^T = logits

Parameters are float32; the forward pass casts them to `compute_dtype` (bfloat16 on GPU/TPU),
the mixed-precision recipe that keeps optimizer updates exact while matmuls run at bf16 speed.
Every parameter carries `axes`, the logical names of its dimensions (embed, heads, head_dim, mlp,
vocab); sharding.py maps those names to mesh axes. They are plain variable metadata rather than
Flax's own sharding annotation because that one now shards eagerly and needs a mesh at creation.

The model is used functionally: `nnx.split` gives (graphdef, params), the train step is a pure
function of the params pytree, and dropout draws from an explicit key (None = deterministic),
so a step is a pure function of (params, batch, key) and can be replayed exactly.

Every module takes a `ModelConfig` (model_config.py), never the run's ConfigDict:
`init_decoder(ModelConfig.from_config(config.model), seed)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import attention, targets
from gptjax.dropout import dropout
from gptjax.loss import projected_lm_loss
from gptjax.model_config import ModelConfig
from gptjax.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    # Keep weight-matmul outputs, recompute the cheap elementwise work (LN, GELU, softmax).
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(name: str):
    if name == "auto":  # for the platform the model is built for: the host's, or a compile target's
        return jnp.bfloat16 if targets.current().name in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name).type


def _param(rngs: nnx.Rngs, shape, axes, std: float | None):
    """A float32 parameter: N(0, std) if std is given, else zeros (biases) ."""
    value = jnp.zeros(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, axes=axes)


_dropout = dropout  # a hash of the key's seed and the element's index (dropout.py)


def _require(cfg) -> None:
    # A ConfigDict would still answer most attribute reads and fail later on a derived one
    # (padded_vocab, head_dim) with an unhelpful AttributeError; say what to pass instead.
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig (ModelConfig.from_config(config.model)), got {type(cfg).__name__}")


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics whatever the compute dtype (bf16 variance is too coarse)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("embed",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, resid_std: float):
        d, h, hd = cfg.d_model, cfg.n_head, cfg.head_dim
        # [embed, 3, heads, head_dim]: q, k and v come out already split by head, so tensor
        # parallelism can shard `heads` without cutting across q/k/v.
        self.qkv_kernel = _param(rngs, (d, 3, h, hd), ("embed", None, "heads", "head_dim"), cfg.init_std)
        self.qkv_bias = _param(rngs, (3, h, hd), (None, "heads", "head_dim"), None)
        self.out_kernel = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), resid_std)
        self.out_bias = _param(rngs, (d,), ("embed",), None)
        self.config = cfg

    def __call__(self, x, *, segment_ids=None, dropout_key=None, cache: dict | None = None):
        """Attention outputs [B, T, d]; with a KV `cache`, (outputs, the cache holding these keys)."""
        dtype = x.dtype
        qkv = jnp.einsum("btd,dchk->btchk", x, self.qkv_kernel[...].astype(dtype))
        qkv = constrain(qkv + self.qkv_bias[...].astype(dtype), ("batch", "length", None, "heads", "head_dim"))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_offset, kv_valid, implementation = 0, None, self.config.attention
        if cache is not None:
            # The cache needs an offset and a padding mask, which only the XLA path takes;
            # decoding one token at a time gains little from a fused kernel anyway.
            implementation = "xla"
            # Decoding: write this chunk's keys/values at the cache index, attend over the buffer.
            index = cache["index"]
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
            cache = dict(cache, k=k, v=v)
            q_offset, kv_valid = index, cache["valid"]
        y = attention.attend(implementation, q, k.astype(dtype), v.astype(dtype), q_offset=q_offset,
                             segment_ids=segment_ids, kv_valid=kv_valid,
                             dropout_rate=self.config.attn_dropout, dropout_key=dropout_key)
        y = constrain(y, ("batch", "length", "heads", "head_dim"))
        y = jnp.einsum("bthk,hkd->btd", y, self.out_kernel[...].astype(dtype))
        y = constrain(y + self.out_bias[...].astype(dtype), ("batch", "length", "embed"))
        return y if cache is None else (y, cache)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, resid_std: float):
        self.fc_kernel = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std)
        self.fc_bias = _param(rngs, (cfg.d_ff,), ("mlp",), None)
        self.proj_kernel = _param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), resid_std)
        self.proj_bias = _param(rngs, (cfg.d_model,), ("embed",), None)

    def __call__(self, x):
        dtype = x.dtype
        h = x @ self.fc_kernel[...].astype(dtype) + self.fc_bias[...].astype(dtype)
        h = constrain(h, ("batch", "length", "mlp"))
        h = jax.nn.gelu(h, approximate=True)  # the tanh form, as GPT-1 and GPT-2 trained with
        y = h @ self.proj_kernel[...].astype(dtype) + self.proj_bias[...].astype(dtype)
        return constrain(y, ("batch", "length", "embed"))


class Block(nnx.Module):
    """post_ln (GPT-1): x = LN1(x + attn(x)); x = LN2(x + mlp(x)).
    pre_ln (GPT-2):  x = x + attn(LN1(x)); x = x + mlp(LN2(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.scale_residual_init else cfg.init_std
        self.ln_1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg, rngs=rngs, resid_std=resid_std)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg, rngs=rngs, resid_std=resid_std)
        self.config = cfg

    def __call__(self, x, *, segment_ids=None, dropout_key=None, cache: dict | None = None):
        """The block's output [B, T, d]; with a KV `cache`, (output, the updated cache)."""
        keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
        rate, pre_ln = self.config.dropout, self.config.block == "pre_ln"
        a = self.attn(self.ln_1(x) if pre_ln else x, segment_ids=segment_ids, dropout_key=keys[0], cache=cache)
        if cache is not None:
            a, cache = a
        if pre_ln:
            x = x + _dropout(a, rate, keys[1])
            x = x + _dropout(self.mlp(self.ln_2(x)), rate, keys[2])
        else:
            x = self.ln_1(x + _dropout(a, rate, keys[1]))
            x = self.ln_2(x + _dropout(self.mlp(x), rate, keys[2]))
        return x if cache is None else (x, cache)


def _run_block(block: Block, x, segment_ids, dropout_key):
    return block(x, segment_ids=segment_ids, dropout_key=dropout_key)


class Decoder(nnx.Module):
    """Token + learned position embeddings, the blocks, and the tied output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        _require(cfg)
        self.config = cfg
        self.wte = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.wpe = _param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"), cfg.init_std)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        # GPT-1 (post-LN) already ends on a LayerNorm inside its last block.
        self.ln_f = LayerNorm(cfg.d_model, cfg.ln_eps) if cfg.block == "pre_ln" else None
        self.dtype = compute_dtype(cfg.dtype)  # "auto" resolved for the target the model is built for

    def _embed(self, tokens, positions, dropout_key):
        # The tables are gathered whole along `embed` first: a lookup into an fsdp-sharded
        # column would otherwise make XLA replicate the looked-up rows on every device.
        wte = constrain(self.wte[...], ("vocab", None))
        wpe = constrain(self.wpe[...], (None, None))
        x = constrain(wte[tokens] + wpe[positions], ("batch", "length", "embed"))
        return _dropout(x.astype(self.dtype), self.config.dropout, dropout_key)

    def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None, cache: dict | None = None,
                 valid=None):
        """Final hidden states [B, T, d_model] in the compute dtype. dropout_key=None: no dropout.

        With a KV `cache` (init_cache), the tokens run on top of it and the result is (hidden,
        the cache extended by them); `valid` [B, T] marks real tokens (False for the left padding
        of batched prompts)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        n_layer, remat = self.config.n_layer, self.config.remat
        keys = [None] * (n_layer + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, n_layer + 1))
        x = self._embed(tokens, positions, keys[-1])
        if cache is None:
            run = _run_block if remat == "none" else nnx.remat(_run_block, policy=REMAT_POLICIES[remat])
            for block, key in zip(self.blocks, keys):
                x = run(block, x, segment_ids, key)
            return x if self.ln_f is None else self.ln_f(x)
        index = cache["index"]
        all_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
        layers = []
        for block, layer, key in zip(self.blocks, cache["layers"], keys):
            x, layer = block(x, segment_ids=segment_ids, dropout_key=key,
                             cache=dict(layer, index=index, valid=all_valid))
            layers.append({"k": layer["k"], "v": layer["v"]})
        x = x if self.ln_f is None else self.ln_f(x)
        return x, {"index": index + tokens.shape[1], "valid": all_valid, "layers": layers}

    def lm_logits(self, hidden):
        """Logits over the padded vocabulary, in the compute dtype (the loss upcasts per row)."""
        logits = jnp.einsum("btd,vd->btv", hidden, self.wte[...].astype(hidden.dtype))
        return constrain(logits, ("batch", "length", "vocab"))

    def lm_loss(self, hidden, targets, loss_mask):
        """(summed next-token loss, counted tokens) of hidden states [B, T, d] (loss.py)."""
        return projected_lm_loss(hidden, self.lm_logits, targets, loss_mask, self.config.vocab_size,
                                 self.config.loss_chunk_len)

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        length = length or self.config.max_len
        shape = (batch, length, self.config.n_head, self.config.head_dim)
        layers = [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in self.blocks]
        return {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool), "layers": layers}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls with weights (forward + backward) plus
        12 * L * d_model * T for attention scores and values (the convention MFU figures use)."""
        c = self.config
        n = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param))) - c.max_len * c.d_model
        return 6 * n + 12 * c.n_layer * c.d_model * seq_len


def init_decoder(cfg: ModelConfig, seed: int) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


class TaskModel(nnx.Module):
    """The decoder with the GPT-1 task head: a linear layer W_y on the final hidden state at each
    sequence's extract token. Only the head is new; the decoder's params come from pretraining.

    tokens [B, S, T] hold S sequences per example (tasks/transforms.py):
      combine="single"  S = 1: classification and entailment, logits [B, num_outputs]
      combine="sum"     S = 2: both orders of a symmetric pair, extract states added before W_y
      combine="choice"  S = k candidates, one score each (num_outputs = 1), logits [B, k]
    """

    def __init__(self, cfg: ModelConfig, num_outputs: int, combine: str, *, rngs: nnx.Rngs):
        assert combine in ("single", "sum", "choice"), combine
        self.decoder = Decoder(cfg, rngs=rngs)
        self.head_kernel = _param(rngs, (cfg.d_model, num_outputs), ("embed", None), cfg.init_std)
        self.head_bias = _param(rngs, (num_outputs,), (None,), None)
        self.combine = combine

    def __call__(self, tokens, extract, *, dropout_key=None, clf_dropout: float = 0.0):
        """(task logits float32, decoder hidden states [B * S, T, d] for the auxiliary LM loss)."""
        b, s, t = tokens.shape
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        hidden = self.decoder(tokens.reshape(b * s, t), dropout_key=keys[0])
        rows = jnp.take_along_axis(hidden, extract.reshape(b * s, 1, 1), axis=1)[:, 0]
        states = rows.reshape(b, s, -1).astype(jnp.float32)
        if self.combine == "sum":
            states = states.sum(axis=1, keepdims=True)
        states = _dropout(states, clf_dropout, keys[1])
        scores = states @ self.head_kernel[...] + self.head_bias[...]  # [B, S or 1, num_outputs]
        return (scores[..., 0] if self.combine == "choice" else scores[:, 0]), hidden


def init_task_model(cfg: ModelConfig, num_outputs: int, combine: str, seed: int) -> TaskModel:
    return TaskModel(cfg, num_outputs, combine, rngs=nnx.Rngs(params=seed))
