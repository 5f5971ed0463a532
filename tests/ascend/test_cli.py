"""flatquant-export-ascend: compressed-tensors checkpoint in, Ascend checkpoint out;
bad paths and interrupted runs."""

from flatquant_modifier import FlatQuantModifier
from tests.conftest import load_tiny
from tests.helpers import (
    assert_same_function, exact_logits, log_messages, run, weight_quantizer,
)
from tests.test_loading import _saved


def test_console_script_converts_a_saved_checkpoint_to_ascend(tiny_llama_dir, tmp_path):
    from flatquant_modifier.ascend.cli import main

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


def test_the_export_cli_never_overwrites_its_source(tiny_llama_dir, tmp_path, capsys):
    import pytest

    from flatquant_modifier.ascend.cli import main

    saved = _saved(tiny_llama_dir, tmp_path)
    before = sorted(p.name for p in saved.iterdir())
    for target in (saved, saved / "ascend", tmp_path):
        with pytest.raises(SystemExit):
            main([str(saved), str(target), "--overwrite"])
        assert "the checkpoint the model was loaded from" in capsys.readouterr().err
    assert sorted(p.name for p in saved.iterdir()) == before


def test_the_export_cleans_up_after_killed_runs_and_uses_the_umask(tiny_llama_dir, tmp_path):
    import os

    from flatquant_modifier.ascend import save_ascend_checkpoint

    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    (tmp_path / f".ascend.tmp-{dead}-x1y2").mkdir()
    (tmp_path / f".ascend.tmp-{dead}-x1y2" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".ascend.old-{dead}").write_text("a file the killed run moved aside")
    (tmp_path / f".ascend.tmp-{os.getpid()}-live").mkdir()  # a running export: kept
    (tmp_path / ".ascend.tmp-k3j2x").mkdir()  # owner unknown: kept and reported
    with log_messages("INFO") as messages:
        out = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ascend."))
    assert left == [f".ascend.tmp-{os.getpid()}-live", ".ascend.tmp-k3j2x"]
    assert any("owner unknown" in m for m in messages)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
