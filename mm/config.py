"""Typed experiment configs: YAML -> dataclasses (OmegaConf structured), with one-line errors naming file and key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adapters import registry
from data.decode import MediaCaps
from encoders.best_rq import BestRQConfig
from encoders.clip import TextConfig
from encoders.speech import ConformerShape, SpecAugmentConfig
from encoders.vision import VisionShape
from llm.model import LlamaShape
from mm.train.trainer import TrainConfig


class ConfigError(ValueError):
    """A broken config: the message is one line naming the file and the key."""


@dataclass
class TokenizerConfig:
    """Use an existing tokenizer.json (path) or train a byte-level BPE of vocab_size on the training split."""

    path: str | None = None
    vocab_size: int = 4096
    train_bytes: int = 8_000_000


@dataclass
class TextDataConfig:
    """Text shards and the pretraining data mix (weights per source; normalised)."""

    shards: str = MISSING
    val_shards: str = MISSING
    mix: dict[str, float] = field(default_factory=dict)
    repeat_frac: float = 0.0  # share of windows holding a text span twice (copy data; beyond the paper; NOTES.md)
    build_if_missing: bool = True
    val_max_tokens: int = 32768


@dataclass
class PhaseConfig:
    """One stage of the context-length ramp."""

    steps: int = MISSING
    seq_len: int = MISSING
    batch_size: int | None = None


@dataclass
class AnnealConfig:
    """Final annealing (LR linearly to 0 on the highest-quality subset) and Polyak averaging of its checkpoints."""

    steps: int = 0
    quality_top_frac: float = 0.5
    mix: dict[str, float] = field(default_factory=dict)
    average_every: int = 10


@dataclass
class LMPretrainConfig:
    """The `lm_pretrain` stage (PAPER.md §1.4 at our scale)."""

    stage: str = "lm_pretrain"
    seed: int = 1337
    model: LlamaShape = field(default_factory=LlamaShape)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ChatDataConfig:
    """Chat (SFT) and preference shards; extra_shards adds e.g. rejection-sampled dialogs to SFT."""

    shards: str = ".cache/shards/chat/train-*.tar"
    val_shards: str = ".cache/shards/chat/val-*.tar"
    pref_shards: str = ".cache/shards/pref/train-*.tar"
    pref_val_shards: str = ".cache/shards/pref/val-*.tar"
    extra_shards: list[str] = field(default_factory=list)
    extra_pref_shards: list[str] = field(default_factory=list)  # more preference pairs (e.g. lm_rs's on-policy ones)
    build_if_missing: bool = True
    # train on one half of the preference pairs (split by item, data.chat_stream.pair_half): a reward model trained
    # on the other half then judges the policy without having seen its pairs; null = every pair
    pref_half: int | None = None


@dataclass
class PostTrainConfig:
    """The post-training stages (PAPER.md §1.5): lm_sft, lm_rm, lm_dpo. Fields a stage does not use are ignored."""

    stage: str = MISSING
    seed: int = 1337
    init_from: str = MISSING  # a run directory (or model folder) to start from
    steps: int = 200
    seq_len: int = 256
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # DPO
    beta: float = 0.1
    nll_weight: float = 0.2
    reference: Literal["frozen", "ema"] = "frozen"
    ema_decay: float = 0.9
    ema_every: int = 10
    # RM: weight of an auxiliary next-token loss on the chosen answer (0 = the plain pairwise objective)
    rm_nll_weight: float = 0.0
    # chat flag written into the final model's meta (mm chat then uses the template)
    chat: bool = True


@dataclass
class RejectionSamplingConfig:
    """Stage lm_rs: K samples per prompt from a policy, ranked by exact match where gold exists, then by the RM."""

    stage: str = "lm_rs"
    seed: int = 1337
    policy: str = MISSING
    reward_model: str = MISSING  # "" = rank by exact match against the gold answer alone
    prompts: int = 256
    k: int = 4
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 32
    # also write on-policy preference pairs (pref/train-*.tar, for DPO's data.extra_pref_shards): per prompt with a
    # gold answer and a wrong sample, chosen = the best sample if it is right else the gold answer, rejected = the
    # worst sample; data.pref_half restricts the prompts to that half's items
    pairs: bool = False
    data: ChatDataConfig = field(default_factory=ChatDataConfig)


@dataclass
class ImageDataConfig:
    """Image-text shards (decoded at the encoder's tile size); eval_samples caps in-training val evals (0: all)."""

    shards: str = ".cache/shards/image/train-*.tar"
    val_shards: str = ".cache/shards/image/val-*.tar"
    num_workers: int = 0
    eval_samples: int = 0
    image_size: int | None = None  # decode side in px (image stages; None: the tile size); 2x tile + 4 tiles = 2x2 grid


@dataclass
class ImageAugment:
    """Affine jitter of training images (data.augment.affine_jitter) from the sources whose meta "source" starts
    with one of `sources` (e.g. [mnist]; empty: off): rotation up to `degrees`, shift up to `translate` x the side,
    scale in 1 +- `scale`; drawn per sample from (seed, batch, row). Beyond the paper; the image VQA feed only."""

    sources: list[str] = field(default_factory=list)
    degrees: float = 0.0
    translate: float = 0.0
    scale: float = 0.0


@dataclass
class ClipPretrainConfig:
    """Stage `clip_pretrain` (PAPER.md §3): contrastive ViT + text tower pretraining on image-text shards."""

    stage: str = "clip_pretrain"
    seed: int = 1337
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    steps: int = 500
    vision: VisionShape = field(default_factory=VisionShape)
    vision_from: str | None = None  # a vision run (e.g. `mm import open_clip`) to start the encoder from; its shape
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 64
    pool: Literal["cls", "mean"] = "cls"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=2048))
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ImageStageConfig:
    """Stages `image_pretrain` / `image_anneal` (PAPER.md §4; DESIGN.md invariants 1-4): the frozen LM (`lm`) plus
    the CLIP-pretrained ViT (`vision`) joined by gated cross-attention; trains ViT + image adapter + the `<|image|>`
    row. image_anneal: `init_from` a previous image run (weights only, fresh optimizer), lower LR, and more tiles /
    a higher decode resolution through max_tiles / data.image_size, or a larger tile through tile_size."""

    stage: str = "image_pretrain"
    seed: int = 1337
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    steps: int = 300
    lm: str = MISSING  # LM run directory (frozen)
    vision: str = MISSING  # clip_pretrain (or image) run directory: the ViT to start from
    init_from: str | None = None  # image run to continue from (image_anneal): ViT + adapter weights
    adapter: dict = field(default_factory=dict)  # the image design: {kind, **its keys} (adapters.registry)
    max_tiles: int | None = None  # tiles per image (None: the encoder's); > the encoder's re-inits the tile embeddings
    thumbnail: bool | None = None  # a tiled image also as one whole-image tile (None: the encoder's; beyond the paper)
    tile_size: int | None = None  # the encoder's tile side (None: as saved); another resamples its position tables
    seq_len: int = 96  # dialog tokens per sample (longer ones are cut)
    caption_prob: float = 0.25  # share of samples trained as "Describe the image." -> caption
    qa_turns: int = 1  # an image's qa items per training dialog, as consecutive turns (1: one; beyond the paper)
    qa_sources: list[str] = field(default_factory=list)  # meta "source" prefixes asked qa_turns ([]: every source)
    augment: ImageAugment = field(default_factory=ImageAugment)  # training-image jitter per source (default: off)
    bow_weight: float = 0.0  # caption bag-of-words loss on the blocks' pre-gate reads (mm.train.read_bow); 0: off
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.01))


@dataclass
class SweepMember:
    """One image_sft sweep member: its own seed (data order, question draws, init of nothing new) and peak LR."""

    seed: int = MISSING
    lr: float = MISSING


@dataclass
class ImageSFTConfig(ImageStageConfig):
    """Stage `image_sft` (PAPER.md §7.2; DESIGN.md invariant 6): every sweep member starts from `init_from` (an
    image_pretrain / image_anneal run), hot-swaps the LM to `instruct_lm` (frozen), trains ViT + image adapter with its
    own seed / LR into members/<i>/, and is scored on held-out VQA (eval_items items of data.val_shards); the top
    soup_top_k members by vqa_acc are averaged (model soup) into final/."""

    stage: str = "image_sft"
    instruct_lm: str = MISSING  # run directory of the instruction-tuned LM (same shape and tokenizer as `lm`)
    sweep: list[SweepMember] = field(default_factory=list)
    soup_top_k: int = 2  # the largest K tried: soups of the top soup_min_k..soup_top_k members are scored, best kept
    soup_min_k: int = 2  # the smallest K tried (1: the best member alone competes too, as a greedy soup may end)
    eval_items: int = 200  # held-out VQA items per member and for the soup (0: all)


@dataclass
class ImageDPOConfig(ImageStageConfig):
    """Stage `image_dpo` (PAPER.md §7.3): DPO of ViT + image adapter (LM frozen: `lm` is the instruction-tuned LM,
    or `instruct_lm` hot-swaps it) from `init_from` (an image_sft run) on error-injected pairs (wrong object /
    number / word); the reference follows the policy by EMA every ema_every steps (or stays frozen)."""

    stage: str = "image_dpo"
    instruct_lm: str | None = None
    beta: float = 0.1
    nll_weight: float = 0.2
    reference: Literal["ema", "frozen"] = "ema"
    ema_decay: float = 0.9
    ema_every: int = 10
    eval_items: int = 200  # held-out images for the pair preference figure (0: all)


@dataclass
class AudioDataConfig:
    """Audio-text shards (DESIGN.md format); utterances longer than max_frames mel frames are randomly cropped in
    speech_pretrain (PAPER.md §9.4: 6K frames) and skipped (counted) in speech_sft when the dialog exceeds seq_len."""

    shards: str = ".cache/shards/audio/train-*.tar"
    val_shards: str = ".cache/shards/audio/val-*.tar"
    num_workers: int = 0
    max_frames: int = 6000


@dataclass
class SpeechPretrainConfig:
    """Stage `speech_pretrain` (PAPER.md §9.4): BEST-RQ pretraining of the Conformer on audio shards."""

    stage: str = "speech_pretrain"
    seed: int = 1337
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    steps: int = 300
    encoder: ConformerShape = field(default_factory=ConformerShape)
    best_rq: BestRQConfig = field(default_factory=BestRQConfig)
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.01))


# speech_sft's `adapter:` block is {kind, **the design's Config fields} (adapters.registry) plus these stage knobs:
# match_embed_scale sets the design's `out_rms` (when its Config has one) to the RMS of the LM's token embeddings
# (False: 0, the paper's plain Linear); the stage fills in_dim (encoder width) and out_dim (LM width) itself
SPEECH_STAGE_KNOBS = {"match_embed_scale": True}
SPEECH_FILLED = {"in_dim": "the encoder width", "out_dim": "the LM width", "out_rms": "match_embed_scale"}


def speech_adapter_spec(block: dict) -> tuple[dict, dict]:
    """A speech_sft `adapter:` block -> (the design's spec {kind, **fields} for adapters.registry, the stage knobs
    (SPEECH_STAGE_KNOBS with the block's values)); ValueError naming a key the stage fills itself."""
    block = dict(block or {})
    for key, source in SPEECH_FILLED.items():
        if key in block:
            raise ValueError(f"key '{key}': set by speech_sft from {source}; drop it from the adapter block")
    knobs = {k: block.pop(k, v) for k, v in SPEECH_STAGE_KNOBS.items()}
    return block, knobs


@dataclass
class SpeechSFTConfig:
    """Stage `speech_sft` (PAPER.md §9.5; DESIGN.md invariants 4-5): encoder (from `encoder_from`, a speech_pretrain
    run, or random init when null) + speech adapter trained jointly, the LM (`lm`) frozen, on ASR / AST / spoken-QA
    dialogs drawn from the audio shards with weights `tasks` among the tasks each sample supports; loss on the
    assistant answer only."""

    stage: str = "speech_sft"
    seed: int = 1337
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    steps: int = 300
    lm: str = MISSING
    encoder_from: str | None = None
    encoder: ConformerShape = field(default_factory=ConformerShape)  # used without encoder_from
    # the speech adapter design: {kind (adapters.registry.kinds("speech")), its Config's fields, match_embed_scale}
    adapter: dict[str, Any] = field(default_factory=lambda: {"kind": registry.DEFAULT["speech"]})
    tasks: dict[str, float] = field(default_factory=lambda: {"asr": 1.0, "ast": 1.0, "sqa": 1.0})
    seq_len: int = 192
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    # auxiliary token CTC on the transcript (adapters.speech.token_ctc_loss; beyond the paper): weight, annealed
    # linearly to ctc_weight_end by the last step; 0: off (the paper-faithful setting)
    ctc_weight: float = 0.0
    ctc_weight_end: float = 0.0
    # auxiliary character CTC straight on the encoder's 40 ms frames (mm.stages.speech_sft.char_ctc_loss; beyond the paper): a
    # dense acoustic signal for the Conformer, constant weight; 0: off
    char_ctc_weight: float = 0.0
    # train the encoder on the character CTC alone (no adapter, no LM forward: several times cheaper per step): an
    # acoustic stage whose encoder a later speech_sft loads with encoder_from; needs char_ctc_weight > 0; its eval
    # is the char head's held-out CER and WER (mm.eval.speech.acoustic_eval)
    acoustic_only: bool = False
    # distillation from the frozen LM reading the transcript (beyond the paper; DiVA / Ultravox train projectors so):
    # + distill_weight x KL(LM(reply | typed transcript) || LM(reply | speech)) at distill_temperature, per reply token
    # (mm.stages.speech_sft.distill_kl); 0: off
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    eval_items: int = 100  # held-out items scored at the end (mm.eval.speech; 0: skip)
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.01))


@dataclass
class VideoDataConfig:
    """Video-text shards: num_frames sampled uniformly over each clip by data.decode (decord, PyAV fallback)."""

    shards: str = ".cache/shards/video/train-*.tar"
    val_shards: str = ".cache/shards/video/val-*.tar"
    num_workers: int = 0
    backend: Literal["auto", "decord", "pyav"] = "auto"
    image_size: int | None = None  # frame decode side in px (None: the encoder's tile size)


@dataclass
class VideoStageConfig:
    """Stages `video_pretrain` / `video_sft` (PAPER.md §5, §7.2): the image model frozen, only the perceiver
    aggregator, the video cross-attention and the `<|video|>` row train. video_pretrain: `init_from` an image run
    (image_anneal), adapter random init; video_sft: `init_from` a video_pretrain run, the LM hot-swapped to
    `instruct_lm`, optionally ViT + image adapter from `image_from` (an image_sft run). num_frames / factor: frames
    sampled per clip and frames merged into one effective frame."""

    stage: str = "video_pretrain"
    seed: int = 1337
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    steps: int = 300
    init_from: str = MISSING
    instruct_lm: str | None = None
    image_from: str | None = None
    num_frames: int = 16
    factor: int = 16
    video_every: int = 4  # a video block before every `video_every`-th image block
    xattn_init_std: float | None = None  # video cross-attention init std (None: the LM's init_std; gates start at 0)
    # video_pretrain: the fresh attention gates' start, pre-tanh (0: the paper's; beyond it, an open read at step 0)
    xattn_gate_init: float = 0.0
    # the video design: {kind, **its keys} (adapters.registry; factor and max_tokens are filled in by the stage)
    aggregator: dict = field(default_factory=dict)
    seq_len: int = 128
    caption_prob: float = 0.25  # share of "Describe the video." -> caption samples
    mc_prob: float = 0.5  # share of questions with options asked in the multiple-choice format
    # auxiliary bag-of-words loss (beyond the paper): the mean aggregated video token predicts its caption's tokens
    # through a linear head (dropped at save), a signal for the aggregator that does not pass the near-0 gates; 0: off
    bow_weight: float = 0.0
    # what the bag-of-words head reads: "aggregate" (the pooled aggregator tokens) or "read" (the video cross-attention
    # blocks' pre-gate outputs averaged over the text rows that see the clip: trains the LM's read of the clip itself,
    # still without passing the gates)
    bow_source: Literal["aggregate", "read"] = "aggregate"
    eval_items: int = 0  # held-out questions scored at the end into the result (0: skip)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=0.01))


@dataclass
class ComposeConfig:
    """Stage `compose` (mm.model.store.compose as a pipeline step): a video (or image) run's streams + a speech run's."""

    stage: str = "compose"
    speech: str = MISSING  # a speech_sft run
    video: str = ""  # a video-stage run (holds the image adapter too); or
    image: str = ""  # an image-stage run (a herd without video)


@dataclass
class HerdReportConfig:
    """Stage `herd_report`: benchmark every trained part against its baseline and write report.md (mm.eval.report).
    Paths are run directories; an empty one skips that modality (its row says so)."""

    stage: str = "herd_report"
    media: MediaCaps = field(default_factory=MediaCaps)  # per-file caps: pixels, frames, audio seconds
    lm: str = MISSING  # the pretrained LM run
    chat: str = ""  # the post-trained (chat) LM run: exact match against the pretrained LM's
    sft: str = ""  # the SFT run the chat run's DPO started from ("": no DPO-vs-SFT rows)
    judge: str = ""  # a reward model trained on preference pairs the DPO never saw (lm_rm with data.pref_half)
    win_items: int = 600  # held-out prompts the judge compares DPO's and SFT's sampled replies on
    image: str = ""  # an image-stage run (image_sft / image_dpo)
    video: str = ""  # a video-stage run
    speech: str = ""  # a speech_sft run
    herd: str = ""  # a composed run (stage compose): its text bits per byte with no media against the bare LM's
    text_shards: str = ".cache/shards/text/val-*.tar"  # held-out text for the herd's no-media check
    stages: dict[str, str] = field(default_factory=dict)  # {stage name: run dir} for the loss / gate plots
    max_items: int = 200  # held-out items per benchmark
    chat_shards: str = ".cache/shards/chat/val-*.tar"  # held-out chat items (exact match)
    pref_shards: str = ".cache/shards/pref/val-*.tar"  # held-out preference pairs (chosen_frac)
    photo_shards: str = ".cache/shards/photos/val-*.tar"  # held-out real photographs ("": none; data/photo_kit.py)
    ocr_peer: str = "rapidocr"  # an OCR recogniser scored beside the image model ("": none; mm/eval/ocr_peer.py)
    human_speech_shards: str = ".cache/shards/speech_human/val-*.tar"  # held-out recorded speech ("": none)
    asr_peers: list[str] = field(default_factory=list)  # offline recognisers on the human speech (mm/eval/asr_peer.py)
    threads: int = 1


@dataclass
class PipelineStep:
    """One entry of a pipeline: a stage YAML, overrides ({run}, {round}, {prev} are substituted), once or per round."""

    name: str = MISSING
    config: str = MISSING
    overrides: list[str] = field(default_factory=list)
    per_round: bool = True


@dataclass
class PipelineConfig:
    """Stage `pipeline`: chains stage YAMLs into one run directory; completed steps are reused."""

    stage: str = "pipeline"
    rounds: int = 1
    steps: list[PipelineStep] = field(default_factory=list)


@dataclass
class AblationArm:
    """One arm of an ablation: a name and the overrides that make it (e.g. its adapter design block)."""

    name: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class AblationConfig:
    """Stage `ablation` (mm.stages.ablation): every arm trains `config` with the shared `overrides` plus its own (same seed,
    data order and step budget), all arms are scored on the same held-out items (`eval_shards`, `eval_items`; 0: all)
    with the modality's controls, and compared with the `default` arm (the first when empty) by paired bootstrap."""

    stage: str = "ablation"
    modality: Literal["image", "video", "speech"] = "image"
    config: str = MISSING
    overrides: list[str] = field(default_factory=list)  # {run}: the ablation's run directory
    arms: list[AblationArm] = field(default_factory=list)
    default: str = ""
    eval_shards: str = MISSING
    eval_items: int = 0
    max_new_tokens: int = 8
    n_boot: int = 2000
    seed: int = 0


STAGE_CONFIGS: dict[str, type] = {
    "lm_pretrain": LMPretrainConfig,
    "lm_sft": PostTrainConfig,
    "lm_rm": PostTrainConfig,
    "lm_dpo": PostTrainConfig,
    "lm_rs": RejectionSamplingConfig,
    "clip_pretrain": ClipPretrainConfig,
    "image_pretrain": ImageStageConfig,
    "image_anneal": ImageStageConfig,
    "image_sft": ImageSFTConfig,
    "image_dpo": ImageDPOConfig,
    "speech_pretrain": SpeechPretrainConfig,
    "speech_sft": SpeechSFTConfig,
    "video_pretrain": VideoStageConfig,
    "video_sft": VideoStageConfig,
    "pipeline": PipelineConfig,
    "herd_report": HerdReportConfig,
    "compose": ComposeConfig,
    "ablation": AblationConfig,
}


def _fail(path: str, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if key in MOVED_KEYS and "not in" in msg:
        msg = f"moved: set {MOVED_KEYS[key]} (the adapter design's block) instead"
    return ConfigError(f"{path}: key '{key}': {msg}")


def _apply_override(cfg, ov: str):
    """Merge one `key=value`; a mapping given for a plain dict field (e.g. data.mix) replaces it instead of merging."""
    key = ov.split("=", 1)[0].strip()
    parsed = OmegaConf.from_dotlist([ov])
    node = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_dict(node) and OmegaConf.get_type(node) is dict and OmegaConf.is_dict(OmegaConf.select(parsed, key)):
        OmegaConf.update(cfg, key, {}, merge=False)
    return OmegaConf.merge(cfg, parsed)


# config fields holding an adapter design block, per config class: dotted field -> (modality, block -> design spec)
DESIGN_FIELDS: dict[type, dict[str, tuple[str, Any]]] = {
    SpeechSFTConfig: {"adapter": ("speech", lambda block: speech_adapter_spec(block)[0])},
    ImageStageConfig: {"adapter": ("image", dict)},  # image_sft / image_dpo configs too (subclasses)
    VideoStageConfig: {"aggregator": ("video", lambda b: {k: v for k, v in b.items() if v is not None})},  # None: the
    # stage fills it (max_tokens)
}
# keys a stage YAML no longer has -> where they live now (a one-line hint instead of "not in ImageStageConfig")
MOVED_KEYS = {"every": "adapter.every", "schedule": "adapter.schedule", "attend": "adapter.attend"}


def validate_designs(cfg: Any, path: str) -> None:
    """ConfigError (one line naming the file and the key) unless every adapter block of cfg (DESIGN_FIELDS) parses
    as its design's Config (adapters.registry.parse: the kind exists, every key is a field of the right type)."""
    fields = next((f for cls, f in DESIGN_FIELDS.items() if isinstance(cfg, cls)), {})
    for name, (modality, to_spec) in fields.items():
        block = cfg
        for part in name.split("."):
            block = getattr(block, part)
        try:
            registry.parse(modality, to_spec(block))
        except ValueError as e:  # registry.DesignError, or a key the stage fills
            raise ConfigError(f"{path}: key '{name}': {str(e).splitlines()[0]}") from None


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Any:
    """Load a stage YAML and `key=value` overrides into its typed dataclass; raise ConfigError on any problem."""
    path = str(path)
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) and not OmegaConf.is_dict(raw):
        raise ConfigError(f"{path}: top level must be a mapping")
    stage = raw.get("stage")
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"{path}: key 'stage': {stage!r} is not one of {sorted(STAGE_CONFIGS)}")
    schema = OmegaConf.structured(STAGE_CONFIGS[stage])
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as e:
        raise _fail(path, e) from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{path}: override {ov!r} is not key=value")
        try:
            cfg = _apply_override(cfg, ov)
        except OmegaConfBaseException as e:
            raise _fail(f"{path} (override {ov})", e) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{path}: key '{missing[0]}': missing required value")
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _fail(path, e) from None
    validate_designs(out, path)
    return out


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (kept in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
