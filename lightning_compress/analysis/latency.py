"""Measured ONNX Runtime latency of an exported model on the machine that runs the job.

:func:`onnx_latency` times one ``.onnx`` file in ONNX Runtime (CPU, all graph optimisations, a fixed number of
intra-op threads): the median time of one sample (batch 1) and the samples per second of a throughput batch, each
over several rounds whose spread is reported beside the median, so that a figure from a shared, noisy machine comes
with its noise. The app writes them into every report (``latency_ms_batch1``, ``throughput_per_s``) and a sweep can
minimise the latency (``objective=accuracy_and_latency``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from lightning_compress.core.checks import check_number


def ort_session(path: str | os.PathLike, threads: int, optimized_path: str | os.PathLike | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads (one inter-op);
    ``optimized_path``: where ONNX Runtime writes the graph it optimised (to see which kernels it runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _round_times(session: Any, x: np.ndarray, min_seconds: float) -> list[float]:
    """Seconds per call over one round: calls repeated until ``min_seconds`` have passed (at least 3)."""
    name = session.get_inputs()[0].name
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - begin < min_seconds:
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return times


def onnx_latency(
    path: str | os.PathLike,
    example_input: torch.Tensor,
    threads: int = 2,
    throughput_batch: int = 256,
    rounds: int = 3,
    min_seconds: float = 0.2,
) -> dict[str, Any]:
    """ONNX Runtime latency of the model in ``path`` on inputs shaped like ``example_input`` (values from it,
    repeated to fill the batch).

    Returns:
        ``latency_ms_batch1`` (median milliseconds per single sample), ``latency_ms_batch1_range`` (the lowest and
        the highest round median), ``throughput_per_s`` (samples per second at ``throughput_batch``, median over the
        rounds) with its ``throughput_per_s_range``, and the settings (``latency_threads``, ``throughput_batch``).

    Raises:
        ValueError: A setting out of range (named).
    """
    threads = int(check_number("threads", threads, 1, integer=True))
    throughput_batch = int(check_number("throughput_batch", throughput_batch, 1, integer=True))
    rounds = int(check_number("rounds", rounds, 1, integer=True))
    session = ort_session(path, threads)
    sample = example_input.detach().cpu().float().numpy()
    one = sample[:1]
    batch = np.resize(sample, (throughput_batch, *sample.shape[1:])).astype(np.float32)
    single: list[float] = []
    many: list[float] = []
    for x in (one, batch):  # warm-up: the first calls allocate
        session.run(None, {session.get_inputs()[0].name: x})
    for _ in range(rounds):  # interleaved: both figures see the same machine load
        single.append(statistics.median(_round_times(session, one, min_seconds)))
        many.append(throughput_batch / statistics.median(_round_times(session, batch, min_seconds)))
    return {
        "latency_ms_batch1": 1e3 * statistics.median(single),
        "latency_ms_batch1_range": [1e3 * min(single), 1e3 * max(single)],
        "throughput_per_s": statistics.median(many),
        "throughput_per_s_range": [min(many), max(many)],
        "latency_threads": threads,
        "throughput_batch": throughput_batch,
    }
