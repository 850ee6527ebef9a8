"""Run-directory safety: one writer per run directory (a lock file), and reuse / resume only when the resolved config
and the inputs it read match what the directory was made with (a fingerprint)."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data.atomic import atomic_write_text
from mm.model.checkpoint import CheckpointError, file_sha256
from mm.model.runs import model_dir

LOCK = "lock.json"
FINGERPRINT = "fingerprint.json"
# Settings that change neither the data order nor the weights: a run may be resumed or reused with them changed.
SAFE_KEYS = ("config.train.stop_after", "config.train.log_every", "config.train.progress", "config.train.ckpt_every",
             "config.train.keep_last", "config.train.eval_every")
_SHARD_MAGIC = ("*", "?", "[", "{", "::")


class RunLocked(RuntimeError):
    """The run directory is held by another live `mm run` (or by one on another host)."""


class ConfigDrift(ValueError):
    """A completed or interrupted run was made with another config or other inputs than the one asked for now."""


# ---- the lock ----------------------------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:  # an unreadable lock file (os.kill(-1, 0) would succeed)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    start = _proc_start(pid)
    return start is None or holder.get("proc_start") in (None, start)


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('cmd', '?')})"


_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


@dataclass
class RunLock:
    """An exclusive lock on a run directory: RUN/lock.json holding {pid, host, started, proc_start, cmd}.

    A second holder fails with RunLocked naming the first; a stale lock (its process gone, same host) is taken over
    with one warning line; a lock from another host is never taken over unless break_lock. Re-entrant per process.
    """

    run_dir: Path
    break_lock: bool = False

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / LOCK

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            try:
                if time.time() - self.path.stat().st_mtime < 10:  # maybe a holder still writing it: look again
                    return None
            except OSError:
                return None
            return {"pid": -1, "host": socket.gethostname(), "started": 0, "cmd": "unreadable lock file"}

    def _set_aside(self, holder: dict, why: str) -> None:
        """Move the lock judged stale out of the way; if another process took it over meanwhile, put its lock back."""
        aside = self.path.with_name(f".{LOCK}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved is not None and moved != holder:  # a live lock written after we read the stale one
            try:
                os.link(aside, self.path)  # back, unless yet another holder is already there
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        print(f"[mm] {self.run_dir}: {why}", file=sys.stderr, flush=True)
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] += 1
            return self
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "proc_start": _proc_start(os.getpid()), "cmd": " ".join(sys.argv)[:300]}
        for _ in range(25):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    time.sleep(0.5)
                    continue
                if self.break_lock:
                    self._set_aside(holder, f"breaking the lock of {_describe(holder)} (--break-lock)")
                elif holder.get("host") != me["host"]:
                    raise RunLocked(f"{self.run_dir}: locked by {_describe(holder)}, another host; if that run is "
                                    f"gone, re-run with --break-lock") from None
                elif _alive(holder):
                    raise RunLocked(f"{self.run_dir}: in use by {_describe(holder)}; wait for it, or use another "
                                    f"--out (--break-lock if that process is known to be gone)") from None
                else:
                    self._set_aside(holder, f"taking over a stale lock of {_describe(holder)} (that process is gone)")
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except BaseException:  # e.g. a full disk: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                raise
            _HELD[key] = 1
            return self
        raise RunLocked(f"{self.path}: could not take the lock")

    def release(self) -> None:
        key = self.path.resolve()
        if key not in _HELD:
            return
        _HELD[key] -= 1
        if _HELD[key] == 0:
            del _HELD[key]
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- the fingerprint ---------------------------------------------------------------------------------------------

def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {f"{prefix}.length": len(obj)}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _file_record(path: Path, old: dict | None) -> dict:
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if old and old.get("size") == rec["size"] and old.get("mtime_ns") == rec["mtime_ns"] and "sha256" in old:
        rec["sha256"] = old["sha256"]  # unchanged on disk since last recorded: no re-hash
    else:
        rec["sha256"] = file_sha256(path)
    return rec


def _manifest_for(files: list[Path]) -> Path | None:
    """The kit manifest.json a set of shards belongs to (in their folder or one above), if all share one."""
    found = set()
    for f in files:
        m = next((d / "manifest.json" for d in (f.parent, f.parent.parent) if (d / "manifest.json").exists()), None)
        if m is None:
            return None
        found.add(m)
    return found.pop() if len(found) == 1 else None


def _model_files(p: Path) -> list[Path]:
    """What a stage reads from a run directory or model folder given as an input: the final (or newest) model's
    files and the run's tokenizer; [] when p is no model."""
    try:
        d = model_dir(p)
    except CheckpointError:
        return []
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))
    files += [t for t in (p / "tokenizer.json",) if t.exists() and t not in files]
    return files


def _input_record(value: str, old: dict | None, run_dir: Path) -> dict | None:
    """What an input-looking config string points at: files' hashes, a model's weight hashes, or a shard set's
    manifest / names, sizes and mtimes. None when it names nothing on disk (or lies inside the run directory)."""
    from data.shards import expand_shards

    p = Path(value)
    try:
        if p.resolve().is_relative_to(run_dir.resolve()):
            return None
        if p.is_file():
            return {"files": {str(p): _file_record(p, ((old or {}).get("files") or {}).get(str(p)))}}
        if p.is_dir():
            files = _model_files(p)
            if files:
                olds = (old or {}).get("files") or {}
                return {"files": {str(f.relative_to(p)): _file_record(f, olds.get(str(f.relative_to(p))))
                                  for f in files}}
        if not p.is_dir() and not any(m in value for m in _SHARD_MAGIC):
            return None
        shards = expand_shards(value)
    except Exception:  # a config string that only looks like a path or a shard spec names no input
        return None
    manifest = _manifest_for(shards)
    if manifest is not None:
        return {"shards": len(shards), "manifest": _file_record(manifest, (old or {}).get("manifest"))}
    return {"shards": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in shards}}


def _strip_hash_cache(rec: dict | None) -> Any:
    """An input record without the (size, mtime) that only serve to skip re-hashing: what is compared."""
    if rec is None:
        return None
    if "files" in rec:
        return {k: v["sha256"] for k, v in rec["files"].items()}
    if "manifest" in rec:
        return {"shards": rec["shards"], "manifest": rec["manifest"]["sha256"]}
    return rec


def fingerprint(cfg: Any, run_dir: Path, old: dict | None = None) -> dict:
    """{"config.<key>": value} for every resolved config field, plus {"input.<key>": record} for every field that
    names a file, a model or shards on disk (weights and manifests hashed; re-hashed only if size or mtime changed
    since `old`)."""
    flat = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "config")
    old = old or {}
    out: dict[str, Any] = dict(flat)
    out[MAPPINGS] = _mapping_fields(cfg, "config")
    out[DEFAULTS] = _defaults(cfg)
    for key, value in flat.items():
        if isinstance(value, str) and value and key != "config.stage":
            ikey = "input" + key[len("config"):]
            rec = _input_record(value, old.get(ikey), Path(run_dir))
            if rec is not None:
                out[ikey] = rec
    return out


MAPPINGS = "mappings"  # fingerprint entry: the config fields that are free-form mappings (their keys are settings)
DEFAULTS = "defaults"  # fingerprint entry: each config field's default (what a run made before the field existed had)


def _defaults(cfg: Any) -> dict[str, Any]:
    """{"config.<key>": default} of a dataclass config's fields (required fields omitted); {} for other configs."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    tree = OmegaConf.to_container(OmegaConf.structured(type(cfg)), resolve=False)
    return {k: v for k, v in _flatten(tree, "config").items() if v != "???"}


def _mapping_fields(cfg: Any, prefix: str) -> list[str]:
    """The dotted paths of a config's dict-valued fields (adapter blocks, data mixes, train.lr_mult, ...)."""
    out = []
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        v = getattr(cfg, f.name)
        if isinstance(v, dict):
            out.append(f"{prefix}.{f.name}")
        elif dataclasses.is_dataclass(v):
            out += _mapping_fields(v, f"{prefix}.{f.name}")
    return out


def first_difference(old: dict, new: dict, safe: tuple[str, ...] = SAFE_KEYS) -> tuple[str, Any, Any] | None:
    """(key, old value, new value) of the first setting or input that differs, ignoring `safe` keys, inputs the old
    run found absent (e.g. shards the stage built itself) and fields newer than the old run set to their default
    (new["defaults"]: the behaviour the old run had; set to anything else they differ); a key the old run lacks
    inside a free-form mapping (new["mappings"]: e.g. `adapter.out_rms` added to an adapter block) is a difference:
    a mapping holds only what was set. None when they match."""
    maps = tuple(f"{m}." for m in new.get(MAPPINGS, ()))
    defaults = new.get(DEFAULTS) or {}
    for key in list(new) + [k for k in old if k not in new and k.startswith("config.")]:
        if key in safe or key in (MAPPINGS, DEFAULTS):
            continue
        if key not in old and not key.startswith(maps):  # an input the old run found absent (shards it built), or
            if key in defaults and new[key] != defaults[key]:  # a knob newer than the run, set away from its default
                return key, defaults[key], new[key]
            continue  # a knob newer than the run, at its default
        a, b = old.get(key), new.get(key)
        if key.startswith("input."):
            a, b = _strip_hash_cache(a), _strip_hash_cache(b)
        if a != b:
            return key, a, b
    return None


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def check_matches(run_dir: Path, new: dict, what: str) -> None:
    """Raise ConfigDrift with one line naming the first differing key if run_dir was made with another fingerprint.

    Run directories written before fingerprints existed are compared on their config.yaml alone (one warning)."""
    run_dir = Path(run_dir)
    path = run_dir / FINGERPRINT
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise ConfigDrift(f"{path}: corrupt; pass --force to retrain, or use another --out") from None
    elif (run_dir / "config.yaml").exists():
        print(f"[mm] {run_dir}: no {FINGERPRINT} (made by an older version): its config.yaml is checked, its inputs "
              f"are not", file=sys.stderr, flush=True)
        old = _flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True), "config")
        new = {k: v for k, v in new.items() if not k.startswith("input.")}
    else:
        return
    diff = first_difference(old, new)
    if diff is not None:
        key, a, b = diff
        raise ConfigDrift(f"{run_dir}: {what} with a different {key.split('.', 1)[0]}: {key.split('.', 1)[1]} was "
                          f"{_short(a)}, now {_short(b)}; pass --force to retrain it, or use another --out")


def write_fingerprint(run_dir: Path, fp: dict) -> None:
    """Record the fingerprint a run directory is made with (atomically)."""
    atomic_write_text(Path(run_dir) / FINGERPRINT, json.dumps(fp, indent=1, default=str))


def read_fingerprint(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
