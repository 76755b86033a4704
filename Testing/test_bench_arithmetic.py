"""``benchmarks/bench_arithmetic.py`` counts every network call of an image and its floating-point work.

The floor it prints (GFLOP per image / the machine's matrix-product rate) is only as good as the counting,
so this runs it on the tiny random architecture and checks the counts against what the algorithm does:
one UNet call per step and stage, two image encodes and decodes, one anatomy-controller encode and decode,
and FLOPs that scale with the steps. Timings are printed by the script, never asserted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_arithmetic  # noqa: E402


def table_rows(output: str, mode: str) -> dict:
    """{network: (calls, GFLOP)} from the table printed for ``mode`` ('exact' or 'fast')."""
    section = output.split(f"## {mode}:")[1].split("## ")[0]
    rows = {}
    for name, calls, gflop in re.findall(r"^\| ([\w.]+) \| (\d+) \| ([\d.]+) \|", section, flags=re.M):
        rows[name] = (int(calls), float(gflop))
    return rows


def run(capsys, steps: int) -> str:
    assert bench_arithmetic.main(["--preset", "tiny", "--steps", str(steps), "--repeats", "1", "--threads", "1"]) == 0
    return capsys.readouterr().out


def test_every_network_call_is_counted_once_per_step(capsys):
    output = run(capsys, steps=3)
    for mode in ("exact", "fast"):
        rows = table_rows(output, mode)
        assert rows["unet"][0] == 2 * 3  # anatomy stage + pathology stage (guidance batched: one call)
        assert rows["vae.encoder"][0] == rows["vae.decoder"][0] == 2
        assert rows["anatomy_controller.encoder"][0] == rows["anatomy_controller.decoder"][0] == 1
        assert all(gflop > 0 for name, (calls, gflop) in rows.items() if name != "text_encoder")
    floor = re.search(r"floor at the matrix-product rate: ([\d.]+) s \(([\d.]+) GFLOP / ([\d.]+) GFLOP/s\)", output)
    assert floor and float(floor.group(3)) > 0


def test_unet_work_scales_with_the_steps(capsys):
    three, six = (table_rows(run(capsys, steps), "exact")["unet"] for steps in (3, 6))
    assert six[0] == 2 * three[0]
    assert six[1] == pytest.approx(2 * three[1], rel=0.05)  # printed to 0.01 GFLOP


def test_the_benchmark_leaves_the_callers_autograd_and_threads_as_they_were(capsys):
    import torch

    threads = torch.get_num_threads()
    run(capsys, steps=2)
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
