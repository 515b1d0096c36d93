"""The README's main job (``nlcompile.cli demo``) and the side-by-side timing it reports."""
from __future__ import annotations

import re

from nlcompile.cli import main
from nlcompile.timing import interleaved_best


def test_demo_prints_the_rewrite_the_check_and_the_speedup(capsys):
    assert main(["demo", "--T", "100", "--B", "1", "--H", "2", "--D", "16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"0\s+delta\s+1\s+chunkwise", out), out
    assert "check against eager: max relative error" in out and "(OK)" in out
    assert re.search(r"speedup \d+\.\dx \(best of interleaved rounds", out), out


def test_demo_on_a_kda_model_and_list(capsys):
    assert main(["demo", "--model", "kda_fla", "--T", "40", "--B", "1", "--H", "2", "--D", "16"]) == 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"0\s+gated_delta\s+1\s+chunkwise", out), out
    assert "kda_matmul_bthd" in out and "triton" in out


def test_interleaved_best_alternates_the_calls_and_keeps_each_minimum():
    calls = []
    best = interleaved_best({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, {"a": 2, "b": 3})
    assert calls == ["a", "b", "a", "b", "b"]
    assert set(best) == {"a", "b"} and all(0 <= t < 1 for t in best.values())


def test_interleaved_best_warm_times_the_second_of_two_calls():
    calls = []
    interleaved_best({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, {"a": 1, "b": 2}, warm=True)
    assert calls == ["a", "a", "b", "b", "b", "b"]
