"""Peak memory of the distillation loss on a language model's vocabulary-sized logits: chunked (the default,
`lightning_compress.core.losses.CHUNK` values at a time, each chunk recomputed in the backward pass) against the same
loss in one piece. Logits (batch 4, 512 tokens, GPT-2's vocabulary 50257) in bf16, student and teacher, forward and
backward on the CPU; each variant in a fresh process, its peak resident memory (`ru_maxrss`) above what it held once
the logits were allocated, the student's gradient included (every loss makes that one); 3 processes each. The children
run with `MALLOC_MMAP_THRESHOLD_=1048576`, so that glibc maps every large tensor and unmaps it when freed: the resident
memory is then the live memory (with glibc's adaptive threshold, freed chunks stay resident and the figure measures
the allocator, not the loss).

    python benchmarks/kd_memory.py      # writes the `kd_memory` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import machine, update_results

SHAPE = (4, 512, 50257)


def child(chunked: bool) -> None:
    from lightning_compress.core import losses

    if not chunked:
        losses.CHUNK = 1 << 62
    torch.manual_seed(0)
    student = torch.randn(SHAPE, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(SHAPE, dtype=torch.bfloat16)
    mask = torch.ones(SHAPE[:-1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = losses.kd_loss(student, teacher, 2.0, mask)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, seconds, float(loss))


def main() -> None:
    if len(sys.argv) > 1:
        child(sys.argv[1] == "chunked")
        return
    logits = torch.Size(SHAPE).numel() * 2
    rows = []
    for label, variant in (("chunked (default)", "chunked"), ("one piece", "whole")):
        runs = []
        for _ in range(3):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            out = subprocess.run(
                [sys.executable, __file__, variant], capture_output=True, text=True, check=True, env=env
            )
            extra, seconds, loss = map(float, out.stdout.split())
            runs.append((extra, seconds, loss))
        extra = statistics.median(r[0] for r in runs)
        rows.append(
            f"| {label} | {extra / 2**20:.0f} MiB ({extra / logits:.2f}× the bf16 logits) | "
            f"{statistics.median(r[1] for r in runs) * 1e3:.0f} ms | {runs[0][2]:.6f} |"
        )
        print(rows[-1], flush=True)
    update_results(
        "kd_memory",
        f"""## Distillation of vocabulary-sized logits: memory

`python benchmarks/kd_memory.py` — `kd_loss` forward and backward on bf16 logits of shape {SHAPE} (a batch of 512-token
sequences over GPT-2's vocabulary: {logits / 2**20:.0f} MiB each, student and teacher), on the CPU, each variant in 3
fresh processes: the peak resident memory above what the process held with the logits allocated
(median; the gradient, one copy of the logits, included), and the time. Resident memory is live memory here: the
children map every tensor above 1 MiB (`MALLOC_MMAP_THRESHOLD_=1048576`). Goal: no more than one copy of the logits
beyond the gradient. Machine: {machine()}.

| loss | peak memory above the logits (gradient included) | forward + backward | loss |
|---|---:|---:|---:|
"""
        + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
