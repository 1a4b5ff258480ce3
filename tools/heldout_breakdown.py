"""Where a run's loss on the held-out plays comes from, by how often each target token
occurs in the training text.

    python tools/heldout_breakdown.py OUT_DIR [OUT_DIR ...] [--text shakespeare_heldout.txt]

For each run folder (read as --eval reads it: ckpt.npz or ckpt.orbax, a LoRA run merged),
the held-out text is cut into the windows --eval uses (its start token first, windows of the
run's --seq-len), so the total is --eval's figure, and every target token is put in a bucket
by its count in shakespeare.txt (training and validation splits together): never, 1-9 times,
10-99, 100-999, 1,000 or more. It prints each bucket's share of the tokens, its mean loss and
its part of the total. Then it adds one constant to the logits of every token the corpus never
has (the best of +1, +2, +3, chosen on the held-out text itself: an upper bound) and prints the
loss that gives: what the model's treatment of tokens it never saw costs.
"""

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llama_jax as L  # noqa: E402
import llamatool as lt  # noqa: E402

BUCKETS = ((0, 0, "never"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"),
           (1000, None, "1,000+"))


@functools.partial(jax.jit, static_argnames="config")
def shifted_nats(params, x, y, config, unseen, shift):
    """lt.evaluation.token_nats with `shift` added to the logits of the tokens where
    unseen (bool[V]) is True: int32[b, T] twice -> float32[b, T]. The shift
    is an argument, not a constant, so every shift runs one compiled step."""
    logits = L.model_forward(params, x, config)[0].astype(jnp.float32)  # [b, T, V]
    logits = logits + jnp.where(unseen, shift, 0.0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # [b, T]


def token_losses(params, config, tokens, seq_len, unseen, shift, rows=32):
    """Each target's loss, nats, and the targets: (float64[N], int[N]) for
    the N = len(tokens) - 1 predictions. unseen: bool[V]; shift is added to
    those tokens' logits. The tokens are cut as evaluate_text cuts them
    (text_windows)."""
    x, y, mask = lt.evaluation.text_windows(tokens, seq_len)  # [n, T] each
    n = len(x)
    # Padded to whole batches of `rows`, so that one shape compiles.
    pad = -n % rows
    x, y = np.pad(x, ((0, pad), (0, 0))), np.pad(y, ((0, pad), (0, 0)))
    out = np.concatenate([np.asarray(shifted_nats(params, x[i:i + rows], y[i:i + rows], config,
                                                  unseen, shift))
                          for i in range(0, len(x), rows)])
    return out[:n][mask].astype(np.float64), y[:n][mask]  # the padding's predictions dropped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (--out-dir of a training run)")
    parser.add_argument("--text", default=str(ROOT / "shakespeare_heldout.txt"))
    args = parser.parse_args()
    enc = L.get_tokenizer()
    train = np.array(enc.encode_ordinary(L.load_text(ROOT / "shakespeare.txt")))
    # As evaluate_text: the start token first, as the first token's context.
    held = np.array([enc.eot_token] + enc.encode_ordinary(L.load_text(args.text)))
    for run in args.runs:
        try:
            model = lt.sources.load_source(run)
        except L.InputError as err:
            sys.exit(f"{run}: {err}")
        params = jax.tree_util.tree_map(jnp.asarray, model.params)
        config = model.config
        counts = np.bincount(train, minlength=config.vocab_size)[:config.vocab_size]
        unseen = jnp.asarray(counts == 0)
        seq_len = model.seq_len
        loss, targets = token_losses(params, config, held, seq_len, unseen, 0.0)
        seen = counts[targets]
        print(f"{run}: {loss.mean():.4f} nats/token on {args.text} ({len(loss):,} targets; "
              f"{int(unseen.sum()):,} of {config.vocab_size:,} token ids never occur in "
              "shakespeare.txt)")
        print(f"  {'in shakespeare.txt':>18s} {'share':>6s} {'mean loss':>9s} {'part':>6s}")
        for low, high, name in BUCKETS:
            mask = (seen >= low) & (seen <= (high if high is not None else np.inf))
            print(f"  {name:>18s} {mask.mean():6.3f} {loss[mask].mean():9.2f} "
                  f"{loss[mask].sum() / len(loss):6.3f}")
        best = min((token_losses(params, config, held, seq_len, unseen, s)[0].mean(), s)
                   for s in (1.0, 2.0, 3.0))
        print(f"  +{best[1]:g} on the never-seen tokens' logits: {best[0]:.4f} nats/token "
              f"({loss.mean() - best[0]:+.4f})")


if __name__ == "__main__":
    main()
