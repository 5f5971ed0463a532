"""The benchmark scripts' own logic (tables, plots, checkpoint comparison) on small
made-up inputs; the benchmarks themselves are run by hand, not by the tests."""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_table_and_plot(tmp_path):
    compare_methods = _load("compare_methods")
    result = {
        "eval": "first 8 windows", "calibration": "32 x 512", "device": "cpu",
        "rows": [
            {"method": "fp", "ppl": 20.0, "calibration_seconds": 0.0, "peak_rss_GiB": 1.0},
            {"method": "rtn", "ppl": 8000.0, "calibration_seconds": 3.0,
             "peak_rss_GiB": 1.5},
            {"method": "flatquant-rtn", "ppl": 28.0, "calibration_seconds": 100.0,
             "peak_gpu_GiB": 2.0, "peak_rss_GiB": 3.0},
        ],
    }
    text = compare_methods.table(result)
    assert "| rtn | 8000.00 | 400.00x | 3.0 s | 1.5 GiB RSS |" in text
    assert "| flatquant-rtn | 28.00 | 1.40x | 100.0 s | 2.0 GiB GPU |" in text
    compare_methods.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_comparison(tmp_path):
    compare_checkpoints = _load("compare_checkpoints")
    base = {
        "model.layers.0.q_proj.flatquant_input.left_trans": torch.eye(4),
        "model.layers.0.q_proj.flatquant_input.clip_ratio": torch.tensor([0.9]),
        "model.layers.0.q_proj.weight_packed": torch.tensor([1, 2, 3], dtype=torch.int32),
        "model.embed_tokens.weight": torch.ones(2, 2),
    }
    other = dict(base)
    other["model.layers.0.q_proj.flatquant_input.left_trans"] = torch.eye(4) * 1.25
    other["model.layers.0.q_proj.weight_packed"] = torch.tensor([1, 2, 4], dtype=torch.int32)
    for name, tensors in (("a", base), ("b", other)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    result = compare_checkpoints.compare(tmp_path / "a", tmp_path / "b")
    assert result["left_trans"]["max_abs_diff"] == 0.25
    assert result["clip_ratio"]["max_abs_diff"] == 0.0
    assert result["weight_packed"]["differing_words"] == 1
    assert "weight" not in result  # embeddings are not FlatQuant tensors
