"""Video decode throughput: decord vs PyAV on the same clips with the same uniform sampling (data.decode.decode_video:
the middle frame of each of N equal segments; decord seeks with get_batch, PyAV decodes the clip in order).

Each (backend, round) runs in a fresh subprocess, so "peak_rss_mb" is that backend's own peak resident set (imports
included: the shard reader pulls in torch; "base_rss_mb" is the RSS before the first decode, "decode_rss_mb" the
growth over it); rounds alternate between the backends and the best is
kept (a shared CPU slows some rounds). "frames_per_s" counts sampled frames returned. "max_abs_diff" compares the two
backends' frames of the first clips (same indices; both decode the same H.264 stream, so it should be 0).
    python benchmarks/speed_video.py [--shards SPEC] [--clips 200] [--frames 16 8] [--reps 3]
Prints ONE JSON line.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (whose data.py shadows data/)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

BACKENDS = ("decord", "pyav")


def clips(spec: str, n: int) -> list[bytes]:
    """The first n mp4 members of the shards (raw bytes, read by the safe tar walk)."""
    from data.shards import expand_shards, iter_samples

    out = []
    for sample in iter_samples(expand_shards(spec)):
        if "mp4" in sample:
            out.append(sample["mp4"])
        if len(out) >= n:
            break
    return out


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    """Decode every clip with one backend; seconds, frames and peak RSS of this process."""
    import numpy as np

    from data.decode import decode_video

    data = clips(args.shards, args.clips)
    base = rss_mb()
    t = time.perf_counter()
    n = 0
    for raw in data:
        n += len(decode_video(raw, args.n, backend=args.only)["frames"])
    dt = time.perf_counter() - t
    first = np.stack([decode_video(raw, args.n, backend=args.only)["frames"] for raw in data[:8]])
    np.save(args.dump, first)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"seconds": dt, "frames": n, "clips": len(data), "base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=".cache/shards/video/val-*.tar")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--frames", type=int, nargs="+", default=[16, 8], help="frames sampled per clip (one run each)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(worker(args)))
        return 0
    import tempfile

    import numpy as np

    out: dict = {"shards": args.shards, "clips": None, "reps": args.reps, "by_frames": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            best: dict[str, dict] = {}
            for _ in range(args.reps):
                for b in BACKENDS:
                    cmd = [sys.executable, __file__, "--only", b, "--n", str(n), "--shards", args.shards,
                           "--clips", str(args.clips), "--dump", f"{tmp}/{b}.npy"]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        print(f"error: {b} worker failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                        print(json.dumps({"ok": False, "error": f"{b} worker failed"}))
                        return 2
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    if b not in best or r["seconds"] < best[b]["seconds"]:
                        best[b] = r
            a, d = np.load(f"{tmp}/decord.npy"), np.load(f"{tmp}/pyav.npy")
            row = {b: {"frames_per_s": round(r["frames"] / r["seconds"], 1), "seconds": round(r["seconds"], 3),
                       "peak_rss_mb": r["peak_rss_mb"], "base_rss_mb": r["base_rss_mb"],
                       "decode_rss_mb": round(r["peak_rss_mb"] - r["base_rss_mb"], 1)} for b, r in best.items()}
            row["decord_vs_pyav"] = round(row["decord"]["frames_per_s"] / row["pyav"]["frames_per_s"], 3)
            row["max_abs_diff"] = int(np.abs(a.astype(int) - d.astype(int)).max()) if a.shape == d.shape else None
            out["by_frames"][str(n)] = row
            out["clips"] = best["decord"]["clips"]
    print(json.dumps({"ok": True, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
