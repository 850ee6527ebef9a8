"""Typed configs: unknown keys, wrong types and missing values are one error line naming the file and the key."""
import json
from pathlib import Path

import pytest

from mm.cli import main
from mm.config import ConfigError, LMPretrainConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "experiments/lm/pretrain_tiny.yaml"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_shipped_yaml_loads_typed():
    cfg = load_config(TINY)
    assert isinstance(cfg, LMPretrainConfig)
    assert [p.seq_len for p in cfg.phases] == [128, 256, 512]
    assert cfg.anneal.steps > 0 and cfg.data.mix["brown"] > 0


def test_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=0.5", "model.dim=48", "phases=[{steps: 3, seq_len: 16}]"])
    assert cfg.train.lr == 0.5 and cfg.model.dim == 48 and cfg.phases[0].steps == 3


@pytest.mark.parametrize("body,key,words", [
    ("stage: lm_pretrain\ndata: {shards: a, val_shards: b}\ntrain: {lrr: 1}\n", "train.lrr", "not in"),
    ("stage: lm_pretrain\ndata: {shards: a, val_shards: b}\ntrain: {lr: fast}\n", "train.lr", "float"),
    ("stage: lm_pretrain\ndata: {shards: a}\n", "data.val_shards", "missing"),
    ("stage: lm_pretrain\ndata: {shards: a, val_shards: b}\nphases: [{seq_len: 8}]\n", "phases[0].steps", "missing"),
])
def test_bad_config_names_file_and_key(tmp_path, body, key, words):
    p = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and key in msg and words in msg.lower()


def test_unknown_stage_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="stage"):
        load_config(write(tmp_path, "stage: nope\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "stage: [unclosed\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(TINY, ["train.batch_size=many"])


def test_cli_reports_one_error_line_and_json(tmp_path, capsys):
    p = write(tmp_path, "stage: lm_pretrain\ndata: {shards: a, val_shards: b}\ntrain: {lrr: 1}\n")
    code = main(["run", str(p), "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().count("\n") == 0 and "train.lrr" in err and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["ok"] is False


def test_every_shipped_stage_yaml_and_pipeline_step_loads():
    """Each experiments/ YAML with a stage loads typed, and so does every pipeline step's config under the step's
    overrides ({run} etc. filled): a typo in a shipped recipe fails here, not an hour into a run."""
    from mm.config import PipelineConfig
    from mm.stages.pipeline import _fill

    shipped = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if "\nstage:" in "\n" + p.read_text())
    assert len(shipped) >= 15
    steps = 0
    for path in shipped:
        cfg = load_config(path)
        if isinstance(cfg, PipelineConfig):
            for step in cfg.steps:
                load_config(REPO / step.config, [_fill(o, Path("runs/x"), 1, "runs/x/sft") for o in step.overrides])
                steps += 1
    assert steps >= 20


def test_every_shipped_data_kit_yaml_names_known_keys_and_voices():
    """experiments/data/*.yaml: top-level kit keys, the speech part's keys and its voice ids are all known (the same
    checks `mm data build` makes before any synthesis), so a typo fails here rather than minutes into a build."""
    from data import speech_kit, tts
    from data.kit import load_kit_config

    kits = sorted((REPO / "experiments/data").glob("*.yaml"))
    assert len(kits) >= 4
    for path in kits:
        speech = load_kit_config(path).get("speech")
        if isinstance(speech, dict):
            assert not set(speech) - set(speech_kit.DEFAULTS), path
            speech_kit.voice_pools({**speech_kit.DEFAULTS, **speech}, list(tts.ENGINES))  # raises on an unknown voice
    from data.image_kit import DEFAULTS  # experiments/data/image_anneal.yaml builds the set from these defaults

    shipped = load_kit_config(REPO / "experiments/data/kit.yaml")["image"]
    assert {k: v for k, v in shipped.items() if k != "curation"} == {k: DEFAULTS[k] for k in shipped if k != "curation"}
    assert DEFAULTS["curation"] == shipped["curation"]
    with pytest.raises(ValueError, match="unknown voice 'espeak:en-xx'"):
        speech_kit.voice_pools({**speech_kit.DEFAULTS, "voices": ["espeak:en-xx"]}, list(tts.ENGINES))
