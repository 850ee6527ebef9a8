"""A whole post-training round through the real CLI on tiny shards: pretrain -> SFT0 -> RM -> RS -> SFT -> DPO, then
the herd report over its LM and policy."""
import json
import random
from pathlib import Path

import pytest
import torch

from data.chat_kit import iter_chat, write_json_shards
from data.shards import expand_shards
from data.text_kit import pydoc_documents, write_text_shards
from mm.cli import main
from mm.model.runs import load_lm, load_reward_model

REPO = Path(__file__).resolve().parent.parent


def arith(a, b):
    """Half arithmetic (hard for a tiny model), half a fixed-format reply it can learn in a few steps."""
    if (a + b) % 2:
        q, ans, fam = f"What is {a} plus {b}?", str(a + b), "arith"
    else:
        q, ans, fam = f"Reply with the word ok to {a} and {b}.", "ok", "format"
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
            "family": fam, "item_id": f"{a}+{b}", "answer": ans, "source": "test"}


def pref(ex, rng):
    wrong = str(int(ex["answer"]) + rng.choice([-2, -1, 1, 2])) if ex["answer"].isdigit() else "no"
    return {**ex, "messages": ex["messages"][:1], "chosen": ex["answer"], "rejected": wrong}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("post")
    docs = list(pydoc_documents())
    write_text_shards(docs[:60], d / "text", "train")
    write_text_shards(docs[60:70], d / "text", "val")
    rng = random.Random(0)
    items = [arith(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(items)
    train, val = items[:80], items[80:]
    write_json_shards(train, d / "chat", "train")
    write_json_shards(val, d / "chat", "val")
    write_json_shards([pref(e, rng) for e in train], d / "pref", "train")
    write_json_shards([pref(e, rng) for e in val], d / "pref", "val")
    return d


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0, out
    return json.loads(out)


def test_round_runs_from_one_yaml_and_learns(shards, tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    d = shards
    tiny = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "train.progress=false",
            "train.eval_every=0", "train.threads=1"]
    pipe = tmp_path / "round.yaml"
    chat = [f"data.shards={d}/chat/train-*.tar", f"data.val_shards={d}/chat/val-*.tar",
            f"data.pref_shards={d}/pref/train-*.tar", f"data.pref_val_shards={d}/pref/val-*.tar",
            "train.progress=false", "train.threads=1", "data.build_if_missing=false"]
    post = chat + ["seq_len=64", "train.batch_size=8", "train.warmup_steps=2"]
    steps = [
        {"name": "pretrain", "config": str(REPO / "experiments/lm/pretrain_tiny.yaml"), "per_round": False,
         "overrides": tiny[:4] + tiny[4:] + ["tokenizer.vocab_size=320", "phases=[{steps: 20, seq_len: 64, batch_size: 8}]",
                                             "anneal.steps=0", f"data.shards={d}/text/train-*.tar",
                                             f"data.val_shards={d}/text/val-*.tar", "data.mix={}", "train.warmup_steps=2"]},
        {"name": "sft0", "config": str(REPO / "experiments/lm/sft_tiny.yaml"), "per_round": False,
         "overrides": ["init_from={run}/pretrain", "steps=60", "train.lr=3e-3"] + post},
        {"name": "rm", "config": str(REPO / "experiments/lm/rm_tiny.yaml"),
         "overrides": ["init_from={run}/pretrain", "steps=40", "train.lr=3e-3"] + post},
        {"name": "judge", "config": str(REPO / "experiments/lm/rm_tiny.yaml"),  # the other half's pairs only
         "overrides": ["init_from={run}/pretrain", "steps=40", "train.lr=3e-3", "data.pref_half=1"] + post},
        {"name": "rs", "config": str(REPO / "experiments/lm/rs_tiny.yaml"),
         "overrides": ["policy={policy}", "reward_model={run}/r{r}/rm", "prompts=24", "k=3", "max_new_tokens=4",
                       "pairs=true", "data.pref_half=0"] + chat[:1] + ["data.build_if_missing=false"]},
        {"name": "sft", "config": str(REPO / "experiments/lm/sft_tiny.yaml"),
         "overrides": ["init_from={run}/pretrain", "steps=60", "train.lr=3e-3",
                       "data.extra_shards=[{run}/r{r}/rs/shards/train-*.tar]"] + post},
        {"name": "dpo", "config": str(REPO / "experiments/lm/dpo_tiny.yaml"),
         "overrides": ["init_from={run}/r{r}/sft", "steps=30", "train.lr=1e-3", "data.pref_half=0",
                       ] + post},
    ]
    import yaml
    pipe.write_text(yaml.safe_dump({"stage": "pipeline", "rounds": 1, "steps": steps}))
    out = tmp_path / "run"
    res = run(capsys, "run", str(pipe), "--out", str(out))
    r = res["steps"]
    assert set(r) == {"pretrain", "sft0", "r1/rm", "r1/judge", "r1/rs", "r1/sft", "r1/dpo"}
    assert r["r1/judge"]["train_pairs"] < 0.6 * r["r1/rm"]["train_pairs"]  # one half of the pairs
    assert res["policy"] == str(out / "r1" / "dpo")
    # SFT learned the answer format far beyond the base model (which cannot answer in the chat format at all)
    assert r["r1/sft"]["val_exact_match"] > 0.25
    # the RM prefers gold answers on held-out pairs; DPO's implicit reward prefers chosen over rejected
    assert r["r1/rm"]["rm_pref_acc"] > 0.6
    assert r["r1/dpo"]["chosen_frac"] > 0.6
    # rejection sampling: the picked sample is at least as good as the average sample
    assert r["r1/rs"]["best_reward"] >= r["r1/rs"]["mean_reward"]
    for ex in iter_chat(expand_shards(f"{out}/r1/rs/shards/train-*.tar")):
        assert ex["messages"][-1]["role"] == "assistant" and ex["source"] == "rejection_sampling"
    # on-policy pairs: a wrong sample of the policy against the gold answer (or a right sample), half 0's items only
    from data.chat_stream import pair_half
    from data.chat_tasks import exact_match
    op = list(iter_chat(expand_shards(f"{out}/r1/rs/pref/train-*.tar")))
    assert len(op) == r["r1/rs"]["pairs"] > 0 and pair_half(op, 0) == op
    for ex in op:
        strict = ex.get("match") == "strict"
        assert ex["rejection_kind"] == "on_policy" and not exact_match(ex["rejected"], ex["answer"], strict)
        assert exact_match(ex["chosen"], ex["answer"], strict) and ex["rejected"].strip()
    # the final policy is a chat model with the tokenizer; the RM loads as a reward model, not as a policy
    model, tok, meta = load_lm(out / "r1" / "dpo")
    assert meta["chat"] and meta["stage"] == "lm_dpo"
    load_reward_model(out / "r1" / "rm")
    # a second run reuses every completed step
    again = run(capsys, "run", str(pipe), "--out", str(out))
    assert again["reused"] is True
    # the herd report scores the LM and the chat policy against their baselines and reuses its benchmark lines
    rep = tmp_path / "report"
    report_args = ["run", str(REPO / "experiments/herd/report.yaml"), "--out", str(rep), f"lm={out}/pretrain",
                   f"chat={out}/r1/dpo", f"chat_shards={d}/chat/val-*.tar", f"pref_shards={d}/pref/val-*.tar",
                   "max_items=20", f"sft={out}/r1/sft", f"judge={out}/r1/judge", "win_items=16",
                   f"stages={{pretrain: '{out}/pretrain', dpo: '{out}/r1/dpo'}}"]
    res = run(capsys, *report_args)
    rows = {(r["modality"], r["metric"]): r for r in res["rows"]}
    bpb = rows[("text", "val_bpb")]  # 20 pretraining steps: no claim on the value, only on the comparison's direction
    assert bpb["baseline_name"] == "unigram model" and bpb["beats"] is (bpb["model"] < bpb["baseline"])
    em = rows[("chat", "exact_match")]
    assert em["beats"] is (em["model"] > em["baseline"]) and em["model"] > em["baseline"]
    # DPO against its SFT: the held-out judge's win rate against a tie, chosen_frac and exact match, paired
    win = rows[("chat", "DPO win rate vs SFT (16 prompts, held-out RM judge)")]
    lo, hi = win["gain_ci95"]
    assert win["baseline"] == 0.5 and lo <= win["model"] - 0.5 <= hi and win["beats"] is (lo > 0)
    cf = rows[("chat", "DPO chosen_frac vs SFT's")]
    assert cf["baseline_name"] == "SFT" and cf["beats"] is (cf["gain_ci95"][0] > 0)
    em_sft = rows[("chat", "DPO exact_match vs SFT's")]
    assert em_sft["beats"] is (em_sft["gain_ci95"][1] >= 0)  # "not below SFT's"
    md = (rep / "report.md").read_text()
    assert "| chat | exact_match |" in md and "plots/losses.png" in md and (rep / "plots" / "losses.png").exists()
    assert sorted(p.name for p in (rep / "benchmarks").iterdir()) == ["chat.json", "chat_pretrained.json",
                                                                      "dpo_vs_sft.json", "sft.json", "text_lm.json"]
    import subprocess
    def no_subprocess(*a, **k):
        raise AssertionError("benchmarks rerun although their JSON lines were kept")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    (rep / "result.json").unlink()
    again = run(capsys, *report_args)  # the same config: a started run continues with its kept benchmark lines
    assert again["rows"] == res["rows"]
    # another config on the started run is refused with one line, not silently mixed with the kept lines
    (rep / "result.json").unlink()
    assert main(report_args[:5] + [f"chat={out}/r1/dpo", "max_items=20"]) == 2
    assert "a run started with a different config" in capsys.readouterr().out
