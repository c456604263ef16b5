"""use_cggr on TRL's SFTTrainer, both heads (tiny Llama from a config, tiny pre-tokenized dataset, CPU, no downloads).

Skipped when ``trl`` is not importable: it is not in the ``dev`` extra (it pulls in ``datasets``, ``pyarrow`` and
``pandas``, binary wheels of ~270 MB; ``trl==1.16.0`` resolves with the pinned transformers 5.23.0)."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1 (the torch extra)")
trl = pytest.importorskip("trl", reason="trl is not installed (the dev extra has it: pip install -e '.[dev]')")

datasets = pytest.importorskip("datasets", reason="trl's SFTTrainer needs the datasets package")

from cggr_torch import CGGRModel  # noqa: E402
from cggr_torch.fused_linear import FusedLinearCGGRLoss  # noqa: E402
from cggr_torch.integrations import use_cggr  # noqa: E402
from tests import oracle  # noqa: E402
from tests.torch.test_router import V, tiny_model  # noqa: E402
from tests.torch.test_trainer import _LogRecorder  # noqa: E402


def _tokenizer() -> Any:
    """A word-level tokenizer over the tiny model's vocabulary, built offline (SFTTrainer needs its pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _dataset(n: int = 24, seed: int = 0) -> Any:
    """Pre-tokenized rows of varied length (TRL's collator pads them and sets the labels), so SFTTrainer has
    nothing to tokenize. The fingerprint is given: hashing the table by pickling it fails with datasets 5.2.0 and
    pyarrow 26 here (``PicklingError: Can't pickle <class 'MonthDayNano'>``)."""
    import pyarrow as pa
    from datasets.table import InMemoryTable

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, V, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return datasets.Dataset(InMemoryTable(pa.table({"input_ids": rows})), fingerprint=f"cggr-trl-test-{seed}-{n}")


def _sft(tmp_path, model, **kw: Any) -> tuple[Any, _LogRecorder]:
    rec = _LogRecorder()
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=6,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                         dataloader_num_workers=0, max_steps=3,
                         dataset_kwargs={"skip_prepare_dataset": True}, **kw)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(6, seed=1),
                             processing_class=_tokenizer(), callbacks=[rec])
    return trainer, rec


# SFTTrainer (trl 1.16) installs its own fused-loss forward on the model instance
# (trl.trainer.utils.add_fused_lm_head); the split head's router view runs the class forward instead.
@pytest.mark.parametrize("head", ["split", "fused"])
def test_use_cggr_on_sft_trainer(tmp_path, head):
    model = tiny_model("llama").train()
    before = [p.detach().clone() for p in model.parameters()]
    trainer, rec = _sft(tmp_path, model)
    cfg = dict(warmup_steps=2, min_tokens_ratio=0.5, dynamic_threshold=False)
    if head == "split":
        cfg["router_layers"] = 2
    assert use_cggr(trainer, head=head, **cfg) is trainer
    assert isinstance(trainer.cggr, CGGRModel if head == "split" else FusedLinearCGGRLoss)
    out = trainer.train()
    assert trainer.state.global_step == 3 and trainer.cggr.current_step == 3     # curriculum advanced per step
    assert math.isfinite(out.training_loss)
    train_logs = [log for log in rec.logs if "loss" in log]
    assert len(train_logs) == 3 and all(math.isfinite(log["loss"]) for log in train_logs)
    assert [log["cggr/step"] for log in train_logs] == [0, 1, 2]
    assert [log["cggr/token_ratio"] for log in train_logs] == [1.0, 0.75, 0.5]
    last = train_logs[-1]
    if head == "split":
        assert last["cggr/sequences_selected"] == oracle.num_selected(last["cggr/sequences_total"], 0.5) < 6
    else:
        assert last["cggr/tokens_selected"] == oracle.num_selected(last["cggr/tokens_total"], 0.5)
        assert 0 < last["cggr/tokens_selected"] < last["cggr/tokens_total"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # evaluation runs SFTTrainer's own compute_loss (TRL's fused head in eval mode): a finite full loss
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_apply_cggr_before_sft_trainer_then_use_cggr(tmp_path):
    """A model switched by apply_cggr first: SFTTrainer wraps TRL's fused LM head around the CGGR forward, and its
    own training loss would bypass CGGR (it calls model(..., fused_lm_head=True)); use_cggr(head='fused') makes the
    trainer use the model's CGGR loss (no settings: the applied head is reused)."""
    from cggr_torch.integrations import apply_cggr

    model = apply_cggr(tiny_model("llama").train(), warmup_steps=0, min_tokens_ratio=0.5, dynamic_threshold=False)
    trainer, rec = _sft(tmp_path, model)
    assert use_cggr(trainer, head="fused").cggr is model.cggr_loss
    trainer.train()
    assert model.cggr_loss.current_step == 3
    last = [log for log in rec.logs if "loss" in log][-1]
    assert 0 < last["cggr/tokens_selected"] == oracle.num_selected(last["cggr/tokens_total"], 0.5)
