"""`scratchgpt generate` on an export folder, and text streaming that never cuts a character in half."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import EOT, build_tiny_tokenizer, random_model
from tokenizers import Tokenizer

from pipeline.cli import main
from training.export import export_hf
from training.sampling import generate_text, stream_text

UNICODE_TEXT = ["naïve café, smörgåsbord and crème brûlée 🙂 — déjà vu. " * 3] * 10


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer", UNICODE_TEXT)
    model = random_model("learned")
    return export_hf(model.state_dict(), model.config, tokenizer_dir, root / "workdir" / "pretrain" / "export")


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_cli_output_is_prompt_plus_model_continuation(capsys, export_dir):
    from training.export import load_gpt

    code, out, err = run_generate(
        capsys, "--model", str(export_dir), "--prompt", "café", "--max-new-tokens", "25", "--temperature", "0"
    )
    assert code == 0, err
    model, _ = load_gpt(export_dir)
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    ids = torch.tensor([tok.encode("café").ids])
    new = model.generate(ids, 25, temperature=0, eos_id=tok.token_to_id(EOT))[0, ids.size(1) :].tolist()
    expected = tok.decode([t for t in new if t != tok.token_to_id(EOT)])
    assert out == "café" + expected + "\n"
    assert len(expected) > 0


def test_seed_reproduces_and_is_reported(capsys, export_dir):
    args = ["--model", str(export_dir), "--prompt", "the", "--max-new-tokens", "30", "--top-k", "50", "--top-p", "0.95"]
    _, first, err = run_generate(capsys, *args, "--seed", "11")
    _, again, _ = run_generate(capsys, *args, "--seed", "11")
    assert "seed 11" in err
    assert first == again
    _, other, err = run_generate(capsys, *args, "--temperature", "1.5")
    seed = err.split("seed ")[1].split(",")[0]
    _, replay, _ = run_generate(capsys, *args, "--temperature", "1.5", "--seed", seed)
    assert replay == other


def test_workdir_is_enough_and_bad_paths_are_named(capsys, export_dir, tmp_path):
    workdir = export_dir.parent.parent
    code, out, _ = run_generate(capsys, "--model", str(workdir), "--prompt", "a", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("a")
    code, _, err = run_generate(capsys, "--model", str(tmp_path / "nothing"), "--prompt", "a")
    assert code == 2 and "nothing does not exist" in err
    code, _, err = run_generate(capsys, "--model", str(tmp_path), "--prompt", "a")
    assert code == 2 and "found neither an export" in err
    code, _, err = run_generate(capsys, "--model", str(export_dir), "--top-p", "2")
    assert code == 2 and "top_p" in err


def test_export_without_tokenizer_asks_for_one(capsys, tmp_path, export_dir):
    model = random_model("learned")
    bare = export_hf(model.state_dict(), model.config, None, tmp_path / "bare")
    code, _, err = run_generate(capsys, "--model", str(bare), "--prompt", "a")
    assert code == 2 and "tokenizer.json not found" in err
    code, out, _ = run_generate(capsys, "--model", str(bare), "--prompt", "a", "--max-new-tokens", "2",
                                "--tokenizer", str(export_dir))
    assert code == 0 and out.startswith("a")


def test_stream_pieces_join_to_the_decoded_tokens_and_hold_back_partial_characters(export_dir):
    from training.export import load_gpt

    model, _ = load_gpt(export_dir)
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    for seed in range(4):
        pieces = list(stream_text(model, tok, "", 40, temperature=1.5, generator=torch.Generator().manual_seed(seed),
                                  start_id=tok.token_to_id(EOT)))
        again = model.generate(torch.tensor([[tok.token_to_id(EOT)]]), 40, temperature=1.5,
                               generator=torch.Generator().manual_seed(seed))[0, 1:].tolist()
        assert "".join(pieces) == tok.decode(again)
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])
    assert generate_text(model, tok, "crème", 5, temperature=0) == tok.decode(
        model.generate(torch.tensor([tok.encode("crème").ids]), 5, temperature=0)[0, len(tok.encode("crème").ids):]
        .tolist()
    )


def test_help_lists_generate_without_importing_torch():
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported at --help'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "--top-p" in out.stdout and "--max-new-tokens" in out.stdout


class ScriptedModel:
    """Stands in for the GPT to yield chosen token ids, so the split of a character over tokens is certain."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def generate_stream(self, idx, max_new_tokens, *args):
        for token in self.ids[:max_new_tokens]:
            yield torch.tensor([token])


def test_a_character_split_over_two_tokens_comes_out_whole(export_dir):
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    first, second = tok.token_to_id("Ã"), tok.token_to_id("©")  # the UTF-8 bytes C3 A9 of "é", one token each
    space_a = tok.encode(" a").ids
    pieces = list(stream_text(ScriptedModel(space_a + [first, second] + space_a), tok, "x", 10))
    # One piece per token, except that the first half of "é" waits for the second.
    assert len(pieces) == 2 * len(space_a) + 1
    assert "".join(pieces) == " aé a" and "é" in pieces
    assert not any("\ufffd" in p for p in pieces)
    eos = tok.token_to_id(EOT)
    cut = list(stream_text(ScriptedModel(space_a + [first, eos]), tok, "x", 10, eos_id=eos))
    assert "".join(cut) == " a\ufffd"  # a half character at the end still shows, as the replacement mark


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(capsys, export_dir):
    code, _, err = run_generate(capsys, "--model", str(export_dir), "--prompt", "a", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_a_device_generate_cannot_use_is_one_line(capsys, export_dir, device):
    code, out, err = run_generate(capsys, "--model", str(export_dir), "--prompt", "a", "--device", device)
    assert code == 2 and out == ""
    assert err == f"scratchgpt generate: --device {device!r}: use cpu, cuda, cuda:N or mps\n"


def test_cpu_device_is_accepted(capsys, export_dir):
    code, out, err = run_generate(capsys, "--model", str(export_dir), "--prompt", "a", "--max-new-tokens", "2",
                                  "--device", "cpu")
    assert code == 0 and out.startswith("a"), err
