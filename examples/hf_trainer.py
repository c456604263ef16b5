"""CGGR batch splitting with the Hugging Face ``Trainer`` — a tiny Llama, local text, no downloads.

    .venv/bin/python examples/hf_trainer.py                      # ~1 min on a laptop CPU
    .venv/bin/python examples/hf_trainer.py --steps 200 --text my.txt --out out/hf_trainer

What happens:

* the text (``--text``, else Tiny Shakespeare from ``../shared/data``, else the Python standard library's own
  source; see ``examples/data.py``) is tokenised character by character;
* rows of variable length (right-padded, ``attention_mask`` 0 and label -100 on the padding) feed a tiny
  ``LlamaForCausalLM`` built from a config;
* a plain ``Trainer`` switched to CGGR in one call, ``use_cggr(trainer, ...)``
  (:func:`cggr_torch.integrations.use_cggr`; ``CGGRTrainer`` is the same as a subclass), trains it: a 2-layer
  truncated router (sharing the model's weights) scores every batch, and only the hardest sequences (25 %
  after a short warm-up, adjusted by the batch's confidence) run the full model's forward and backward.
  ``CGGRStepCallback`` advances the curriculum after each optimizer step; the Trainer logs ``cggr/*`` metrics
  next to the loss.
* evaluation uses the standard full-batch loss; the final model is saved with ``trainer.save_model``.

With ``--baseline`` the same model is also trained with the plain ``Trainer`` for comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # examples/data.py

from data import CharTokenizer, load_text, split_train_eval  # noqa: E402


def make_rows(ids: np.ndarray, n_rows: int, seq_len: int, seed: int, min_len: int) -> list[dict[str, torch.Tensor]]:
    """``n_rows`` windows of random length in ``[min_len, seq_len]``, right-padded to ``seq_len``."""
    rng = np.random.default_rng(seed)
    rows = []
    starts = rng.integers(0, len(ids) - seq_len - 1, size=n_rows)
    lengths = rng.integers(min_len, seq_len + 1, size=n_rows)
    for start, length in zip(starts, lengths):
        window = torch.zeros(seq_len, dtype=torch.long)
        window[:length] = torch.from_numpy(ids[start:start + length].astype(np.int64))
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:length] = 1
        rows.append({"input_ids": window, "attention_mask": mask, "labels": window.masked_fill(mask == 0, -100)})
    return rows


def build_model(vocab_size: int, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq_len, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None, help="training text file (default: see examples/data.py)")
    p.add_argument("--max-chars", type=int, default=400_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--router-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25, help="min_tokens_ratio (fraction of sequences kept)")
    p.add_argument("--warmup", type=int, default=20, help="curriculum warm-up steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="also train with the plain Trainer")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = p.parse_args(argv)

    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from cggr_torch.integrations import use_cggr

    hf_logging.set_verbosity_error()
    source = load_text(args.text, max_chars=args.max_chars)
    tok = CharTokenizer.from_text(source.text)
    # id 0 is reserved for padding: shift the character ids by one
    ids = tok.encode(source.text).astype(np.int64) + 1
    train_ids, eval_ids = split_train_eval(ids)
    vocab = tok.vocab_size + 1
    train_rows = make_rows(train_ids, args.steps * args.batch_size, args.seq_len, args.seed, args.seq_len // 3)
    eval_rows = make_rows(eval_ids, 4 * args.batch_size, args.seq_len, args.seed + 1, args.seq_len)
    print(f"text: {source.name} ({len(source.text):,} chars), char vocabulary {vocab}, "
          f"{len(train_rows)} training rows of <= {args.seq_len} tokens")

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cggr_hf_trainer_"))
    results = {}
    runs = ["cggr"] + (["baseline"] if args.baseline else [])
    for name in runs:
        model = build_model(vocab, args)
        targs = TrainingArguments(
            output_dir=str(out_dir / name), use_cpu=not torch.cuda.is_available(), report_to=[],
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=5,
            logging_steps=max(1, args.steps // 10), save_strategy="no", disable_tqdm=True, seed=args.seed,
            dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=train_rows, eval_dataset=eval_rows)
        if name == "cggr":   # the one line that switches the Trainer to CGGR batch splitting
            use_cggr(trainer, router_layers=args.router_layers, min_tokens_ratio=args.ratio, warmup_steps=args.warmup)
        start = time.perf_counter()
        train_out = trainer.train()
        seconds = time.perf_counter() - start
        eval_loss = trainer.evaluate()["eval_loss"]
        trainer.save_model(str(out_dir / name / "final"))
        results[name] = {"train_loss": train_out.training_loss, "eval_loss": eval_loss,
                         "eval_bits_per_char": eval_loss / math.log(2), "train_seconds": seconds}
        if name == "cggr":
            results[name]["cggr_step"] = trainer.cggr.current_step
            results[name]["last_metrics"] = trainer.cggr.get_metrics()
            assert trainer.cggr.current_step == trainer.state.global_step
        print(f"[{name}] {args.steps} steps in {seconds:.1f}s: train loss {train_out.training_loss:.4f}, "
              f"eval loss {eval_loss:.4f} ({eval_loss / math.log(2):.3f} bits/char)")
        if name == "cggr":
            m = trainer.cggr.get_metrics()
            print(f"[{name}] last step: kept {m['sequences_selected']}/{m['sequences_total']} sequences "
                  f"(ratio {m['effective_ratio']:.3f}), {m['tokens_selected']} of {m['tokens_total']} scored tokens "
                  f"in the loss")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
