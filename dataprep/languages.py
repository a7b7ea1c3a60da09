"""`prep.language`: one ISO 639 code that sets up every language-dependent part of prep.

For a language it gives: the fastText label the language filter keeps, the
datatrove word-tokenizer code every word-based filter and the MinHash shingles
use, the stop words and terminal punctuation, and quality thresholds.

Word tokenizers come from datatrove's table (`datatrove/assets/tokenizer_assignment.csv`).
The codes need care: datatrove's `load_word_tokenizer("zh")` is its multi-language
spaCy tokenizer, which keeps a whole Chinese sentence as one word, and `"zho"` a
whitespace tokenizer; `"cmn_Hani"` is spaCy's Chinese with jieba. So each code is
mapped to `<ISO 639-3>_<script>` here (zh, zho, cmn -> cmn_Hani) before datatrove sees it.

Thresholds: English keeps the FineWeb defaults of `dataprep.config`. For the
languages in `FINEWEB2` the figures are FineWeb-2's published per-language
configs (github.com/huggingface/fineweb-2, `configs/<lang>.yml`, commit d0defb2),
applied as its `fineweb-2-pipeline.py` applies them: Gopher repetition with
paragraph checks and line-character check off and the language's `dup_line_frac`,
`top_n_grams`, `dup_n_grams`; FineWeb quality with `short_line_thr` off (999),
`char_duplicates_ratio` 0.1 and the language's `line_punct_thr`, `new_line_ratio`;
Gopher quality with the language's word-length range, `max_non_alpha_words_ratio`
and stop words (at least 2); no C4 filter. One difference: FineWeb-2's
`language_score` is a GlotLID score, used here as the fastText lid.176 threshold.
Any other language datatrove has a tokenizer for gets the same FineWeb-2 shape
with English word-level thresholds and no stop-word rule.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# FineWeb-2 configs/<lang>.yml (huggingface/fineweb-2 @ d0defb2), the keys its pipeline uses.
FINEWEB2: dict[str, dict[str, Any]] = {
    "cmn_Hani": {
        "dup_line_frac": 0.287, "language_score": 0.692, "line_punct_thr": 0.106, "new_line_ratio": 0.178,
        "min_avg_word_length": 1, "max_avg_word_length": 5, "max_non_alpha_words_ratio": 0.735,
        "top_n_grams": [(2, 0.256), (3, 0.201), (4, 0.171)],
        "dup_n_grams": [(5, 0.198), (6, 0.182), (7, 0.167), (8, 0.154), (9, 0.14), (10, 0.127)],
        "stopwords": ["的", "年", "在", "月", "是", "和", "日", "了", "於", "·", "為", "有", "被", "人", "中", "为",
                      "他", "與", "後", "也", "而", "由"],
    },
    "deu_Latn": {
        "dup_line_frac": 0.263, "language_score": 0.821, "line_punct_thr": 0.0, "new_line_ratio": 0.152,
        "min_avg_word_length": 0, "max_avg_word_length": 15, "max_non_alpha_words_ratio": 0.774,
        "top_n_grams": [(2, 0.169), (3, 0.153), (4, 0.137)],
        "dup_n_grams": [(5, 0.141), (6, 0.134), (7, 0.126), (8, 0.117), (9, 0.108), (10, 0.098)],
        "stopwords": ["der", "und", "die", "in", "von", "im", "den", "des", "mit", "das", "er", "dem", "als",
                      "wurde", "für"],
    },
    "fra_Latn": {
        "dup_line_frac": 0.264, "language_score": 0.824, "line_punct_thr": 0.1, "new_line_ratio": 0.185,
        "min_avg_word_length": 2, "max_avg_word_length": 11, "max_non_alpha_words_ratio": 0.812,
        "top_n_grams": [(2, 0.161), (3, 0.149), (4, 0.134)],
        "dup_n_grams": [(5, 0.15), (6, 0.141), (7, 0.131), (8, 0.121), (9, 0.111), (10, 0.1)],
        "stopwords": ["de", "la", "le", "et", "à", "en", "l'", "des", "du", "les", "est", "d'", "un", "une", "il",
                      "dans", "par", "au"],
    },
    "spa_Latn": {
        "dup_line_frac": 0.252, "language_score": 0.84, "line_punct_thr": 0.182, "new_line_ratio": 0.138,
        "min_avg_word_length": 3, "max_avg_word_length": 14, "max_non_alpha_words_ratio": 0.825,
        "top_n_grams": [(2, 0.156), (3, 0.14), (4, 0.125)],
        "dup_n_grams": [(5, 0.145), (6, 0.136), (7, 0.127), (8, 0.117), (9, 0.108), (10, 0.099)],
        "stopwords": ["de", "la", "en", "el", "y", "a", "que", "del", "los", "se", "por", "un", "con", "una", "las",
                      "su"],
    },
    "rus_Cyrl": {
        "dup_line_frac": 0.322, "language_score": 0.9, "line_punct_thr": 0.231, "new_line_ratio": 0.139,
        "min_avg_word_length": 3, "max_avg_word_length": 11, "max_non_alpha_words_ratio": 0.713,
        "top_n_grams": [(2, 0.184), (3, 0.164), (4, 0.146)],
        "dup_n_grams": [(5, 0.168), (6, 0.156), (7, 0.145), (8, 0.133), (9, 0.121), (10, 0.109)],
        "stopwords": ["в", "и", "на", "с", "года", "по", "году", "из", "был", "к", "не", "от", "что", "за", "для",
                      "его", "как", "а", "он", "также", "до", "после"],
    },
}

# Where this project departs from FineWeb-2's figure, and why (measured on ../shared/data/chinese).
# max_non_alpha_words_ratio: jieba makes every punctuation mark a word, and literary prose is dense
# in them (dialogue quotes, short clauses): on 3,000-character pieces of the shared novels the share
# of words with a letter has median 0.73-0.75 and 10th percentile 0.71-0.74, so FineWeb-2's 0.735
# (tuned on web pages) drops about half of them; 0.65 keeps them and still drops symbol soup (~0)
# and navigation bars (~0.5).
OVERRIDES: dict[str, dict[str, Any]] = {"cmn_Hani": {"max_non_alpha_words_ratio": 0.65}}

# Codes whose datatrove entry is not the tokenizer one wants (see the module docstring).
ALIASES = {"zh": "cmn_Hani", "zho": "cmn_Hani", "cmn": "cmn_Hani", "zh_Hani": "cmn_Hani", "zho_Hani": "cmn_Hani",
           "en": "eng_Latn", "eng": "eng_Latn"}

# Lines ending in one of these count as sentence ends (FineWeb quality's line_punct_thr). Chinese ends
# sentences with full-width marks, and dialogue with a closing quote after them.
CJK_STOP_CHARS = ["。", "！", "？", "．", "…", "”", "」", "』"]
STOP_CHARS = {"cmn_Hani": CJK_STOP_CHARS}

# Packages a datatrove word tokenizer needs beyond spaCy (by tokenizer class, or spaCy language code).
_NEEDS = {"StanzaTokenizer": "stanza", "ThaiTokenizer": "pythainlp", "IndicNLPTokenizer": "indicnlp",
          "KiwiTokenizer": "kiwipiepy", "KhmerTokenizer": "khmernltk", "LaoTokenizer": "laonlp",
          "TibetanTokenizer": "botok", "BurmeseTokenizer": "pyidaungsu", "ja": "sudachipy", "vi": "pyvi",
          "zh": "jieba", "th": "pythainlp", "ko": "kiwipiepy"}


# Scripts written without spaces between words: wrapped lines can be joined with no separator.
UNSPACED_SCRIPTS = ("Hani", "Hans", "Hant", "Jpan", "Thai", "Khmr", "Laoo", "Mymr", "Tibt")


@dataclass(frozen=True)
class Language:
    code: str  # as the user wrote it
    tokenizer: str  # datatrove word-tokenizer code, <ISO 639-3>_<script>
    lid_label: str  # fastText lid.176 label to keep
    thresholds: dict[str, Any] = field(default_factory=dict, compare=False)  # FineWeb-2 figures, if published


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, str]]:
    """datatrove's tokenizer table by `<code_3>_<script>`, read without importing datatrove."""
    spec = importlib.util.find_spec("datatrove")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "tokenizer_assignment.csv"
    rows: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["type"] and _available(row):
                rows.setdefault(f"{row['code_3']}_{row['script']}", row)
    return rows


def _available(row: dict[str, str]) -> bool:
    need = _NEEDS.get(row["type"]) or (_NEEDS.get(row["tok_code"]) if row["type"] == "SpaCyTokenizer" else None)
    return need is None or importlib.util.find_spec(need) is not None


@lru_cache(maxsize=1)
def _codes() -> dict[str, str]:
    """Every accepted code -> its `<code_3>_<script>` key."""
    codes: dict[str, str] = {}
    for key, row in _table().items():
        codes[key] = key
        if row["default_script"] == "TRUE":
            codes.setdefault(row["code_3"], key)
            if row["code_1"] and row["default_code_1"] == "TRUE":
                codes.setdefault(row["code_1"], key)
    codes.update({a: k for a, k in ALIASES.items() if k in _table()})
    return codes


def supported_languages() -> list[str]:
    """The two-letter codes accepted (three-letter and `<code>_<script>` forms are accepted too)."""
    return sorted(c for c in _codes() if len(c) == 2)


def resolve_language(code: str) -> Language:
    """The Language for an ISO 639-1/3 code (or `<code_3>_<script>`); ValueError listing the supported ones."""
    key = _codes().get(code) or _codes().get(code.lower())
    if key is None:
        raise ValueError(f"unsupported language {code!r}: use an ISO 639-1 code datatrove has a word tokenizer "
                         f"for (or its ISO 639-3 / <code>_<script> form): {', '.join(supported_languages())}")
    row = _table()[key]
    thresholds = {**FINEWEB2[key], **OVERRIDES.get(key, {})} if key in FINEWEB2 else {}
    return Language(code=code, tokenizer=key, lid_label=row["code_1"] or row["code_3"], thresholds=thresholds)


def unspaced(lang: Language) -> bool:
    return lang.tokenizer.rsplit("_", 1)[-1] in UNSPACED_SCRIPTS


def stop_chars(lang: Language) -> list[str]:
    """Line ends that count as sentence ends for the language (datatrove's set when none is given here)."""
    from datatrove.utils.text import TERMINAL_PUNCTUATION

    return STOP_CHARS.get(lang.tokenizer) or sorted(TERMINAL_PUNCTUATION)


def language_filter_defaults(lang: Language) -> dict[str, dict[str, Any] | bool]:
    """What `prep.language` sets, per filter key: parameters to apply, or False (off unless the user sets it).

    English returns only the tokenizer code: its thresholds are the config defaults.
    """
    tok = {"language": lang.tokenizer}
    if lang.tokenizer == "eng_Latn":
        return {"language": {"languages": ["en"]}, "gopher_repetition": tok, "gopher_quality": tok,
                "c4_quality": tok, "fineweb_quality": tok}
    t = lang.thresholds
    repetition: dict[str, Any] = {**tok, "dup_para_frac": 0, "dup_line_char_frac": 0, "dup_para_char_frac": 0}
    quality: dict[str, Any] = {**tok, "stop_words": None, "min_stop_words": 0}
    fineweb: dict[str, Any] = {**tok, "short_line_thr": 999, "char_duplicates_ratio": 0.1}
    language: dict[str, Any] = {"languages": [lang.lid_label]}
    if t:
        repetition.update(dup_line_frac=t["dup_line_frac"], top_n_grams=t["top_n_grams"],
                          dup_n_grams=t["dup_n_grams"])
        quality.update(min_avg_word_length=t["min_avg_word_length"], max_avg_word_length=t["max_avg_word_length"],
                       max_non_alpha_words_ratio=t["max_non_alpha_words_ratio"], stop_words=t["stopwords"],
                       min_stop_words=2)
        fineweb.update(line_punct_thr=t["line_punct_thr"], new_line_ratio=t["new_line_ratio"])
        language["threshold"] = t["language_score"]
    if lang.tokenizer in STOP_CHARS:
        fineweb["stop_chars"] = STOP_CHARS[lang.tokenizer]
    return {"language": language, "gopher_repetition": repetition, "gopher_quality": quality,
            "c4_quality": False, "fineweb_quality": fineweb}


def effective_filters(filters: Any, language: str) -> dict[str, dict[str, Any] | bool]:
    """Each filter's parameters: the config defaults, then `prep.language`'s, then the keys the user set.

    `filters` is a `dataprep.config.FiltersConfig`; a filter the user turned off stays off, and a
    filter the language turns off (C4 outside English) runs only if the user named it.
    """
    lang_spec = resolve_language(language)
    defaults = language_filter_defaults(lang_spec)
    out: dict[str, dict[str, Any] | bool] = {}
    from dataprep.config import filter_sections

    for key in filter_sections():
        section = getattr(filters, key)
        named = key in filters.model_fields_set
        if section is False:
            out[key] = False
            continue
        lang = defaults.get(key, {})
        if lang is False:
            if not named:
                out[key] = False
                continue
            lang = {"language": lang_spec.tokenizer}  # switched on by the user: still the language's words
        params = section.model_dump()
        user_keys = section.model_fields_set if named else set()
        params.update({k: v for k, v in (lang or {}).items() if k not in user_keys})
        out[key] = params
    return out
