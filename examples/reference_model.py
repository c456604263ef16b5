#!/usr/bin/env python
"""Train a tiny reference model on the pycode ``ref`` split, score some ``train`` chunks once, report the loss.

``scoring="excess"`` (SPEC §3.1) needs a reference model's per-token loss of every training token. This example
makes one with :mod:`cggr_torch.reference` on CPU in well under a minute:

1. a tiny Hugging Face Llama (``--d-model`` 32, 1 layer, the corpus's 16,384-token vocabulary) is trained for
   ``--steps`` AdamW updates on the held-out ``ref`` split (never training data);
2. the first ``--score-chunks`` chunks of the ``train`` split are scored once and written to ``--out`` in the
   ``cggr-reference-v1`` format (float16 per-token NLL, chunk id = row index of the split);
3. the mean reference loss of the scored chunks is printed, and the first batch is fed to
   ``CGGRLoss(scoring="excess")`` with a fresh (untrained) learner, as a training loop would.

``--seq-len`` crops every chunk to its first ``seq-len + 1`` tokens (default: the full 1,024 + 1) to keep a CPU
run short; a store is only usable with chunks cropped the same way (its ``seq_len`` says which).
``--smoke`` is a couple of steps on a few short chunks (the test suite runs it).

    python examples/reference_model.py                      # about 35 s on 2 CPU cores (most of it training)
    python examples/reference_model.py --smoke --out /tmp/ref
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python examples/reference_model.py` puts only examples/ on the path
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402


def default_data_dir() -> Path:
    base = os.environ.get("CGGR_DATA_DIR")
    return (Path(base) if base else REPO_ROOT.parent / "shared" / "data") / "pycode"


def load_pycode(data_dir: Path, split: str) -> np.ndarray:
    """The split's ``(rows, 1025)`` uint16 chunks through the corpus's own loader (sha256-checked)."""
    if not (data_dir / "load.py").exists():
        raise SystemExit(f"--data: no pycode corpus at {data_dir} (load.py missing)")
    sys.path.insert(0, str(data_dir))
    try:
        from load import load_split
    finally:
        sys.path.remove(str(data_dir))
    return load_split(str(data_dir), split)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, default=default_data_dir(), help="the pycode directory")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "reference", help="where the store goes")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="predicted tokens per chunk (1024 = whole chunks)")
    p.add_argument("--score-chunks", type=int, default=300, help="how many train chunks to score (from id 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a couple of steps on a few short chunks")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.score_chunks = 2, 2, 32, 6

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cggr_torch import CGGRLoss
    from cggr_torch.reference import reference_loader, score_chunks, train_reference_model

    t0 = time.time()
    ref = load_pycode(args.data, "ref")
    train = load_pycode(args.data, "train")
    if not 1 <= args.seq_len <= ref.shape[1] - 1:
        raise SystemExit(f"--seq-len: expected 1 … {ref.shape[1] - 1}, got {args.seq_len}")
    width = args.seq_len + 1
    vocab = 16384  # the corpus tokenizer's vocabulary (README)
    print(f"loaded ref {ref.shape} and train {train.shape} in {time.time() - t0:.1f} s; chunks cropped to "
          f"{width} tokens")

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                         num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=width, use_cache=False, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)

    t0 = time.time()
    losses: list[float] = []
    train_reference_model(model, ref[:, :width], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, callback=lambda step, loss: losses.append(float(loss)))
    print(f"trained the reference for {args.steps} steps in {time.time() - t0:.1f} s: training loss "
          f"{losses[0]:.3f} → {losses[-1]:.3f} (ln V = {np.log(vocab):.3f})")

    t0 = time.time()
    n = min(args.score_chunks, train.shape[0])
    ids = np.arange(n)  # chunk id = row index of the split
    store = score_chunks(model, train[:n, :width], ids, str(args.out), batch_size=8,
                         meta={"corpus": "pycode", "reference_split": "ref", "scored_split": "train",
                               "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                               "seed": args.seed, "chunk_width": width})
    print(f"scored {n} train chunks ({n * args.seq_len} tokens) in {time.time() - t0:.1f} s → {args.out}")
    print(f"mean reference loss: {float(np.nanmean(store.chunk_mean)):.4f} nats/token "
          f"(chunk means from {float(np.nanmin(store.chunk_mean)):.3f} to {float(np.nanmax(store.chunk_mean)):.3f})")

    # How a training loop uses it: the learner's logits on input_ids, the aligned targets and their reference.
    batch = next(reference_loader(train[:n, :width], ids, store, min(4, n)))
    learner = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        logits = learner(batch.input_ids).logits
    criterion = CGGRLoss(scoring="excess", warmup_steps=0, min_tokens_ratio=0.25)
    loss = criterion(logits, batch.labels, batch.reference_nll)
    metrics = criterion.get_metrics()
    print(f"an untrained learner's excess-selected loss on chunks {batch.chunk_ids.tolist()}: {float(loss):.4f} "
          f"({metrics['tokens_selected']} of {metrics['tokens_total']} tokens, mean excess "
          f"{metrics['avg_difficulty']:.3f})")
    return 0 if np.isfinite(float(loss)) else 1


if __name__ == "__main__":
    sys.exit(main())
