"""The train step with the loss's hand-written backward vs plain autodiff of the same loss.

    python bench/loss_ablation.py --config configs/gpt2_small.py --batches 12,32

Prints two `bench train` tables; the difference is what change 1 in bench/NOTES.md claims.
"""

import sys

import jax.numpy as jnp

from gptjax import loss
from gptjax.bench import cli


def autodiff_loss_sum(logits, targets, mask, vocab_size):
    return jnp.sum(loss._token_losses(logits, targets, vocab_size)[0] * mask)


if __name__ == "__main__":
    args = ["train", *sys.argv[1:]]
    print("## hand-written backward (gptjax)")
    code = cli.main(args)
    loss._loss_sum = autodiff_loss_sum
    print("## autodiff backward")
    sys.exit(code or cli.main(args))
