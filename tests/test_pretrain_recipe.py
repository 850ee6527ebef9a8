"""The pretraining recipe pieces: context ramp, LR schedule with anneal to 0, quality subset, packed sampler."""
import numpy as np
import pytest
import torch

from data.token_stream import IGNORE, PackedSampler, TokenSource, eval_windows, normalise_mix
from mm.config import load_config
from mm.stages.lm_pretrain import Schedule, high_quality
from tests.test_config import TINY


def cfg_with(*overrides):
    return load_config(TINY, list(overrides))


def test_schedule_ramps_context_and_anneals_lr_to_zero():
    cfg = cfg_with("phases=[{steps: 10, seq_len: 16, batch_size: 8}, {steps: 10, seq_len: 32}]", "anneal.steps=5",
                   "train.warmup_steps=4", "train.lr=1.0", "train.min_lr_ratio=0.1", "train.batch_size=4")
    s = Schedule(cfg)
    assert s.total == 25 and s.main_steps == 20
    assert [s.seq_len(i) for i in (0, 9, 10, 19, 20, 24)] == [16, 16, 32, 32, 32, 32]
    assert s.batch_size(0) == 8 and s.batch_size(10) == 4
    lrs = [s.lr(i) for i in range(25)]
    assert lrs[3] == pytest.approx(1.0)  # warmup reaches the peak
    assert all(a >= b for a, b in zip(lrs[3:20], lrs[4:20]))  # cosine decays
    assert lrs[19] == pytest.approx(0.1, abs=0.01)  # down to min_lr_ratio * peak
    assert lrs[24] == pytest.approx(0.0) and all(a > b for a, b in zip(lrs[20:], lrs[21:]))  # linear to zero
    assert s.annealing(20) and not s.annealing(19)


def test_high_quality_keeps_top_fraction():
    docs = [{"quality": q} for q in np.linspace(0, 1, 10)]
    kept = high_quality(docs, 0.3)
    assert len(kept) == 3 and min(d["quality"] for d in kept) >= 0.7


def make_sources():
    a = TokenSource(np.arange(1, 201, dtype=np.uint32), np.array([0, 50, 120], dtype=np.int64))
    b = TokenSource(np.arange(1000, 1300, dtype=np.uint32), np.array([0], dtype=np.int64))
    return {"a": a, "b": b}


def test_sampler_is_a_pure_function_of_step_and_respects_documents():
    s1, s2 = PackedSampler(make_sources(), {"a": 0.5, "b": 0.5}, seed=3), PackedSampler(make_sources(), {}, seed=3)
    x, y = s1.batch(7, 0, 6, 40), s1.batch(7, 0, 6, 40)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["tokens"], s1.batch(8, 0, 6, 40)["tokens"])
    assert torch.equal(x["tokens"], s2.batch(7, 0, 6, 40)["tokens"])  # empty mix = equal weights
    # labels are next tokens, except across a document boundary, which is ignored
    for row in range(6):
        toks, labs, doc = x["tokens"][row], x["labels"][row], x["doc_ids"][row]
        for t in range(39):
            if doc[t] == doc[t + 1]:
                assert labs[t] == toks[t + 1]
        if toks[0] < 1000:  # source a: boundaries at absolute ids 51 and 121
            crossing = [t for t in range(40) if int(toks[t]) in (50, 120)]
            assert all(labs[t] == IGNORE for t in crossing)


def test_repeat_frac_windows_read_a_span_twice_at_a_varying_distance():
    """repeat_frac: about that share of windows start with a span read twice (length drawn in [8, seq_len / 2], so
    the copy's distance varies), then the text goes on from the span's start; labels are the next tokens as ever; 0
    draws exactly the windows of a sampler without the knob; a share outside [0, 1] is refused."""
    plain, rep = PackedSampler(make_sources(), {}, seed=3), PackedSampler(make_sources(), {}, seed=3, repeat_frac=0.5)
    zero = PackedSampler(make_sources(), {}, seed=3, repeat_frac=0.0)
    assert torch.equal(plain.batch(5, 0, 8, 40)["tokens"], zero.batch(5, 0, 8, 40)["tokens"])
    lengths = set()
    for step in range(10):
        b, p = rep.batch(step, 0, 8, 40), plain.batch(step, 0, 8, 40)
        for row in range(8):
            toks, labs, doc = b["tokens"][row], b["labels"][row], b["doc_ids"][row]
            again = [t for t in range(1, 40) if toks[t] == toks[0]]  # the sources' tokens never repeat otherwise
            if not again:
                assert torch.equal(toks, p["tokens"][row])  # an ordinary window: the one the plain sampler drew
                continue
            h = again[0]
            lengths.add(h)
            assert 8 <= h <= 20 and torch.equal(toks[h:2 * h], toks[:h])  # the span, then its copy
            assert torch.equal(toks[h:], torch.arange(int(toks[0]), int(toks[0]) + 40 - h))  # the text goes on
            assert all(labs[t] == toks[t + 1] for t in range(39) if doc[t] == doc[t + 1])
            assert int(doc[h]) == int(doc[0])  # the copy's start can see the span's start
    assert 6 <= len(lengths)  # the distance varies
    with pytest.raises(ValueError, match="repeat_frac"):
        PackedSampler(make_sources(), {}, seed=0, repeat_frac=1.5)


def test_mix_weights_steer_sources():
    s = PackedSampler(make_sources(), {"a": 0.9, "b": 0.1}, seed=0)
    rows = torch.cat([s.batch(i, 0, 16, 8)["tokens"] for i in range(20)])
    frac_a = (rows[:, 0] < 1000).float().mean().item()
    assert 0.8 < frac_a < 0.97
    with pytest.raises(ValueError, match="'c'"):
        normalise_mix({"c": 1.0}, ["a", "b"])


def test_eval_windows_predict_every_token_once():
    docs = [[1, 5, 6, 7, 8, 2], [1, 9, 2]]
    w = eval_windows(docs, seq_len=3, pad_id=0)
    labels = w["labels"][w["labels"] != IGNORE].tolist()
    assert labels == [5, 6, 7, 8, 2, 9, 2]
