"""Paper-shaped herds (experiments/paper/herd_*.yaml) built on the meta device: each part's parameter count against
PAPER.md (LM 8B/70B/405B; ViT-H image encoder ~850M; cross-attention ~0.22B x 8 blocks at 8B, ~17B at 70B, ~100B at
405B; video adapter 0.6B / 4.6B; speech Conformer ~1B; speech adapter ~90-100M)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mm.model.paper_shapes import count_herd, load_herd_shape

REPO = Path(__file__).resolve().parents[1]
# part -> (PAPER.md figure, relative tolerance); video / adapter sizes are the paper's totals around UNCONFIRMED shapes
TARGETS = {
    "8b": {"lm": (8.0e9, 0.01), "image_encoder": (850e6, 0.03), "image_adapter": (1.75e9, 0.03),
           "video_adapter": (0.6e9, 0.06), "speech_encoder": (1.0e9, 0.01), "speech_adapter": (95e6, 0.08)},
    "70b": {"lm": (70e9, 0.01), "image_adapter": (17.1e9, 0.03), "video_adapter": (4.6e9, 0.06)},
    "405b": {"lm": (405e9, 0.01), "image_adapter": (100e9, 0.03)},
}


@pytest.mark.parametrize("size", sorted(TARGETS))
def test_paper_herd_part_sizes(size):
    shape = load_herd_shape(str(REPO / "experiments" / "paper" / f"herd_{size}.yaml"))
    assert shape.lm == size and shape.launch.parallel == "fsdp"
    counts = count_herd(shape)
    for part, (target, tol) in TARGETS[size].items():
        assert abs(counts[part] / target - 1) <= tol, (size, part, counts[part], target)
    # cross-attention before every 4th LM layer; video before every 4th image block (8 -> 2, 20 -> 5)
    assert counts["image_blocks"] == {"8b": 8, "70b": 20, "405b": 32}[size]
    assert counts["video_blocks"] == {"8b": 2, "70b": 5, "405b": 8}[size]


def test_herd_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "herd.yaml"
    bad.write_text("lm: 8b\nvision: paper\nvideo: {widht: 3}\n")
    with pytest.raises(ValueError, match="herd.yaml: .*widht"):
        load_herd_shape(str(bad))
