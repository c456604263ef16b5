"""Tests of the demo (`examples/demo.py`) and its data helpers (`examples/data.py`).

The end-to-end test runs ``python examples/demo.py --quick`` exactly as ``make demo`` runs the full demo
(a subprocess, both frameworks, seven arms each) into a temporary directory and checks the artefacts: the PNG,
the JSON curves (finite, the right lengths, both x-axes: steps and training wall-clock), the trained-token
accounting of every arm, the same curriculum in PyTorch and JAX, and the verdict (printed last, stored in the
JSON, its numbers equal to the curves'). The verdict's logic is also tested on synthetic runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import data
from examples import demo

REPO_ROOT = Path(__file__).resolve().parent.parent

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tTabs,  spaces  & ünïcödé — “quotes” 🙂\n"


# --------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, n_eval", [(1000, 100), (1009, 100), (10, 1), (19, 1)])
def test_split_is_the_fixed_contiguous_90_10(n: int, n_eval: int) -> None:
    ids = np.arange(n, dtype=np.int32)
    train, held_out = data.split_train_eval(ids)
    assert len(held_out) == n_eval and len(train) == n - n_eval
    np.testing.assert_array_equal(np.concatenate([train, held_out]), ids)  # order kept, nothing lost
    train2, held_out2 = data.split_train_eval(ids.copy())
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(held_out, held_out2)


@pytest.mark.parametrize("ids, fraction", [(np.arange(9), 0.1), (np.zeros((4, 4), np.int32), 0.1),
                                           (np.arange(100), 0.0), (np.arange(100), 1.0)])
def test_split_rejects_bad_input(ids: np.ndarray, fraction: float) -> None:
    with pytest.raises(ValueError):
        data.split_train_eval(ids, fraction)


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_sorted_alphabet() -> None:
    tok = data.CharTokenizer.from_text(SAMPLE)
    assert tok.vocab_size == len(set(SAMPLE))
    assert list(tok.alphabet) == sorted(set(SAMPLE))
    ids = tok.encode(SAMPLE)
    assert ids.dtype == np.int32 and ids.shape == (len(SAMPLE),)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids.tolist()) == SAMPLE
    assert tok.encode("") .shape == (0,) and tok.decode([]) == ""
    # id order is the sorted character order
    assert tok.encode("\t")[0] == 0 and tok.decode([tok.vocab_size - 1]) == max(SAMPLE)


def test_char_tokenizer_errors() -> None:
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the alphabet"):
        tok.encode("abd")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([-1])
    with pytest.raises(ValueError):
        data.CharTokenizer.from_text("")
    with pytest.raises(ValueError):
        data.CharTokenizer("aa")


def test_byte_tokenizer_round_trip() -> None:
    tok = data.ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert tok.vocab_size == 256 and ids.dtype == np.int32
    assert len(ids) == len(SAMPLE.encode("utf-8")) and ids.max() < 256
    assert tok.decode(ids) == SAMPLE
    with pytest.raises(ValueError):
        tok.decode([256])


@pytest.fixture(scope="module")
def bpe_text() -> str:
    return data.stdlib_corpus(["textwrap.py"])  # ~20 kB of real text


def test_bpe_tokenizer_round_trip_deterministic_and_compressing(bpe_text: str, tmp_path: Path) -> None:
    tok = data.BPETokenizer.train(bpe_text, vocab_size=400)
    assert 256 < tok.vocab_size <= 400
    ids = tok.encode(bpe_text)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == bpe_text
    assert len(ids) < 0.8 * len(bpe_text.encode("utf-8"))  # merges were learned and are used
    # byte-level: text never seen in training (unicode, odd whitespace) still round-trips exactly
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode(tok.encode("  leading\n\n\n   trailing  ")) == "  leading\n\n\n   trailing  "
    # training is deterministic
    assert data.BPETokenizer.train(bpe_text, vocab_size=400).to_json() == tok.to_json()
    # save / load
    path = tmp_path / "bpe.json"
    tok.save(path)
    loaded = data.BPETokenizer.load(path)
    np.testing.assert_array_equal(loaded.encode(SAMPLE), tok.encode(SAMPLE))
    with pytest.raises(ValueError, match="vocab_size"):
        data.BPETokenizer.train(bpe_text, vocab_size=100)


# --------------------------------------------------------------------------------------------------
# text sources
# --------------------------------------------------------------------------------------------------


def test_stdlib_fallback_when_no_data_dir(tmp_path: Path) -> None:
    env = {data.DATA_DIR_ENV: str(tmp_path / "no-such-dir")}
    root = tmp_path / "repo"  # root/../shared/data does not exist
    assert data.find_tinyshakespeare(env, root) is None
    source = data.load_text(env=env, root=root)
    assert source.name == "python-stdlib"
    assert source.text == data.stdlib_corpus()  # deterministic
    assert source.text == data.load_text(env={}, root=root).text
    # the files in their sorted order, each followed by a newline
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    present = [f for f in sorted(data.STDLIB_CORPUS_FILES) if (stdlib / f).is_file()]
    assert len(present) >= len(data.STDLIB_CORPUS_FILES) - 2
    first = (stdlib / present[0]).read_text(encoding="utf-8")
    assert source.text.startswith(first + "\n")
    assert len(source.text) > 300_000
    assert data.load_text(env=env, root=root, max_chars=1000).text == source.text[:1000]


def test_stdlib_corpus_skips_missing_and_raises_when_none(tmp_path: Path) -> None:
    (tmp_path / "b.py").write_text("bbb", encoding="utf-8")
    (tmp_path / "a.py").write_text("aaa", encoding="utf-8")
    assert data.stdlib_corpus(["b.py", "missing.py", "a.py"], stdlib_dir=tmp_path) == "aaa\nbbb\n"
    with pytest.raises(FileNotFoundError):
        data.stdlib_corpus(["missing.py"], stdlib_dir=tmp_path)


def _make_data_dir(base: Path, text: str) -> Path:
    (base / "tinyshakespeare").mkdir(parents=True)
    (base / "tinyshakespeare" / "input.txt").write_text(text, encoding="utf-8")
    return base


def test_data_dir_lookup_order(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    _make_data_dir(tmp_path / "shared" / "data", "from shared")
    env_dir = _make_data_dir(tmp_path / "env", "from env")
    # ../shared/data relative to the repository root
    source = data.load_text(env={}, root=root)
    assert (source.name, source.text) == ("tinyshakespeare", "from shared")
    # $CGGR_DATA_DIR comes first
    assert data.load_text(env={data.DATA_DIR_ENV: str(env_dir)}, root=root).text == "from env"
    # an explicit file overrides both
    explicit = tmp_path / "mine.txt"
    explicit.write_text("explicit text", encoding="utf-8")
    source = data.load_text(explicit, env={data.DATA_DIR_ENV: str(env_dir)}, root=root)
    assert (source.name, source.text) == ("mine.txt", "explicit text")
    # a missing explicit file is an error, never a silent fallback
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "missing.txt", env={}, root=root)
    with pytest.raises(ValueError, match="max_chars"):
        data.load_text(explicit, max_chars=0)


def test_default_data_dir_is_shared_beside_repo() -> None:
    assert data.default_data_dirs(env={})[-1] == REPO_ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------


def test_batch_iterator_windows_are_reproducible_contiguous_and_in_range() -> None:
    tokens = np.arange(37, dtype=np.int64)
    batches = list(data.batch_iterator(tokens, 5, 7, seed=3, num_batches=20))
    assert len(batches) == 20
    for b in batches:
        assert b.shape == (5, 7) and b.dtype == np.int32
        np.testing.assert_array_equal(np.diff(b, axis=1), 1)  # each row is a contiguous window
        assert b.min() >= 0 and b.max() <= 36
    starts = np.concatenate([b[:, 0] for b in batches])
    assert starts.max() <= 37 - 7 and len(set(starts.tolist())) > 10  # offsets vary, last window reachable
    again = list(data.batch_iterator(tokens, 5, 7, seed=3, num_batches=20))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a, b)
    other = next(data.batch_iterator(tokens, 5, 7, seed=4))
    assert not np.array_equal(other, batches[0])
    exact = next(data.batch_iterator(np.arange(7), 2, 7, seed=0))  # len == seq_len: one possible window
    np.testing.assert_array_equal(exact, np.tile(np.arange(7), (2, 1)))


def test_eval_batches_are_consecutive_and_drop_the_tail() -> None:
    tokens = np.arange(100)
    batches = data.eval_batches(tokens, 3, 8)  # 12 windows -> 4 batches of 3, tail of 4 tokens dropped
    assert len(batches) == 4 and all(b.shape == (3, 8) and b.dtype == np.int32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches).ravel(), np.arange(96))
    assert len(data.eval_batches(tokens, 3, 8, max_batches=2)) == 2


@pytest.mark.parametrize("kwargs", [dict(batch_size=0, seq_len=4), dict(batch_size=2, seq_len=1),
                                    dict(batch_size=2, seq_len=11)])
def test_batching_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        next(data.batch_iterator(np.arange(10), **kwargs))
    with pytest.raises(ValueError):
        data.eval_batches(np.arange(10), **kwargs)
    with pytest.raises(ValueError, match="one batch"):
        data.eval_batches(np.arange(10), 2, 6)
    with pytest.raises(ValueError, match="integer"):
        next(data.batch_iterator(np.linspace(0, 1, 10), 2, 4))


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------



def test_demo_defaults_reach_min_ratio_within_the_run() -> None:
    cfg = demo.make_config(demo.parse_args([]))
    assert cfg.warmup_steps < cfg.steps and cfg.min_tokens_ratio == 0.25
    assert cfg.steps % cfg.eval_every == 0 and cfg.router_layers <= cfg.num_layers
    quick = demo.make_config(demo.parse_args(["--quick"]))
    assert quick.warmup_steps < quick.steps <= 10
    custom = demo.make_config(demo.parse_args(["--steps", "50", "--seed", "3"]))
    assert (custom.steps, custom.warmup_steps, custom.eval_every, custom.seed) == (50, 10, 2, 3)


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    assert demo.main(["--frameworks", "tensorflow", "--out", str(tmp_path)]) == 2
    assert demo.main(["--arms", "standard,oracle", "--out", str(tmp_path)]) == 2
    assert demo.main(["--arms", "", "--out", str(tmp_path)]) == 2
    assert demo.main(["--steps", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(FileNotFoundError):
        demo.main(["--quick", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])


def _run(framework: str, arm: str, eval_wallclock: list[float], eval_loss: list[float]) -> "demo.RunResult":
    """A synthetic run: one training record per eval interval of 10 steps (only the verdict's inputs matter)."""
    n = len(eval_loss) - 1
    run = demo.RunResult(name=f"{framework}-{arm}", framework=framework, arm=arm)
    run.eval_steps = [10 * j for j in range(n + 1)]
    run.eval_wallclock = list(eval_wallclock)
    run.eval_loss = list(eval_loss)
    sel = {"standard": 100, "random_token": 30, "cggr_token": 30, "random_seq": 25, "cggr_split": 25,
           "excess_token": 30, "excess_split": 25}[arm]
    seqs = 1 if arm in demo.SEQUENCE_ARMS else 4
    for j in range(n):
        dt = eval_wallclock[j + 1] - eval_wallclock[j]
        run.record(10 * j, 1.0, {"token_ratio": 1.0, "effective_ratio": 1.0, "tokens_selected": sel,
                                 "tokens_total": 100, "sequences_selected": seqs, "sequences_total": 4}, dt)
    return run


def test_time_to_reach_interpolates_between_evaluations() -> None:
    run = _run("torch", "standard", [0.0, 2.0, 4.0], [4.0, 3.0, 2.0])
    assert demo.time_to_reach(run, 4.0) == 0.0
    assert demo.time_to_reach(run, 2.5) == pytest.approx(3.0)
    assert demo.time_to_reach(run, 2.0) == pytest.approx(4.0)
    assert demo.time_to_reach(run, 1.9) is None
    bumpy = _run("torch", "standard", [0.0, 1.0, 2.0, 3.0], [4.0, 2.0, 3.0, 1.0])
    assert demo.time_to_reach(bumpy, 2.0) == pytest.approx(1.0)  # the first crossing


def test_verdict_is_computed_from_the_numbers() -> None:
    cfg = demo.DemoConfig(steps=20, warmup_steps=0, eval_every=10)
    runs = [
        _run("torch", "standard", [0.0, 5.0, 10.0], [4.0, 3.0, 2.00]),
        _run("torch", "random_token", [0.0, 4.0, 8.0], [4.0, 3.2, 2.30]),
        _run("torch", "cggr_token", [0.0, 4.0, 8.0], [4.0, 3.3, 2.40]),   # worse than random: +0.1
        _run("torch", "random_seq", [0.0, 2.0, 4.0], [4.0, 2.5, 1.90]),   # reaches 2.0 at ~3.58 s
        _run("torch", "cggr_split", [0.0, 2.5, 5.0], [4.0, 2.2, 1.95]),   # better than random_seq? no: +0.05
        _run("jax", "standard", [0.0, 5.0, 10.0], [4.0, 3.0, 2.00]),
        _run("jax", "random_token", [0.0, 4.0, 8.0], [4.0, 3.2, 2.30]),
        _run("jax", "cggr_token", [0.0, 4.0, 8.0], [4.0, 3.1, 2.20]),     # better than random: −0.1
        _run("jax", "random_seq", [0.0, 2.0, 4.0], [4.0, 2.9, 2.50]),
        _run("jax", "cggr_split", [0.0, 2.5, 5.0], [4.0, 2.9, 2.505]),    # a tie: +0.005
    ]
    verdict = demo.compute_verdict(runs, cfg)
    text = verdict["text"]
    t, j = verdict["frameworks"]["torch"], verdict["frameworks"]["jax"]
    assert t["final_eval_loss"] == {"standard": 2.0, "random_token": 2.3, "cggr_token": 2.4, "random_seq": 1.9,
                                    "cggr_split": 1.95}
    assert t["delta_token"] == pytest.approx(0.1) and t["delta_split"] == pytest.approx(0.05)
    assert j["delta_token"] == pytest.approx(-0.1) and j["delta_split"] == pytest.approx(0.005)
    # random_seq crosses 2.0 between (2 s, 2.5) and (4 s, 1.9): 2 + 2·0.5/0.6; cggr_split at 2.5 + 2.5·0.2/0.25
    assert t["reach_standard_final_seconds"]["random_seq"] == pytest.approx(2 + 2 * 0.5 / 0.6)
    assert t["reach_standard_final_seconds"]["cggr_split"] == pytest.approx(2.5 + 2.5 * 0.2 / 0.25)
    assert t["reach_standard_final_seconds"]["cggr_token"] is None
    assert t["soonest_to_standard_final"] == "random_seq"
    assert j["soonest_to_standard_final"] == "standard"
    # 10 ms vs 5 ms per step (2 records of 5 s / 2.5 s each) -> 2× standard's speed; 25 % of the tokens
    assert t["split_speedup_per_step"] == pytest.approx(2.0)
    assert t["trained_token_share_after_curriculum"]["cggr_split"] == pytest.approx(0.25)
    # the text carries the numbers of the dict and words that follow their signs
    assert "+0.1000" in text and "-0.1000" in text and "+0.0500" in text and "+0.0050" in text
    assert t["lowest_at_equal_steps"] == "random_seq" and j["lowest_at_equal_steps"] == "standard"
    assert ("torch: random_seq ended lowest at equal steps (1.9000); loss-based CGGR token selection did not beat "
            "random selection here: it ended worse") in text
    assert ("jax: standard ended lowest at equal steps (2.0000); loss-based CGGR token selection beat random "
            "selection here (Δ = -0.1000 nats)") in text
    assert "One seed" in text
    assert "a tie" in text and "2.00× faster per step" in text
    assert "random_seq reached standard's final held-out CE first in wall-clock (3.7 s against 10.0 s)" in text
    assert "jax:" in text and "no selection arm reached standard's final held-out CE sooner" in text
    assert "0.21 nats worse" in text and "0.21 nats better" in text and 'scoring="excess"' in text
    assert "0.097 nats better on the validation split but only 0.025 (not significant) on the held-out test" in text
    assert "did not run excess scoring" in text


def test_verdict_of_the_excess_arms_follows_the_numbers() -> None:
    cfg = demo.DemoConfig(steps=20, warmup_steps=0, eval_every=10)
    common = [("standard", 2.00), ("random_token", 2.30), ("cggr_token", 2.40), ("random_seq", 1.90),
              ("cggr_split", 1.95)]
    reference = {"steps": 60, "batch_size": 32, "chunks": 100, "train_seconds": 1.5, "score_seconds": 0.25,
                 "held_out_ce": 2.5}

    def runs_of(excess: dict[str, dict[str, float]]) -> list:
        return [_run(fw, arm, [0.0, 4.0, 8.0], [4.0, 3.0, loss])
                for fw, finals in excess.items() for arm, loss in common + list(finals.items())]

    # torch: excess wins both (−0.2, −0.05); jax: excess_token loses (+0.1), excess_split ties (+0.005)
    runs = runs_of({"torch": {"excess_token": 2.10, "excess_split": 1.85},
                    "jax": {"excess_token": 2.40, "excess_split": 1.905}})
    verdict = demo.compute_verdict(runs, cfg, {"torch": reference, "jax": dict(reference, held_out_ce=2.75)})
    t, j, text = verdict["frameworks"]["torch"], verdict["frameworks"]["jax"], verdict["text"]
    assert t["delta_excess_token"] == pytest.approx(-0.2) and t["delta_excess_split"] == pytest.approx(-0.05)
    assert j["delta_excess_token"] == pytest.approx(0.1) and j["delta_excess_split"] == pytest.approx(0.005)
    assert t["reference_held_out_ce"] == 2.5 and j["reference_held_out_ce"] == 2.75
    assert verdict["excess_beats_random"] == [True, True, False, False]
    assert "excess token: excess_token − random_token = -0.2000 nats" in text
    assert "excess split: excess_split − random_seq   = -0.0500 nats" in text
    assert "excess token: excess_token − random_token = +0.1000 nats" in text
    assert "excess token selection beat random selection here (Δ = -0.2000 nats)" in text
    assert "excess batch splitting beat random selection here (Δ = -0.0500 nats)" in text
    assert "excess token selection did not beat random selection here: it ended worse (Δ = +0.1000 nats)" in text
    assert "excess batch splitting did not beat random selection here (Δ = +0.0050 nats, within" in text
    assert "held-out CE 2.5000 after 60 steps (1.5 s + 0.2 s scoring" in text and "held-out CE 2.7500" in text
    assert "beat its random baseline in 2 of 4 comparisons" in text and "23 M parameters on real code" in text
    assert "on this tiny character-level task excess scoring does not win consistently" in text
    assert "did not run excess scoring" not in text and "One seed" in text
    assert "0.21 nats better" in text and "0.10 nats better, 6/6 seeds" in text
    assert "only 0.037 nats better and excess tokens 0.215 nats worse" in text and "sooner in wall-clock" in text

    # every excess Δ below −TIE_NATS: the text says it agrees with the study (still one seed)
    wins = demo.compute_verdict(runs_of({"torch": {"excess_token": 2.10, "excess_split": 1.85}}), cfg,
                                {"torch": reference})
    assert wins["excess_beats_random"] == [True, True]
    assert "beat its random baseline in every comparison, as in the study" in wins["text"]
    assert "does not win" not in wins["text"]
    # no excess arm: said so, and no excess keys
    loses = demo.compute_verdict(runs_of({"torch": {"excess_token": 2.40, "excess_split": 1.95}}), cfg)
    assert loses["excess_beats_random"] == [False, False]
    assert "in 0 of 2 comparisons" in loses["text"] and "excess scoring does not win;" in loses["text"]
    assert "reference model of the excess arms" not in loses["text"]  # no reference record given: none quoted
    plain = demo.compute_verdict(runs_of({"torch": {}}), cfg)
    assert "did not run excess scoring" in plain["text"] and "delta_excess_token" not in plain["frameworks"]["torch"]
    assert plain["excess_beats_random"] == []


def test_excess_arms_need_the_reference_slice() -> None:
    cfg = demo.DemoConfig(**demo.QUICK, warmup_steps=1)
    ids = np.arange(5000, dtype=np.int32) % 50
    with pytest.raises(ValueError, match="reference_ids"):
        demo.train_framework("torch", ["standard", "excess_token"], cfg, ids, [], 50, device="cpu", progress=False)
    chunks = demo.reference_chunks(np.arange(100, dtype=np.int32), cfg)  # seq_len 32: 3 chunks, the tail dropped
    assert chunks.shape == (3, 32)
    np.testing.assert_array_equal(chunks.ravel(), np.arange(96))
    with pytest.raises(ValueError, match="reference slice"):
        demo.reference_chunks(np.arange(31, dtype=np.int32), cfg)
    with pytest.raises(ValueError, match="reference_fraction"):
        demo.DemoConfig(reference_fraction=0.0)
    with pytest.raises(ValueError, match="reference_steps"):
        demo.DemoConfig(reference_steps=0)


def test_torch_excess_token_arm_reads_the_reference() -> None:
    """The reference decides which tokens train: a reference that makes one half of the tokens far "easier in
    excess" moves the selection (and the loss) away from the same step with a zero reference."""
    cfg = demo.DemoConfig(**demo.QUICK, warmup_steps=0)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 20, size=(cfg.batch_size, cfg.seq_len)).astype(np.int32)
    zero = np.zeros((cfg.batch_size, cfg.seq_len - 1), np.float32)
    skew = zero.copy()
    skew[:, ::2] = 50.0  # even positions: excess = nll − 50, never among the top-k
    losses = []
    for arm in ("excess_token", "excess_split"):
        for ref in (zero, skew):
            loss, metrics = demo.TorchArm(arm, cfg, 20, "cpu").train_step(batch, ref)
            assert math.isfinite(loss)
            losses.append(loss)
            if arm == "excess_token":
                assert metrics["tokens_total"] == cfg.predictions
                assert 0 < metrics["tokens_selected"] <= cfg.predictions // 2 + 1  # ≤ ratio·1.5 of the tokens
            else:
                assert metrics["sequences_selected"] == max(1, round(cfg.min_tokens_ratio * cfg.batch_size))
    assert losses[0] != pytest.approx(losses[1], abs=1e-6)  # token level: other tokens selected


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo must not need the test-suite's interpreter settings
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    png = out / demo.PLOT_NAME
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads((out / demo.CURVES_NAME).read_text(encoding="utf-8"))
    cfg = result["config"]
    steps, vocab, ratio, warmup = cfg["steps"], result["text"]["vocab_size"], cfg["min_tokens_ratio"], cfg["warmup_steps"]
    # the reference slice is its own text: train + reference + held-out = the whole text, none shared
    text = result["text"]
    assert text["train_tokens"] + text["reference_tokens"] + text["eval_tokens"] == text["tokens"]
    assert text["reference_tokens"] == round(cfg["reference_fraction"] * text["tokens"])
    B, n_tokens = cfg["batch_size"], cfg["batch_size"] * (cfg["seq_len"] - 1)
    k_seq = max(1, round(ratio * B))
    assert 0 < warmup < steps
    runs = result["runs"]
    assert set(runs) == {f"{fw}-{arm}" for fw in demo.FRAMEWORKS for arm in demo.ARMS}
    for name, run in runs.items():
        curves = ("train_loss", "token_ratio", "effective_ratio", "tokens_selected", "tokens_total",
                  "sequences_selected", "sequences_total", "step_seconds", "eval_loss", "eval_wallclock")
        for key in curves:
            values = run[key]
            assert values and all(v is not None and math.isfinite(v) for v in values), (name, key, values)
        assert run["steps"] == list(range(steps)) and len(run["step_seconds"]) == steps
        # both x-axes: steps and training wall-clock (the cumulative step times at each evaluation)
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == steps
        assert len(run["eval_loss"]) == len(run["eval_steps"]) == len(run["eval_wallclock"])
        assert run["eval_wallclock"] == [pytest.approx(sum(run["step_seconds"][:s])) for s in run["eval_steps"]]
        assert run["train_seconds"] == pytest.approx(sum(run["step_seconds"])) and run["train_seconds"] > 0
        assert run["input_tokens_per_s"] == pytest.approx(sum(run["tokens_total"]) / run["train_seconds"])
        assert run["trained_tokens_per_s"] == pytest.approx(sum(run["tokens_selected"]) / run["train_seconds"])
        # a freshly initialised model predicts about uniformly: held-out CE ≈ ln V at step 0
        assert abs(run["eval_loss"][0] - math.log(vocab)) < 0.5, (name, run["eval_loss"][0])
        assert all(t == n_tokens for t in run["tokens_total"]) and all(s == B for s in run["sequences_total"])
        after = range(warmup, steps)
        if run["arm"] == "standard":
            assert run["tokens_selected"] == run["tokens_total"] and set(run["sequences_selected"]) == {B}
        elif run["arm"] in demo.TOKEN_ARMS:
            # every sequence runs; the loss holds ≈ ratio of the tokens: the curriculum's ratio raised by the
            # dynamic threshold (SPEC §5.2: ratio · (1 + (1 − c̄)·0.5) with c̄ in [0, 1]), k = round(effective · n)
            assert set(run["sequences_selected"]) == {B}
            assert run["token_ratio"][0] == 1.0 and run["tokens_selected"][0] == n_tokens
            for i in after:
                eff, sel = run["effective_ratio"][i], run["tokens_selected"][i]
                assert run["token_ratio"][i] == pytest.approx(ratio)
                assert ratio - 1e-6 <= eff <= ratio * 1.5 + 1e-6, (name, i, eff)
                assert abs(sel - eff * n_tokens) <= 1, (name, i, sel, eff)
        else:
            # batch splitting and its random baseline train exactly ratio of the sequences after the curriculum
            # (fixed_quota: no dynamic threshold), all the tokens of those sequences
            assert run["sequences_selected"][0] == B
            assert [run["sequences_selected"][i] for i in after] == [k_seq] * len(after)
            assert all(t == s * (cfg["seq_len"] - 1) for t, s in zip(run["tokens_selected"], run["sequences_selected"]))
    for fw in demo.FRAMEWORKS:
        # the same count rule: random_seq, cggr_split and excess_split keep the same number of sequences at every
        # step; the token arms follow the same curriculum (their dynamic threshold reads each model's confidence)
        for arm in ("cggr_split", "excess_split"):
            assert runs[f"{fw}-random_seq"]["sequences_selected"] == runs[f"{fw}-{arm}"]["sequences_selected"]
        for arm in ("cggr_token", "excess_token"):
            assert runs[f"{fw}-random_token"]["token_ratio"] == pytest.approx(runs[f"{fw}-{arm}"]["token_ratio"])
        # every arm of a framework starts from the same initialisation
        assert len({runs[f"{fw}-{arm}"]["eval_loss"][0] for arm in demo.ARMS}) == 1
        # the excess arms train other tokens / sequences than the loss-based ones (the reference is read)
        for a, b in (("excess_token", "cggr_token"), ("excess_split", "cggr_split")):
            assert runs[f"{fw}-{a}"]["eval_loss"][1:] != runs[f"{fw}-{b}"]["eval_loss"][1:]
        # the reference model: trained and timed apart, once per framework
        ref = result["reference"][fw]
        assert ref["steps"] == cfg["reference_steps"] and ref["batch_size"] == cfg["reference_batch_size"]
        assert ref["chunks"] == text["reference_tokens"] // cfg["seq_len"]
        assert ref["train_seconds"] > 0 and ref["score_seconds"] > 0
        assert abs(ref["held_out_ce"] - math.log(vocab)) < 1.0  # a few steps: still near ln V, finite
    # the curriculum is the same schedule in both frameworks
    for arm in demo.ARMS[1:]:
        assert runs[f"torch-{arm}"]["token_ratio"] == pytest.approx(runs[f"jax-{arm}"]["token_ratio"])

    # the verdict: printed last, stored in the JSON, and its numbers are those of the curves
    verdict = result["verdict"]
    assert proc.stdout.rstrip().endswith(verdict["text"].rstrip())
    text = verdict["text"]
    for fw in demo.FRAMEWORKS:
        v = verdict["frameworks"][fw]
        final = {arm: runs[f"{fw}-{arm}"]["eval_loss"][-1] for arm in demo.ARMS}
        assert v["final_eval_loss"] == final
        assert v["lowest_at_equal_steps"] == min(final, key=final.__getitem__)
        for arm, loss in final.items():
            assert f"{arm} {loss:.4f}" in text
        assert v["delta_token"] == pytest.approx(final["cggr_token"] - final["random_token"])
        assert v["delta_split"] == pytest.approx(final["cggr_split"] - final["random_seq"])
        assert f"cggr_token − random_token = {v['delta_token']:+.4f} nats" in text
        assert f"cggr_split − random_seq   = {v['delta_split']:+.4f} nats" in text
        assert v["delta_excess_token"] == pytest.approx(final["excess_token"] - final["random_token"])
        assert v["delta_excess_split"] == pytest.approx(final["excess_split"] - final["random_seq"])
        assert f"excess_token − random_token = {v['delta_excess_token']:+.4f} nats" in text
        assert f"excess_split − random_seq   = {v['delta_excess_split']:+.4f} nats" in text
        assert v["reference_held_out_ce"] == result["reference"][fw]["held_out_ce"]
        reach = v["reach_standard_final_seconds"]
        assert reach["standard"] is not None and reach["standard"] <= runs[f"{fw}-standard"]["train_seconds"] + 1e-9
        soonest = v["soonest_to_standard_final"]
        assert soonest in demo.ARMS and reach[soonest] == min(t for t in reach.values() if t is not None)
        ms = v["ms_per_step_after_curriculum"]
        assert v["split_speedup_per_step"] == pytest.approx(ms["standard"] / ms["cggr_split"])
        assert f"{v['split_speedup_per_step']:.2f}× standard's speed" in text
    assert "Conclusion:" in text and "0.21 nats worse" in text and 'scoring="excess"' in text
    # the conclusion on excess follows the computed Δs
    deltas = [verdict["frameworks"][fw][k] for fw in demo.FRAMEWORKS for k in ("delta_excess_token",
                                                                              "delta_excess_split")]
    assert verdict["excess_beats_random"] == [d < -demo.TIE_NATS for d in deltas]
    if all(d < -demo.TIE_NATS for d in deltas):
        assert "as in the study" in text
    else:
        assert f"in {sum(d < -demo.TIE_NATS for d in deltas)} of 4 comparisons" in text
        assert "23 M parameters on real code" in text
    assert "did not run excess scoring" not in text
    assert "reference model (excess arms; not in any arm's wall-clock)" in proc.stdout

    assert "held-out CE" in proc.stdout
    for name in runs:
        assert name in proc.stdout
    assert "eval_ce=" in proc.stderr and "sel=" in proc.stderr  # the progress bars with live metrics
