"""Channel groups at the ResNet-20's own input size, and the accuracy cost of keeping channels in multiples of 8.

The ResNet-20-style network (width 16) on the digits upscaled to 32×32 (bilinear; `recipe=dense model=resnet20`:
AdamW, 30 epochs), 3 seeds. At the 2x and 3x FLOPs goals of `channel_groups.py` (the smallest share whose compact
network has at most 1/2 or 1/3 of the dense FLOPs, found once per variant): ours unrounded, ours with `round_to=8`
(each group keeps a multiple of 8 channels: the form that ran fastest in ONNX Runtime; its share found the same way),
and Torch-Pruning's `MetaPruner` at the FLOPs ours reached unrounded (same L2 group importance, 20 dense epochs then 10
of fine-tuning, as in `channel_groups.py`). Width 64 is not trained here: one 30-epoch run takes about 20 minutes on
these 2 cores (16x the FLOPs of width 16).

    python benchmarks/channel_groups_32.py    # writes the `channel_groups_32` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, update_results
from channel_groups import GOALS, peer_share_for, share_for, table_rows

from lightning_compress.tasks import ResNet20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    inputs = {"resnet20_32": (lambda: ResNet20((1, 32, 32), 10, width=16), torch.randn(16, 1, 32, 32))}
    rows, notes = [], []
    for name, (make, x) in inputs.items():
        shares = {goal: share_for(make, x, goal) for goal in GOALS}
        rounded = {goal: share_for(make, x, goal, round_to=8) for goal in GOALS}
        peer = {goal: peer_share_for(make, x, ratio) for goal, (_, ratio) in shares.items()}
        notes.append(f"Shares of channels: {({g: s for g, (s, _) in shares.items()})}, with round_to=8 "
                     f"{({g: s for g, (s, _) in rounded.items()})}, MetaPruner {peer}")  # fmt: skip
        variants: dict[str, tuple] = {"dense": ("dense", None)}
        for goal in GOALS:
            variants[f"ours, {goal}x"] = ("ours", shares[goal][0])
            variants[f"ours, {goal}x, round_to=8"] = ("ours", rounded[goal][0], 8)
            variants[f"Torch-Pruning MetaPruner, {goal}x"] = ("Torch-Pruning MetaPruner", peer[goal])
        rows += table_rows(name, x, args.seeds, variants)
    minutes = (time.perf_counter() - start) / 60
    body = f"""## Channel groups at 32×32 and the accuracy cost of `round_to=8`

`python benchmarks/channel_groups_32.py` — seeds 0–{args.seeds - 1}, test accuracy % (mean ± std; "vs dense" with
Welch's t-test over the seeds); FLOPs of the compact network (`export_compact`). The ResNet-20-style network of width
16 on the digits upscaled to 32×32 (`recipe=dense model=resnet20`, 30 epochs); ours ramps the share of channels over
epochs 0–20 (`scope="layer"`), unrounded and with `round_to=8`; Torch-Pruning's `MetaPruner` as in
`channel_groups.py`. {"; ".join(notes)}. {minutes:.0f} min. {machine()}.

| task | model | accuracy | vs dense | FLOPs reduction |
|---|---|---:|---|---:|
""" + "\n".join(rows)
    update_results("channel_groups_32", body)


if __name__ == "__main__":
    main()
