"""Speech synthesis for the speech kit (DATA.md §4): espeak-ng (ctypes), flite and festival (subprocesses).

Engines come from the pinned, sha256-checked archives in the data cache (`data.fetch.TTS_KEYS`): the
espeakng-loader wheel (libespeak-ng + voice data) and Debian .debs for flite/festival, run from the cache with
LD_LIBRARY_PATH pointing at their extracted libraries, so nothing is installed system-wide. Without a cache the
espeak engine falls back to the installed `espeakng_loader` package (a pinned dependency), which tests use.
Every waveform leaves here as 16 kHz mono float32 (`to_16k`).
"""
from __future__ import annotations

import abc
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from data.fetch import PINS, TTS_KEYS, fetch_many

SR = 16000
ENGINES = ("espeak", "flite", "festival")
ESPEAK_BASES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4",
                   "+klatt", "+klatt2", "+klatt3")
FLITE_VOICES = ("slt", "rms", "awb", "kal16")  # flite's 16 kHz voices (kal is 8 kHz)
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an engine and a voice name (espeak: `base+variant`)."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        """`engine:name`, the form used in configs, manifests and shard json."""
        return f"{self.engine}:{self.name}"

    @staticmethod
    def parse(voice_id: str) -> "Voice":
        """Inverse of `id`."""
        engine, _, name = voice_id.partition(":")
        if engine not in ENGINES or not name:
            raise ValueError(f"bad voice id {voice_id!r}: expected 'ENGINE:NAME' with ENGINE in {ENGINES}")
        return Voice(engine, name)


class Engine(abc.ABC):
    """A synthesis engine; `synth_many` returns one (waveform, sample rate) per request, or None where it failed."""

    name = ""
    voices: tuple[str, ...] = ()

    @abc.abstractmethod
    def synth(self, text: str, voice: str, rate: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Synthesise one utterance at its native rate; rate > 1 speaks faster, pitch > 1 speaks higher."""

    def synth_many(self, requests: list[tuple[str, str, float, float]]) -> list[tuple[np.ndarray, int] | None]:
        """Synthesise (text, voice, rate, pitch) requests in order; a failed request gives None."""
        out = []
        for req in requests:
            try:
                out.append(self.synth(*req))
            except (RuntimeError, OSError, ValueError):
                out.append(None)
        return out


_ESPEAK_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_ESPEAK_FILES = {"en-gb": "en"}  # voice ids -> espeak-ng 1.52 voice file names where they differ
_ESPEAK_STATE: dict[str, tuple] = {}  # library path -> (lib, sample rate, callback, chunk list): one per process


class EspeakEngine(Engine):
    """espeak-ng through ctypes, synchronous mode: samples arrive in a callback, no audio device, ~300x real time."""

    name = "espeak"
    voices = tuple(b + v for b in ESPEAK_BASES for v in ESPEAK_VARIANTS)

    def __init__(self, lib_path: str | None = None, data_path: str | None = None) -> None:
        if lib_path is None:
            import espeakng_loader  # the installed, version-pinned wheel

            lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        lib_path = str(Path(lib_path).resolve())
        if lib_path not in _ESPEAK_STATE:  # the library keeps global state: initialise it once per process
            lib = ctypes.CDLL(lib_path)
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            # AUDIO_OUTPUT_SYNCHRONOUS = 2; espeakINITIALIZE_DONT_EXIT = 0x8000
            sr = lib.espeak_Initialize(2, 0, str(data_path).encode(), 0x8000)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({sr}) with data {data_path}")
            chunks: list[np.ndarray] = []

            def _collect(wav, n, _events):
                if n > 0:
                    chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
                return 0

            cb = _ESPEAK_CB(_collect)
            lib.espeak_SetSynthCallback(cb)
            _ESPEAK_STATE[lib_path] = (lib, sr, cb, chunks)
        self._lib, self.sample_rate, _, self._chunks = _ESPEAK_STATE[lib_path]

    def synth(self, text: str, voice: str, rate: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Speak `text` with e.g. voice "en-gb-scotland+f2"; rate scales 175 wpm, pitch scales base pitch 50."""
        base, plus, variant = voice.partition("+")
        name = _ESPEAK_FILES.get(base, base) + plus + variant
        err = self._lib.espeak_SetVoiceByName(name.encode())
        if err != 0:
            raise ValueError(f"espeak voice {voice!r} not found (error {err})")
        self._lib.espeak_SetParameter(1, int(np.clip(round(175 * rate), 80, 450)), 0)  # espeakRATE (wpm)
        self._lib.espeak_SetParameter(3, int(np.clip(round(50 * pitch), 0, 100)), 0)  # espeakPITCH
        self._chunks.clear()
        data = text.encode("utf-8")
        # position type POS_CHARACTER = 1; flags espeakCHARS_UTF8 | espeakENDPAUSE
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0x1 | 0x1000, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err})")
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)  # (T,) int16
        self._chunks.clear()
        return wav.astype(np.float32) / 32768.0, self.sample_rate


def _run(cmd: list[str], root: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_LIBRARY_PATH=str(root / "lib"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


class FliteEngine(Engine):
    """CMU flite 2.2 (one process per utterance, ~20 ms); pitch via `f0_shift` (rms ignores it)."""

    name = "flite"
    voices = FLITE_VOICES

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.bin = self.root / "bin" / "flite"

    def synth(self, text: str, voice: str, rate: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Speak `text` with a flite voice (slt, rms, awb, kal16)."""
        with tempfile.TemporaryDirectory(prefix="flite-") as tmp:
            out = Path(tmp) / "out.wav"
            proc = _run([str(self.bin), "-voice", voice, "--setf", f"duration_stretch={1.0 / rate:.3f}",
                         "--setf", f"f0_shift={pitch:.3f}", "-t", text, "-o", str(out)], self.root, 60)
            if proc.returncode != 0 or not out.is_file():
                raise RuntimeError(f"flite failed ({proc.returncode}): {proc.stderr.strip()[-200:]}")
            wav, sr = sf.read(str(out), dtype="float32")
        return wav, sr


def _scheme_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class FestivalEngine(Engine):
    """Festival 2.5 in batch mode (one process per batch); diphone pitch via int_lr_params (HTS slt: rate only)."""

    name = "festival"
    voices = FESTIVAL_VOICES

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.bin = self.root / "bin" / "festival"
        self.libdir = self.root / "share" / "festival"

    def synth(self, text: str, voice: str, rate: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        """Speak `text` with a festival voice (kal_diphone, ked_diphone, cmu_us_slt_arctic_hts)."""
        out = self.synth_many([(text, voice, rate, pitch)])[0]
        if out is None:
            raise RuntimeError(f"festival failed on {text[:40]!r} with {voice}")
        return out

    def _lines(self, text: str, voice: str, rate: float, pitch: float, path: Path) -> list[str]:
        lines = [f"(voice_{voice})"]
        if voice.endswith("_hts"):  # hts_engine honours -r (speed); -fm/-a are ignored here, so no pitch
            lines.append(f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {rate:.3f}))))')
        else:  # diphone voices: their own defaults are Duration_Stretch 1.1 and target_f0_mean 105
            lines.append(f"(Parameter.set 'Duration_Stretch {1.1 / rate:.3f})")
            lines.append(f"(set! int_lr_params '((target_f0_mean {105 * pitch:.1f}) (target_f0_std 14) "
                         f"(model_f0_mean 170) (model_f0_std 34)))")
        lines.append(f"(utt.save.wave (SynthText {_scheme_str(text)}) {_scheme_str(str(path))} 'riff)")
        return lines

    def synth_many(self, requests):
        """Synthesise all requests in one festival process; failed items (missing output) give None."""
        with tempfile.TemporaryDirectory(prefix="festival-") as tmp:
            paths = [Path(tmp) / f"{i}.wav" for i in range(len(requests))]
            script = [ln for req, p in zip(requests, paths) for ln in self._lines(*req, p)]
            (Path(tmp) / "run.scm").write_text("\n".join(script) + "\n", encoding="utf-8")
            lib = str(self.libdir)
            _run([str(self.bin), "--libdir", lib, "--datadir", lib, "-b", str(Path(tmp) / "run.scm")],
                 self.root, 60 + 5 * len(requests))
            out = []
            for p in paths:
                try:
                    out.append(sf.read(str(p), dtype="float32") if p.is_file() else None)
                except (RuntimeError, sf.LibsndfileError):
                    out.append(None)
            return out


ENGINE_CLASSES: dict[str, type[Engine]] = {"espeak": EspeakEngine, "flite": FliteEngine, "festival": FestivalEngine}


def _soname_links(lib_dir: Path) -> None:
    """Create the `libX.so.N` names the loader asks for (symlinks are not extracted from the .debs)."""
    for f in sorted(lib_dir.iterdir()):
        m = re.fullmatch(r"(lib.+\.so)\.(\d+(?:\.\d+)*)", f.name)
        if not m:
            continue
        parts = m.group(2).split(".")
        names = {f"{m.group(1)}." + ".".join(parts[:i]) for i in range(1, len(parts))}
        if m.group(1).startswith("libflite"):
            names.add(f"{m.group(1)}.1")  # Debian's flite 2.2 libraries keep soname .1
        for name in names - {f.name}:
            if not (lib_dir / name).exists():
                (lib_dir / name).symlink_to(f.name)


def engine_root(engine: str, cache_dir, fetch: bool = True) -> Path:
    """Fetch (if allowed) the engine's pins and assemble `cache_dir/engines/<engine>/{bin,lib,share}` from them.

    Files are symlinked from the per-archive folders (binaries copied, made executable); rebuilt when a pin changes.
    """
    cache_dir = Path(cache_dir)
    keys = TTS_KEYS[engine]
    stamp = "\n".join(PINS[k].sha256 for k in keys) + "\n"
    dest = cache_dir / "engines" / engine
    pin_dirs = [cache_dir / f"{PINS[k].name}-{PINS[k].version}" for k in keys]
    fresh = (dest / ".ok").is_file() and (dest / ".ok").read_text() == stamp
    if fresh and all((d / ".ok").is_file() for d in pin_dirs):
        return dest
    if fetch:
        dirs = fetch_many(keys, cache_dir, progress=False)
    else:
        dirs = {k: str(d) for k, d in zip(keys, pin_dirs)}
        missing = [k for k, d in dirs.items() if not (Path(d) / ".ok").is_file()]
        if missing:
            raise FileNotFoundError(f"{engine}: pins {missing} not fetched into {cache_dir}")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-engine-{engine}-"))
    tmp.chmod(0o755)
    for d in dirs.values():
        for src in Path(d).rglob("*"):
            if not src.is_file() or src.name == ".ok":
                continue
            rel = src.relative_to(d)
            if rel.parts[0] == "lib":  # lib/x86_64-linux-gnu[/pulseaudio]/libX.so.N -> lib/libX.so.N
                rel = Path("lib") / rel.name
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if rel.parts[0] == "bin":
                shutil.copyfile(src, out)
                out.chmod(0o755)
            elif not out.exists():  # relative to where the link will live: the cache folder may move
                out.symlink_to(os.path.relpath(src.resolve(), cache_dir.resolve() / "engines" / engine / rel.parent))
    (tmp / "lib").mkdir(exist_ok=True)
    _soname_links(tmp / "lib")
    (tmp / ".ok").write_text(stamp)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest


def engine_spec(engine: str, cache_dir=None, fetch: bool = True) -> str | None:
    """The path an engine is built from (espeak: its wheel folder or None for the installed package)."""
    if engine == "espeak":
        if cache_dir is None:
            return None
        pin = PINS["espeakng_loader"]
        target = Path(cache_dir) / f"{pin.name}-{pin.version}"
        try:
            return fetch_many(TTS_KEYS["espeak"], Path(cache_dir), progress=False)["espeakng_loader"] if fetch \
                else str(target) if (target / ".ok").is_file() else None
        except (RuntimeError, OSError, ValueError) as e:  # offline: the installed package is the same pinned version
            print(f"[tts] warning: espeak wheel not fetched ({e}); using the installed espeakng_loader".splitlines()[0],
                  file=sys.stderr)
            return None
    if cache_dir is None:
        raise FileNotFoundError(f"{engine} needs the data cache (its Debian packages are fetched there)")
    return str(engine_root(engine, cache_dir, fetch))


def make_engine(engine: str, spec: str | None) -> Engine:
    """Build an engine from `engine_spec`'s path (cheap; done once per worker process)."""
    if engine == "espeak":
        if spec is None:
            return EspeakEngine()
        pkg = Path(spec) / "espeakng_loader"
        return EspeakEngine(str(pkg / "libespeak-ng.so"), str(pkg / "espeak-ng-data"))
    return ENGINE_CLASSES[engine](spec)


def load_engines(cache_dir=None, names=ENGINES, fetch: bool = True) -> dict[str, str | None]:
    """Return {engine: spec} for the engines that fetch and pass a smoke test; warn once per skipped engine."""
    specs: dict[str, str | None] = {}
    for name in names:
        try:
            spec = engine_spec(name, cache_dir, fetch)
            eng = make_engine(name, spec)
            wav, _ = eng.synth("test", eng.voices[0])
            if wav.size == 0:
                raise RuntimeError("produced no audio")
            specs[name] = spec
        except Exception as e:  # any failure to fetch or run only removes this engine
            print(f"[tts] warning: engine {name} unavailable, skipped: {type(e).__name__}: {e}".splitlines()[0],
                  file=sys.stderr)
    return specs


def to_16k(wav: np.ndarray, sr: int, speed: float = 1.0) -> np.ndarray:
    """Downmix (T,) or (T, C) audio to mono and resample to 16 kHz float32; speed != 1 also speed-perturbs it.

    Speed perturbation (Kaldi style) treats the input as if recorded at sr*speed: tempo and pitch both scale.
    """
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    src = sr if speed == 1.0 else int(round(sr * speed / 100.0)) * 100  # a round rate keeps resampling cheap
    if src == SR:
        return np.ascontiguousarray(x)
    return AF.resample(torch.from_numpy(x), src, SR).numpy()


def trim_silence(wav: np.ndarray, sr: int = SR, top_db: float = 40.0, margin_s: float = 0.1) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than peak - top_db, keeping `margin_s` of context."""
    hop = sr // 100
    n = len(wav) // hop
    if n == 0:
        return wav
    energy = (wav[: n * hop].reshape(n, hop) ** 2).mean(axis=1)  # (n,)
    loud = np.nonzero(10 * np.log10(energy + 1e-12) > 10 * np.log10(energy.max() + 1e-12) - top_db)[0]
    if loud.size == 0:
        return wav
    margin = int(margin_s * sr)
    return wav[max(0, loud[0] * hop - margin): min(len(wav), (loud[-1] + 1) * hop + margin)]


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Add white, pink (1/f) or brown (1/f^2) noise at `snr_db` dB SNR; returns float32 (T,), clipped to [-1, 1]."""
    noise = rng.standard_normal(len(wav))
    if color != "white":
        spec = np.fft.rfft(noise)
        f = np.maximum(np.arange(len(spec)), 1.0)
        spec /= f ** (0.5 if color == "pink" else 1.0)
        noise = np.fft.irfft(spec, n=len(wav))
    out = AF.add_noise(torch.from_numpy(np.asarray(wav, np.float32))[None],
                       torch.from_numpy(noise.astype(np.float32))[None], torch.tensor([float(snr_db)]))
    return out[0].clamp(-1.0, 1.0).numpy()


def synthesize(engine: Engine, text: str, voice: str, rate: float = 1.0, pitch: float = 1.0,
               speed: float = 1.0) -> np.ndarray:
    """Speak `text` and return trimmed 16 kHz mono float32 audio (T,)."""
    wav, sr = engine.synth(text, voice, rate, pitch)
    return trim_silence(to_16k(wav, sr, speed))


def fetch_engines(cache_dir=None) -> dict[str, str | None]:
    """Fetch the pinned TTS engines into the cache (`mm data fetch`); engines that fail are skipped with a warning."""
    return load_engines(cache_dir, fetch=True)
