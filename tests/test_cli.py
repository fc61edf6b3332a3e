"""The `memact` entry point: a full disk, a read-only directory and Ctrl-C end with one clear
line and an exit status, not a traceback, and leave no half-written output (issue 21, item 7)."""

import errno

import pytest

from memact.cli import main


def _fail_tokenizer_save(monkeypatch, err):
    from transformers import PreTrainedTokenizerBase

    def save_pretrained(self, directory, *a, **kw):
        raise err(directory)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EROFS, "Read-only file system"),
                                        (errno.EACCES, "Permission denied")])
def test_new_model_on_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys,
                                                                             code, words):
    _fail_tokenizer_save(monkeypatch, lambda d: OSError(code, words, str(d)))
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as exit_:
        main(["new-model", "--out", str(out), "--vocab-size", "300"])
    message = str(exit_.value.code)
    assert message.startswith("error: memact new-model: ") and words in message and str(tmp_path) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a model with only config.json nor a staging dir


def test_ctrl_c_exits_130_with_a_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(directory, *a, **kw):
        raise KeyboardInterrupt

    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["new-model", "--out", str(tmp_path / "m"), "--vocab-size", "300"])
    assert exit_.value.code == 130
    assert "memact new-model: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_other_errors_keep_their_traceback(monkeypatch):
    """Only the user's environment gets the one-line treatment; a bug still shows where it is."""
    _fail_tokenizer_save(monkeypatch, lambda d: ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        main(["new-model", "--out", "/tmp/memact-test-never-written", "--vocab-size", "300"])
