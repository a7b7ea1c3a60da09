"""Export to a Hugging Face GPT-2 folder: the same logits and generations in transformers, offline; and back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from training.export import export_hf, load_gpt
from training.model import GPT, GPTConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads; from_pretrained also gets local_files_only
EOT = "<|endoftext|>"
TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat."


def build_tiny_tokenizer(out: Path, texts: list[str] | None = None, vocab_size: int = 300) -> Path:
    """A tiny byte-level BPE trained and saved by the tokenizer stage's own functions (files as in a real run)."""
    from dataprep.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(texts or [TEXT] * 20, vocab_size=vocab_size), out)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def random_model(position: str, vocab_size: int = 300) -> GPT:
    """Every weight random (not the init's zero biases and unit norms), so a misplaced tensor shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64, position=position))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def load_hf(folder: Path):
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_transformers_gives_the_same_logits_and_generation(tmp_path, tokenizer_dir, position):
    model = random_model(position)
    out = export_hf(model.state_dict(), model.config, tokenizer_dir, tmp_path / "export")
    hf = load_hf(out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as GPT-2
    idx = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    if position == "sinusoidal":
        torch.testing.assert_close(hf.transformer.wpe.weight, model.wpe.weight)

    prompt = idx[:1, :5]
    eos = hf.config.eos_token_id
    generated = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=eos, eos_token_id=None)
    assert torch.equal(generated, model.generate(prompt, 12, temperature=0))


def test_tokenizer_files_travel_and_load_offline(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, tokenizer_dir, tmp_path / "export")
    copied = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"}
    assert copied <= {p.name for p in out.iterdir()}
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert hf_tok("the cat met a dog").input_ids == ours.encode("the cat met a dog").ids
    config = json.loads((out / "config.json").read_text())
    eot = ours.token_to_id(EOT)
    assert hf_tok.eos_token_id == config["eos_token_id"] == config["bos_token_id"] == eot
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["n_positions"] == config["n_ctx"] == 32 and config["layer_norm_epsilon"] == 1e-5


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_load_gpt_round_trip(tmp_path, tokenizer_dir, position):
    model = random_model(position)
    out = export_hf(model.state_dict(), model.config, tokenizer_dir, tmp_path / "export")
    loaded, config = load_gpt(out)
    assert config == model.config
    assert loaded.lm_head.weight is loaded.wte.weight
    idx = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_engine_prefixes_are_stripped_and_a_missing_fixed_table_rebuilt(tmp_path):
    model = random_model("sinusoidal")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items() if k != "wpe.weight"}
    out = export_hf(wrapped, model.config, None, tmp_path / "export")
    assert not (out / "tokenizer.json").exists()
    loaded, _ = load_gpt(out)
    idx = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_export_refuses_state_dict_of_another_shape(tmp_path):
    model = random_model("learned")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("h.1.")}
    with pytest.raises(ValueError, match=r"missing \['h\.1\."):
        export_hf(state, model.config, None, tmp_path / "export")


def test_export_refuses_tokenizer_larger_than_model(tmp_path, tokenizer_dir):
    model = random_model("learned", vocab_size=50)
    with pytest.raises(ValueError, match="the model only 50"):
        export_hf(model.state_dict(), model.config, tokenizer_dir, tmp_path / "export")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_load_gpt_names_the_missing_file(tmp_path, missing):
    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "export")
    (out / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_gpt(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gpt(tmp_path / "nowhere")


def test_load_gpt_refuses_damaged_weights(tmp_path):
    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "export")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors could not be read"):
        load_gpt(out)


def test_bf16_export_loads_in_transformers(tmp_path):
    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "export", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load_hf(out)
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    loaded, _ = load_gpt(out)  # back to fp32, values rounded once
    torch.testing.assert_close(loaded.wte.weight, model.wte.weight.bfloat16().float())


def test_load_gpt_reads_a_folder_transformers_saved(tmp_path):
    """The reverse mapping and the config derived from GPT-2 fields alone (no scratchgpt key)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=120, n_positions=24, n_embd=48, n_layer=2, n_head=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    model, config = load_gpt(tmp_path / "hf")
    assert (config.vocab_size, config.block_size, config.n_embd, config.position) == (120, 24, 48, "learned")
    idx = torch.randint(0, 120, (2, 24))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_load_gpt_refuses_a_gpt2_variant_it_does_not_build(tmp_path):
    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "export")
    fields = json.loads((out / "config.json").read_text())
    del fields["scratchgpt"]
    fields["activation_function"] = "relu"
    (out / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        load_gpt(out)


def test_weights_of_another_shape_are_refused_naming_the_tensor(tmp_path):
    from training.export import gpt_from_state_dict

    model = random_model("learned")
    out = export_hf(model.state_dict(), model.config, None, tmp_path / "export")
    fields = json.loads((out / "config.json").read_text())
    fields["scratchgpt"]["n_embd"] = 32  # the config now disagrees with the weights
    (out / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"safetensors does not fit the model config: .*c_attn.bias \(192,\) \(config"):
        load_gpt(out)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    rebuilt = gpt_from_state_dict(state, model.config, where="checkpoint X")
    torch.testing.assert_close(rebuilt.wte.weight, model.wte.weight)
    del state["module.ln_f.bias"]
    with pytest.raises(ValueError, match=r"checkpoint X does not fit the model config: missing \['ln_f.bias'\]"):
        gpt_from_state_dict(state, model.config, where="checkpoint X")


def test_export_out_that_is_a_file_or_a_foreign_folder_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    ckpts = tmp_path / "work" / "pretrain" / "checkpoints"  # refused before the checkpoint is read
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    for out, why in (("file", "is a file, not a folder"), ("notes", "is a folder holding other files")):
        assert main(["export", str(ckpts), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"scratchgpt export: --out {tmp_path / out} {why}") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]  # nothing mixed in


def test_export_out_may_be_new_empty_or_an_earlier_export(tmp_path, tokenizer_dir):
    from pipeline.commands.export import check_out_folder

    model = random_model("learned")
    earlier = export_hf(model.state_dict(), model.config, tokenizer_dir, tmp_path / "earlier")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", earlier):
        check_out_folder(out)  # no error
