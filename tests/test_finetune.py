"""Fine-tuning end to end on a slice of SST-2 with a tiny model: trains, evaluates, logs, exports, reloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import load_config
from pipeline.core.runner import run_stage
from training.classifier import load_classifier
from training.tasks import read_classification

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def _slice(src: Path, dst: Path, rows: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT exported with a BPE tokenizer trained on SST-2 text (stands in for pretraining)."""
    from dataprep.tokenizer import save_tokenizer, train_tokenizer
    from training.export import export_hf
    from training.model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("pretrained")
    texts = [e.text for e in read_classification(SST2 / "train.tsv", "sentence", "label")[:5000]]
    save_tokenizer(train_tokenizer(texts, vocab_size=512), root / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)
    export_hf(GPT(config).state_dict(), config, root / "tokenizer", root / "export")
    return root


def _config(tmp_path: Path, pretrained: Path, *extra: str, steps: int = 30):
    train = _slice(SST2 / "train.tsv", tmp_path / "train.tsv", 600)
    dev = _slice(SST2 / "dev.tsv", tmp_path / "dev.tsv", 120)
    task = {"name": "sst2", "kind": "classification", "train": str(train), "eval": str(dev),
            "text_key": "sentence", "eval_text_key": "content", "label_key": "label",
            "max_steps": steps, "micro_batch_size": 16, "lr": 3e-3, "eval_every": min(10, steps), "patience": 5,
            "pooling": "last"}  # GPT2ForSequenceClassification's own pooling: the export parity below
    return load_config(None, [f"workdir={tmp_path / 'work'}", f"finetune.init_from={pretrained / 'export'}",
                              f"finetune.tasks=[{json.dumps(task)}]", "train.precision=fp32", *extra])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, pretrained: Path) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("finetuned")
    return tmp_path, run_stage(_config(tmp_path, pretrained), "finetune", force=True)


def test_classification_trains_evaluates_logs_and_exports(finetuned: tuple[Path, dict]) -> None:
    tmp_path, summary = finetuned
    assert 0.0 <= summary["sst2"]["eval_accuracy"] <= 1.0
    out = tmp_path / "work" / "finetune" / "sst2"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [10, 20, 30]
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["labels"] == ["0", "1"] and sum(map(sum, confusion["matrix"])) == 120

    # MLflow: a finetune run with one child run per task holding the eval metrics by step.
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    parent = next(r for r in runs if r.data.tags["stage"] == "finetune")
    child = next(r for r in runs if r.data.tags["stage"] == "finetune/sst2")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    history = client.get_metric_history(child.info.run_id, "eval_accuracy")
    assert [m.step for m in history] == [10, 20, 30]
    assert max(m.value for m in history) == pytest.approx(summary["sst2"]["eval_accuracy"])

    # The saved classifier reloads with the same predictions, and transformers gives the same logits.
    model, labels, pad = load_classifier(out / "export")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "export" / "tokenizer.json"))
    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]
    rows = [e.ids for e in tok.encode_batch(texts)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    ours, _ = model(ids, lengths)
    from transformers import GPT2ForSequenceClassification

    hf = GPT2ForSequenceClassification.from_pretrained(out / "export", local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert hf.config.id2label == {0: "0", 1: "1"}


def test_accuracy_on_eval_matches_a_reloaded_model(finetuned: tuple[Path, dict]) -> None:
    """The accuracy the stage reports is what the exported classifier scores on the eval file."""
    tmp_path, summary = finetuned
    model, labels, pad = load_classifier(tmp_path / "work" / "finetune" / "sst2" / "export")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "work" / "finetune" / "sst2" / "export" / "tokenizer.json"))
    dev = read_classification(tmp_path / "dev.tsv", "content", "label")
    correct = 0
    with torch.no_grad():
        for e in dev:
            ids = tok.encode(e.text).ids[-64:]
            logits, _ = model(torch.tensor([ids]), torch.tensor([len(ids)]))
            correct += labels[int(logits.argmax())] == e.label
    assert correct / len(dev) == pytest.approx(summary["sst2"]["eval_accuracy"])


def test_from_scratch_writes_beside_the_pretrained_run(tmp_path: Path, pretrained: Path) -> None:
    from pipeline.core.runner import run_stage

    run_stage(_config(tmp_path, pretrained, steps=4), "finetune")
    scratch = _config(tmp_path, pretrained, "finetune.from_scratch=true", "model.n_layer=1", "model.n_embd=32",
                      "model.n_head=2", "model.block_size=64", steps=4)
    run_stage(scratch, "finetune")
    folder = tmp_path / "work" / "finetune"
    baseline, _, _ = load_classifier(folder / "sst2-scratch" / "export")
    assert baseline.gpt.config.n_layer == 1  # the configured shape, not the pretrained one
    pretrained_model, _, _ = load_classifier(folder / "sst2" / "export")  # still there beside it
    assert pretrained_model.gpt.config.n_layer == 2


def test_a_deleted_task_result_is_trained_again(tmp_path: Path, pretrained: Path) -> None:
    from pipeline.core.runner import run_stage

    cfg = _config(tmp_path, pretrained, steps=4)
    run_stage(cfg, "finetune")
    metrics = tmp_path / "work" / "finetune" / "sst2" / "metrics.json"
    metrics.unlink()
    assert run_stage(cfg, "finetune") is not None and metrics.is_file()  # ran again, not "complete, skipped"
    assert run_stage(cfg, "finetune") is None


def test_predict_cli_labels_lines_with_probabilities(finetuned: tuple[Path, dict], capsys) -> None:
    from pipeline.cli import main

    tmp_path, _ = finetuned
    texts = tmp_path / "texts.txt"
    texts.write_text("a gorgeous , witty , seductive movie .\n\nthe plot is nothing but clichés\n")
    assert main(["predict", "--model", str(tmp_path / "work" / "finetune" / "sst2" / "export"),
                 "--file", str(texts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # One row per input line, in order: the blank line keeps its place, labelled null.
    assert [r["text"] for r in rows] == ["a gorgeous , witty , seductive movie .", "",
                                         "the plot is nothing but clichés"]
    assert rows.pop(1) == {"text": "", "label": None, "probability": None, "probabilities": None}
    for r in rows:
        assert r["label"] in ("0", "1")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["probability"] == max(r["probabilities"].values())


def test_predict_text_output_keeps_a_row_per_input_line(finetuned: tuple[Path, dict], capsys) -> None:
    from pipeline.cli import main

    tmp_path, _ = finetuned
    texts = tmp_path / "aligned.txt"
    texts.write_text("a fine film\n   \n\nawful\n")
    for batch in ("1", "64"):
        assert main(["predict", "--model", str(tmp_path / "work" / "finetune" / "sst2" / "export"),
                     "--file", str(texts), "--batch-size", batch]) == 0
        out = capsys.readouterr().out.split("\n")
        assert len(out) == 5 and out[1] == out[2] == "" and out[4] == ""  # four rows, then the final newline
        assert out[0].endswith("\ta fine film") and out[3].endswith("\tawful")


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--file", "/nonexistent/in.txt"], "--file /nonexistent/in.txt: no such file"),
])
def test_predict_bad_options_are_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    from pipeline.cli import main

    (tmp_path / "in.txt").write_text("fine\n")
    assert main(["predict", "--model", str(tmp_path), "--file", str(tmp_path / "in.txt"), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"scratchgpt predict: {message}\n" and captured.out == ""


def test_rows_with_empty_text_are_skipped_counted_and_warned_once(tmp_path: Path, pretrained: Path) -> None:
    cfg = _config(tmp_path, pretrained, "finetune.seeds=2", steps=2)
    task = cfg.finetune.tasks[0]
    train, dev = Path(task.train), Path(task.eval)
    lines = train.read_text().splitlines(keepends=True)
    # SST-2's files hold the label first; rows 4 and 603 of train and 122 of dev have no text.
    train.write_text("".join([*lines[:3], "1\t\r\n", *lines[3:], "0\t   \r\n"]))
    dev.write_text(dev.read_text() + "1\t\n")
    summary = run_stage(cfg, "finetune", force=True)
    assert summary["warnings"] == [  # once for the task, though two seeds ran
        f"task sst2: 2 training row(s) with empty text skipped (the first at {train}:4)",
        f"task sst2: 1 eval row(s) with empty text skipped (the first at {dev}:122)",
    ]
    metrics = json.loads((tmp_path / "work" / "finetune" / "sst2" / "metrics.json").read_text())["summary"]
    assert (metrics["train_examples"], metrics["train_empty_skipped"]) == (600, 2)
    assert (metrics["eval_examples"], metrics["eval_empty_skipped"]) == (120, 1)


def test_sft_learns_responses_with_loss_on_response_tokens_only(tmp_path: Path, pretrained: Path) -> None:
    from tokenizers import Tokenizer

    from training.objectives import encode_sft
    from training.tasks import Example

    tok = Tokenizer.from_file(str(pretrained / "export" / "tokenizer.json"))
    enc = encode_sft(tok, [Example(prompt="Review: great film", text=" positive")], eot_id=0, block_size=64,
                     side="left")
    prompt_len = len(tok.encode("Review: great film").ids)
    response = tok.encode(" positive").ids + [0]
    assert enc.targets[0] == [-100] * (prompt_len - 1) + response  # target t is token t+1: loss only on the answer

    rows = [{"prompt": f"Review: {e.text}\nSentiment:", "response": " positive" if e.label == "1" else " negative"}
            for e in read_classification(SST2 / "dev.tsv", "content", "label")[:200]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    task = {"name": "sst2-sft", "kind": "sft", "train": str(tmp_path / "train.jsonl"),
            "eval": str(tmp_path / "eval.jsonl"), "max_steps": 40, "micro_batch_size": 16, "lr": 1e-2,
            "eval_every": 20, "patience": 5, "epochs": None}  # 40 steps (3 epochs of 160 would be 30)
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", f"finetune.init_from={pretrained / 'export'}",
                             f"finetune.tasks=[{json.dumps(task)}]", "train.precision=fp32"])
    summary = run_stage(cfg, "finetune", force=True)["sst2-sft"]
    history = json.loads((tmp_path / "work" / "finetune" / "sst2-sft" / "metrics.json").read_text())["history"]
    # The answers are one of two words then end-of-text: the loss on them falls from ln(512) = 6.2 nats to
    # below 1 (guessing the word at chance and the rest right is about 0.35 nats per token).
    assert history[-1]["eval_loss"] < 1.0 and history[-1]["eval_loss"] < history[0]["eval_loss"] < math.log(512)
    assert summary["eval_loss"] == min(h["eval_loss"] for h in history)
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tmp_path / "work" / "finetune" / "sst2-sft" / "export", local_files_only=True)


def test_predict_cuts_long_texts_on_the_side_the_task_used(finetuned: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from tokenizers import Tokenizer

    from pipeline.commands.predict import predict
    from training.classifier import LABELS_FILE

    source, _ = finetuned
    export = tmp_path / "export"
    shutil.copytree(source / "work" / "finetune" / "sst2" / "export", export)
    model, labels, _ = load_classifier(export)
    long_text = "a gorgeous , witty , seductive movie . " * 20 + "the plot is nothing but boilerplate clichés " * 20
    ids = Tokenizer.from_file(str(export / "tokenizer.json")).encode(long_text).ids
    assert len(ids) > 64  # the model's block_size
    info = json.loads((export / LABELS_FILE).read_text())
    seen = []
    for side, kept in (("left", ids[-64:]), ("right", ids[:64])):
        (export / LABELS_FILE).write_text(json.dumps({**info, "truncate": side}))
        got = predict(export, [long_text])[0]["probabilities"]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([kept]), torch.tensor([len(kept)]))[0], -1)[0]
        assert got == pytest.approx(dict(zip(labels, probs.tolist(), strict=True)), abs=1e-5)
        seen.append(got)
    assert seen[0] != seen[1]  # the two ends of the text really differ for the model


def test_predict_refuses_a_folder_that_is_not_a_classifier(tmp_path: Path, pretrained: Path, capsys) -> None:
    from pipeline.cli import main

    assert main(["predict", "--model", str(pretrained / "export"), "--file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("fine\n")
    assert main(["predict", "--model", str(pretrained / "export"), "--file", str(tmp_path / "t.txt")]) == 2
    assert "not a fine-tuned classifier export" in capsys.readouterr().err


def test_task_seed_sets_the_head_and_batch_order(tmp_path: Path, pretrained: Path) -> None:
    def head_after(seed: int | None, run: str) -> torch.Tensor:
        (tmp_path / run).mkdir()
        cfg = _config(tmp_path / run, pretrained, steps=2)
        if seed is not None:
            cfg.finetune.tasks[0] = cfg.finetune.tasks[0].model_copy(update={"seed": seed})
        run_stage(cfg, "finetune", force=True)
        model, _, _ = load_classifier(tmp_path / run / "work" / "finetune" / "sst2" / "export")
        return model.score.weight.detach()

    default = head_after(None, "default")
    assert torch.equal(head_after(1337, "same"), default)  # train.seed's default: the same run again
    assert not torch.equal(head_after(7, "other"), default)
