"""compressed-tensors round trip: save_pretrained(save_compressed=True), load in a fresh
process with load_flatquant_model, same logits."""

import subprocess
import sys
import textwrap

import torch

from flatquant_modifier import FlatQuantModifier
from tests.conftest import load_tiny
from tests.test_modifier import logits, run, weight_quantizer


def test_compressed_checkpoint_loads_back_with_the_same_logits(tiny_llama_dir, tmp_path):
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()])
    torch.save(logits(model), tmp_path / "reference.pt")
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    code = textwrap.dedent(f"""
        import torch
        from flatquant_modifier import load_flatquant_model
        from tests.test_modifier import logits
        model = load_flatquant_model({str(tmp_path / "ct")!r})
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        print("MAXDIFF", (logits(model) - reference).abs().max().item())
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_root())
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("MAXDIFF")[-1])
    assert diff < 1e-5, diff


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_console_script_converts_a_saved_checkpoint_to_ascend(tiny_llama_dir, tmp_path):
    from flatquant_modifier.ascend.cli import main
    from tests.test_ascend_export import assert_same_function, exact_logits

    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    reference = exact_logits(model)
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    tok.save_pretrained(tmp_path / "ct")
    main([str(tmp_path / "ct"), str(tmp_path / "ascend")])
    assert (tmp_path / "ascend" / "tokenizer.json").exists()
    assert_same_function(tmp_path / "ascend", reference)


def test_a_missing_directory_is_named(tmp_path, capsys):
    import pytest

    from flatquant_modifier import load_flatquant_model
    from flatquant_modifier.ascend.cli import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), str(tmp_path / "ascend")])
    assert "nowhere: no such directory" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint directory"):
        load_flatquant_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        load_flatquant_model(tmp_path / "empty")
