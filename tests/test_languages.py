"""prep.language: one code sets the language filter, word tokenizer, stop words, punctuation and thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataprep.languages import effective_filters, resolve_language
from dataprep.prep import outcome_warnings
from pipeline.config import ConfigError, load_config


@pytest.mark.parametrize("code", ["zh", "zho", "cmn", "cmn_Hani"])
def test_every_chinese_code_means_jieba(code: str) -> None:
    # datatrove's own "zh" is spaCy's multi-language tokenizer and "zho" whitespace: both keep a sentence whole
    assert resolve_language(code).tokenizer == "cmn_Hani"
    assert resolve_language(code).lid_label == "zh"


def test_configured_filters_and_minhash_split_chinese_into_jieba_words(tmp_path: Path) -> None:
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.text import split_into_words

    from dataprep.dedup import minhash_signature
    from dataprep.filters import filter_steps

    cfg = load_config(None, ["prep.language=zh"])
    steps = dict(filter_steps(cfg.prep.filters, tmp_path, cfg.prep.language))
    assert "c4_quality" not in steps  # FineWeb-2 runs no C4 filter outside English
    sentence = "均由网友提供并更新"
    words = ["均", "由", "网友", "提供", "并", "更新"]
    for key, cls in (("gopher_repetition", GopherRepetitionFilter), ("gopher_quality", GopherQualityFilter),
                     ("fineweb_quality", FineWebQualityFilter)):
        assert isinstance(steps[key], cls)
        assert split_into_words(sentence, steps[key].language) == words
    sig = minhash_signature(tmp_path, cfg.prep.dedup.minhash, cfg.prep.language)
    assert sig.word_tokenizer.word_tokenize(sentence) == words
    quality = steps["gopher_quality"]
    assert "的" in quality.stop_words and quality.min_avg_word_length == 1 and quality.max_avg_word_length == 5
    assert steps["fineweb_quality"].line_punct_thr == 0.106  # FineWeb-2's cmn_Hani figure
    assert all(c in steps["fineweb_quality"].stop_chars for c in "。！？．…")
    assert steps["language"].languages == ["zh"] and steps["language"].language_threshold == 0.692


def test_keys_the_user_sets_win_over_the_language() -> None:
    cfg = load_config(None, ["prep.language=zh", "prep.filters.fineweb_quality.line_punct_thr=0.3",
                             "prep.filters.c4_quality=true", "prep.filters.gopher_repetition=false"])
    params = effective_filters(cfg.prep.filters, cfg.prep.language)
    assert params["fineweb_quality"]["line_punct_thr"] == 0.3
    assert params["fineweb_quality"]["new_line_ratio"] == 0.178  # the rest still from the language
    assert params["c4_quality"] and params["c4_quality"]["language"] == "cmn_Hani"  # named: it runs
    assert params["gopher_repetition"] is False


def test_english_keeps_the_defaults() -> None:
    cfg = load_config(None, [])
    params = effective_filters(cfg.prep.filters, cfg.prep.language)
    assert params["language"] == {"languages": ["en"], "threshold": 0.65}
    assert params["fineweb_quality"]["line_punct_thr"] == 0.12 and params["c4_quality"]


def test_an_unsupported_code_is_a_config_error_listing_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prep.language=klingon"])
    message = str(err.value)
    assert "prep.language" in message and "unsupported language 'klingon'" in message
    assert "zh" in message and "de" in message and "en" in message


def test_hard_wrapped_chinese_lines_are_joined_and_paragraph_lines_kept() -> None:
    from dataprep.normalize import HardWrapJoin

    join = HardWrapJoin(("。", "！", "？", "”"))
    pair = ["    高俅投托得柳大郎家，一住三年。后来哲宗天子因拜南郊，感得风", "调雨顺，放宽恩大赦天下。"]
    wrapped = "\n".join(pair * 6)
    out = join.format(wrapped)
    assert out.count("\n") == 5 and "感得风调雨顺" in out
    paragraphs = "\n".join(["悟空喜道：“老师父果然注意与我传道，故此开着门也。”", "即曳步近前，侧身进得门里。"] * 6)
    assert join.format(paragraphs) == paragraphs


def test_outcome_warnings_name_the_filter_the_keys_and_a_stage_that_kept_little() -> None:
    stats = {"docs_in": 100, "docs_out": 10, "bytes_in": 1000, "bytes_out": 100,
             "dropped_malformed": 0, "dropped_language": 70, "bytes_dropped_language": 700, "bytes_edited_language": 0,
             "dropped_c4_quality": 20, "bytes_dropped_c4_quality": 100, "bytes_edited_c4_quality": 100,
             "dropped_exact_dedup": 0}
    lines = outcome_warnings(stats)
    assert any("language dropped 70 of the 100" in w and "prep.language" in w for w in lines)
    # c4 took 20 of the 30 documents that reached it, and 200 of 300 bytes
    assert any(w.startswith("prep: c4_quality dropped 20 of the 30") and "prep.filters.c4_quality" in w
               for w in lines)
    assert any("kept 10 of 100 documents" in w for w in lines)
    assert outcome_warnings({"docs_in": 10, "docs_out": 9, "bytes_in": 10, "bytes_out": 9, "dropped_length": 1}) == []


def test_the_chinese_config_is_valid_and_its_review_task_reads_as_characters() -> None:
    from training.tasks import ClassificationTask

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "chinese.yaml")
    assert cfg.prep.language == "zh" and all(p.endswith(".txt") for p in cfg.data.inputs)
    train, dev = ClassificationTask().load(cfg.finetune.tasks[0])
    assert len(train) == 36_029 and len(dev) == 4_515  # the shared README's row counts
    assert {e.label for e in dev} == {"0", "1"} and any("不错" in e.text for e in dev)
