"""Post-training building blocks: SFT packing masks, preference losses, model averaging, pipeline placeholders."""
import numpy as np
import pytest
import torch

from data.chat_stream import ChatPacker, PairSampler, encode_dialogs, encode_pairs, pair_half
from data.text_kit import pydoc_documents
from data.token_stream import IGNORE
from llm.model import Llama, LlamaConfig
from llm.reward import RewardModel, answer_labels, dpo_loss, pairwise_loss, sequence_logps
from llm.tokenizer import SPECIAL_TOKENS, ChatFormat, train_tokenizer
from mm.train.average import average_states
from mm.model.checkpoint import CheckpointError
from mm.stages.pipeline import _fill


@pytest.fixture(scope="module")
def tok():
    texts = [d["text"] for d in list(pydoc_documents())[:20]]
    return train_tokenizer(texts, 400)


def dialogs():
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(5) for b in range(5)]


def test_sft_labels_only_on_assistant_tokens_and_never_across_dialogs(tok):
    fmt = ChatFormat(tok)
    enc, dropped = encode_dialogs(dialogs(), fmt, 64)
    assert dropped == 0 and len(enc) == 25
    packer = ChatPacker(enc, tok.pad_id, seed=0)
    b = packer.batch(3, 0, 4, 48)
    assert torch.equal(b["tokens"], packer.batch(3, 0, 4, 48)["tokens"])  # a pure function of the step
    header, eot = tok.special_id("<|end_header_id|>"), tok.eot_id
    for row in range(4):
        labs, doc = b["labels"][row], b["doc_ids"][row]
        trained = (labs != IGNORE).nonzero().flatten().tolist()
        assert trained, "every row holds at least one assistant answer"
        for t in trained:
            assert doc[t] == doc[min(t + 1, 47)] or t == 47
        targets = set(labs[labs != IGNORE].tolist())
        assert eot in targets and header not in targets  # the answer's end-of-turn trains; headers never do
        # nothing from the user's question is a target: "plus" never appears in a label
        plus = set(tok.encode(" plus"))
        assert not (plus & targets)


def test_pair_encoding_and_dpo_mask_excludes_formatting(tok):
    fmt = ChatFormat(tok)
    ex = [{"messages": [{"role": "user", "content": "Spell cat backwards"}], "chosen": "tac", "rejected": "cta"}]
    pairs, _ = encode_pairs(ex, fmt, 64)
    specials = {tok.special_id(s) for s in SPECIAL_TOKENS}
    b = PairSampler(pairs, tok.pad_id, 0, specials).batch(0, 0, 2)
    assert b["tokens"].shape[0] == 4  # chosen rows, then rejected rows
    resp_ids = b["tokens"][b["resp"]].tolist()
    assert resp_ids and not (set(resp_ids) & specials)
    assert tok.decode(b["tokens"][0][b["resp"][0]].tolist()) == "tac"


def test_pref_halves_split_by_item_and_cover_every_pair():
    ex = [{"messages": [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": r, "item_id": f"item{i}"}
          for i in range(200) for r in ("b", "c")]  # two pairs per item
    ex.append({"messages": [{"role": "user", "content": "no id"}], "chosen": "a", "rejected": "b"})
    h0, h1 = pair_half(ex, 0), pair_half(ex, 1)
    assert len(h0) + len(h1) == len(ex) and 150 < len(h0) < 250  # a partition, near even
    ids0, ids1 = {e.get("item_id") for e in h0}, {e.get("item_id") for e in h1}
    assert not (ids0 & ids1 - {None})  # an item's pairs never straddle the halves
    assert pair_half(ex, 0) == h0  # stable across calls (crc32, not Python's salted hash)
    with pytest.raises(ValueError, match="pref_half"):
        pair_half(ex, 2)


def test_preference_losses():
    pol_c, pol_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    loss, margin = dpo_loss(pol_c, pol_r, pol_c, pol_r, beta=0.1)  # policy == reference: no preference yet
    torch.testing.assert_close(loss, torch.full((2,), float(np.log(2))))
    loss2, margin2 = dpo_loss(pol_c + 1, pol_r - 1, pol_c, pol_r, beta=0.1)
    assert (loss2 < loss).all() and (margin2 > 0).all()
    assert pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0])) < pairwise_loss(torch.tensor([0.0]), torch.tensor([2.0]))


def test_reward_model_reads_last_token_and_logps_sum_masked_positions():
    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    rm = RewardModel(lm)
    t = torch.randint(0, 50, (2, 10))
    r = rm(t, torch.tensor([4, 9]))
    t2 = t.clone()
    t2[0, 5:] = 0  # positions after the last token do not change its reward (causal)
    assert torch.allclose(rm(t2, torch.tensor([4, 9]))[0], r[0])
    resp = torch.zeros(2, 10, dtype=torch.bool)
    resp[:, 6:] = True
    lp, n = sequence_logps(lm, t, resp)
    full = torch.log_softmax(lm(t[:, :-1]).float(), -1).gather(-1, t[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, full[:, 5:].sum(-1))
    assert n.tolist() == [4.0, 4.0]
    # the RM's auxiliary LM loss on the first rows is the mean -log p over exactly those rows' response tokens
    r_aux, nll = rm(t, torch.tensor([4, 9]), answer_labels(t[:1], resp[:1]))
    torch.testing.assert_close(r_aux, r)
    torch.testing.assert_close(nll, -lp[0] / n[0])
    nll.backward()
    assert lm.output.weight.grad is not None and rm.head.weight.grad is None  # it trains the trunk, not the head


def test_averaging_copies_is_identity_and_mismatch_is_an_error():
    torch.manual_seed(0)
    sd = Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).state_dict()
    avg = average_states([sd, sd, sd])
    assert all(torch.equal(avg[k], sd[k]) for k in sd)
    other = {k: v * 3 for k, v in sd.items()}
    mid = average_states([sd, other])
    torch.testing.assert_close(mid["output.weight"], sd["output.weight"] * 2)
    bad = dict(sd)
    bad["output.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="output.weight"):
        average_states([sd, bad], names=["a", "b"])


def test_pipeline_placeholders():
    from pathlib import Path

    assert _fill("init_from={run}/r{r}/sft", Path("/x"), 2, None) == "init_from=/x/r2/sft"
    assert _fill("a={run}/r{r-1}/dpo", Path("/x"), 2, None) == "a=/x/r1/dpo"
    assert _fill("policy={policy}", Path("/x"), 1, "/x/sft0") == "policy=/x/sft0"
    with pytest.raises(ValueError, match="policy"):
        _fill("policy={policy}", Path("/x"), 1, None)
