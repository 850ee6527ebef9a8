"""Checkpointable WebDataset loaders per modality (image, video; audio plugs in through `register_modality`).

Batch b of rank r is a pure function of (seed, rank, world, b): the rank's sample stream is a sequence of
chunks, chunk k holding `shards_per_chunk` shards drawn with replacement (resampled=True, like webdataset's
ResampledShards) or taken from a seeded per-epoch shard permutation split across ranks (resampled=False), its
samples in a seeded random order; batch b is stream positions [b*B, (b+1)*B). DataLoader worker w of W makes
batches start+w, start+w+W, ... so the in-order DataLoader yields them in order, and the only state a trainer
needs to checkpoint is the next batch index: a resumed run sees exactly the same batches, for any worker count.
Own reader, not webdataset's pipeline: its shuffle buffers cannot be checkpointed; we index each tar once
(member offsets, via tarfile headers) and read members by seeking (the approach of webdataset's `wids`).
Bad samples are skipped (a batch keeps its good samples) and counted by reason in `Loader.skipped`.
"""
from __future__ import annotations

import abc
import os
import random
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.decode import CAPS, MediaCaps, decode_image_sample, decode_video_sample, set_media_caps
from data.shards import MAX_MEMBER_BYTES, BadSample, SkipCounter, expand_shards, safe_members

MODALITIES: dict[str, Callable[..., dict]] = {}


def register_modality(name: str, decode: Callable[..., dict]) -> None:
    """Register `decode(raw_sample, **opts) -> dict` (raising BadSample) as modality `name`.

    Arrays in the returned dict are stacked into tensors by `collate`; strings and dicts become lists.
    """
    MODALITIES[name] = decode


def _image(sample: dict, image_size: int | None = 64, **_) -> dict:
    d = decode_image_sample(sample, size=image_size)
    return {"key": d["key"], "image": np.ascontiguousarray(d["image"].transpose(2, 0, 1)),  # (3, H, W) uint8
            "caption": d["caption"], "meta": d["meta"]}


def _video(sample: dict, num_frames: int = 8, image_size: int | None = 64, backend: str = "auto", **_) -> dict:
    d = decode_video_sample(sample, num_frames, image_size, backend)
    return {"key": d["key"], "frames": np.ascontiguousarray(d["frames"].transpose(0, 3, 1, 2)),  # (T, 3, H, W)
            "caption": d["caption"], "meta": d["meta"]}


def _audio(sample: dict, **opts) -> dict:
    """Modality "audio": data.audio.decode_audio_sample(sample) (the speech helper's decoder), imported lazily."""
    from data.audio import decode_audio_sample

    return decode_audio_sample(sample)


register_modality("image", _image)
register_modality("video", _video)
register_modality("audio", _audio)


def collate(items: list[dict]) -> dict:
    """Stack equal-shape arrays/numbers into tensors (dim 0 = batch); everything else becomes a list."""
    out: dict = {}
    for k in (items[0] if items else {}):
        vals = [it[k] for it in items]
        if all(isinstance(v, np.ndarray) for v in vals) and len({v.shape for v in vals}) == 1:
            out[k] = torch.from_numpy(np.stack(vals))
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def index_tar(path: Path, skips: SkipCounter, max_member_bytes: int = MAX_MEMBER_BYTES) -> list[dict]:
    """Scan a tar's headers: [{"key", "members": {ext: (offset, size)}}], unsafe members skipped and counted;
    a broken tar keeps the samples before the break (its last, maybe incomplete, group is dropped)."""
    samples: list[dict] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m, key, ext in safe_members(tar, skips, max_member_bytes):
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "members": {}})
                if ext in samples[-1]["members"]:
                    skips.add("duplicate_member")
                    continue
                samples[-1]["members"][ext] = (m.offset_data, m.size)
            if os.path.getsize(path) < max((o + s for smp in samples for o, s in smp["members"].values()), default=0):
                raise tarfile.ReadError("member data past the end of the file")
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        skips.add("bad_tar")
        samples = samples[:-1]
    return samples


class ShardStream(torch.utils.data.IterableDataset):
    """Yields collated batches start_batch + w, + W, ... for DataLoader worker w of W (see the module doc)."""

    def __init__(self, spec, modality: str, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 resampled: bool = True, shards_per_chunk: int = 2, decode_opts: dict | None = None) -> None:
        if modality not in MODALITIES:
            raise KeyError(f"unknown modality {modality!r}; registered: {sorted(MODALITIES)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.paths = expand_shards(spec)
        self.modality, self.batch_size, self.seed = modality, int(batch_size), int(seed)
        self.rank, self.world, self.resampled = int(rank), int(world), bool(resampled)
        self.shards_per_chunk, self.decode_opts = int(shards_per_chunk), dict(decode_opts or {})
        self.index_skips = SkipCounter()
        self.index = [index_tar(p, self.index_skips) for p in self.paths]
        self.usable = [i for i, smp in enumerate(self.index) if smp]
        if not self.usable:
            raise ValueError(f"no readable samples in {spec!r} (skips: {self.index_skips.as_dict()})")
        if not self.resampled and len(self.usable) < self.world:
            raise ValueError(f"{len(self.usable)} shards cannot be split over {self.world} ranks without resampled")
        self.start_batch = 0
        self._chunks: list[tuple[int, list]] = []  # (stream start position, [(shard, sample)]) per chunk
        self._files: dict = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_chunks"] = {}, []
        state["_caps"] = MediaCaps(**vars(CAPS))  # a spawned worker decodes under the caps of its parent
        return state

    def __setstate__(self, state: dict) -> None:
        caps = state.pop("_caps", None)
        self.__dict__.update(state)
        if caps is not None:
            set_media_caps(caps)

    def _chunk_shards(self, k: int) -> list[int]:
        if self.resampled:
            rng = random.Random(f"{self.seed}:{self.rank}:{k}")
            return [rng.choice(self.usable) for _ in range(self.shards_per_chunk)]
        mine_per_epoch = len(self.usable[self.rank::self.world])
        per_epoch = -(-mine_per_epoch // self.shards_per_chunk)
        epoch, j = divmod(k, per_epoch)
        perm = list(self.usable)
        random.Random(f"{self.seed}:epoch{epoch}").shuffle(perm)
        mine = perm[self.rank::self.world][:mine_per_epoch]
        return mine[j * self.shards_per_chunk:(j + 1) * self.shards_per_chunk]

    def _chunk(self, k: int) -> tuple[int, list]:
        while len(self._chunks) <= k:
            n = len(self._chunks)
            start = self._chunks[-1][0] + len(self._chunks[-1][1]) if self._chunks else 0
            order = [(s, j) for s in self._chunk_shards(n) for j in range(len(self.index[s]))]
            random.Random(f"{self.seed}:{self.rank}:{n}:order").shuffle(order)
            self._chunks.append((start, order))
        return self._chunks[k]

    def positions(self, b: int) -> list[tuple[int, int]]:
        """The (shard, sample) pairs of batch b: stream positions [b*B, (b+1)*B)."""
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        out, k = [], 0
        while True:
            start, order = self._chunk(k)
            if start >= hi:
                return out
            if start + len(order) > lo:
                out.extend(order[max(0, lo - start):hi - start])
            k += 1

    def read(self, shard: int, j: int) -> dict:
        """The raw members of sample j of a shard: {"__key__", "__url__", ext: bytes}."""
        path = self.paths[shard]
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 16:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open(path, "rb")
        entry = self.index[shard][j]
        sample = {"__key__": entry["key"], "__url__": str(path)}
        for ext, (offset, size) in entry["members"].items():
            f.seek(offset)
            sample[ext] = f.read(size)
            if len(sample[ext]) != size:
                raise BadSample("short_read", f"{path}:{entry['key']}.{ext}")
        return sample

    def make_batch(self, b: int) -> dict:
        """Decode and collate batch b; {"__batch__": b, "__skips__": {reason: n}, "size": n_good, ...fields}."""
        decode = MODALITIES[self.modality]
        items, skips = [], Counter()
        for shard, j in self.positions(b):
            try:
                items.append(decode(self.read(shard, j), **self.decode_opts))
            except BadSample as e:
                skips[e.reason] += 1
        return {**collate(items), "size": len(items), "__batch__": b, "__skips__": dict(skips)}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start_batch + w
        while True:
            yield self.make_batch(b)
            b += nw


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_image_samples(spec: str, image_size: int, max_samples: int = 0, seed: int = 0) -> tuple[list[dict], dict]:
    """Every decodable image-text sample of the shards in order ({image (3, H, W) uint8, caption, meta}), or a seeded
    subset of max_samples; returns (samples, skip counts)."""
    stream = ShardStream(spec, "image", 1, decode_opts={"image_size": image_size})
    where = [(s, j) for s in range(len(stream.index)) for j in range(len(stream.index[s]))]
    if 0 < max_samples < len(where):
        where = sorted(random.Random(seed).sample(where, max_samples))
    skips, out = SkipCounter(), []
    for s, j in where:
        try:
            out.append(MODALITIES["image"](stream.read(s, j), image_size=image_size))
        except BadSample as e:
            skips.add(e.reason)
    return out, {**stream.index_skips.as_dict(), **skips.as_dict()}


class Loader:
    """An infinite, resumable batch iterator over shards of one modality (torch DataLoader workers inside).

    `state_dict()` / `load_state_dict()` hold the next batch index (plus what must match to resume);
    `skipped` gives skip counts by reason (index-time and decode-time, summed over workers).
    decode_opts go to the modality decoder: image_size; video also num_frames, backend.
    """

    def __init__(self, spec, modality: str, batch_size: int, num_workers: int = 0, seed: int = 0,
                 rank: int | None = None, world: int | None = None, resampled: bool = True,
                 shards_per_chunk: int = 2, **decode_opts) -> None:
        r, ws = _dist_rank_world()
        self.stream = ShardStream(spec, modality, batch_size, seed, r if rank is None else rank,
                                  ws if world is None else world, resampled, shards_per_chunk, decode_opts)
        self.num_workers = int(num_workers)
        self.next_batch = 0
        self._skips = Counter()

    def __iter__(self):
        self.stream.start_batch = self.next_batch
        dl = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                         in_order=True, prefetch_factor=2 if self.num_workers else None)
        for batch in dl:
            self.next_batch = batch.pop("__batch__") + 1
            self._skips.update(batch.pop("__skips__"))
            yield batch

    def batches(self, n: int):
        """The next n batches (a finite iterator; workers shut down after it)."""
        it = iter(self)
        try:
            for _ in range(n):
                yield next(it)
        finally:
            it.close()

    @property
    def skipped(self) -> dict:
        """{reason: count} of skipped members, tars and samples so far."""
        return dict(sorted((Counter(self.stream.index_skips.counts) + self._skips).items()))

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this loader exactly."""
        s = self.stream
        return {"next_batch": self.next_batch, "seed": s.seed, "rank": s.rank, "world": s.world,
                "batch_size": s.batch_size, "modality": s.modality, "resampled": s.resampled,
                "shards_per_chunk": s.shards_per_chunk, "shards": [Path(p).name for p in s.paths]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["next_batch"]; the stream-defining fields must match (else ValueError)."""
        mine = self.state_dict()
        bad = [k for k in mine if k != "next_batch" and k in state and state[k] != mine[k]]
        if bad:
            raise ValueError(f"loader state does not match this loader in {bad}: "
                             f"{ {k: (state[k], mine[k]) for k in bad} }")
        self.next_batch = int(state["next_batch"])


class StepFeed(abc.ABC):
    """Micro-batches for training step s = loader batches [s*accum, (s+1)*accum), each made into a model batch by
    `make(index, batch)`; one loader iterator stays open while steps are consecutive and is reopened at the right
    index otherwise (first step, resume), so the feed is a pure function of the step like the loader."""

    def __init__(self, loader: Loader, accum: int):
        self.loader, self.accum, self.it = loader, accum, None

    @abc.abstractmethod
    def make(self, index: int, batch: dict) -> dict:
        """Turn loader batch number `index` into one micro-batch for the model."""

    def __call__(self, step: int) -> list[dict]:
        start = step * self.accum
        if self.it is None or self.loader.next_batch != start:
            self.close()
            self.loader.load_state_dict({"next_batch": start})
            self.it = iter(self.loader)
        return [self.make(start + i, self._nonempty(next(self.it))) for i in range(self.accum)]

    def _nonempty(self, batch: dict) -> dict:
        if batch["size"] == 0:  # every sample skipped (e.g. all over a media cap): one line, not a KeyError later
            raise ValueError(f"{self.loader.stream.paths[0].parent}: no sample of batch {self.loader.next_batch - 1} "
                             f"decodes (skipped so far: {self.loader.skipped}); check the shards (mm data inspect) "
                             f"and the media caps")
        return batch

    def close(self) -> None:
        """Shut the loader iterator (and its workers) down."""
        if self.it is not None:
            self.it.close()
            self.it = None
