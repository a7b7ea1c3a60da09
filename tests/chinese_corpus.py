"""A Chinese test corpus with known answers: real prose, planted exact and near copies, and junk.

Real documents (first in the file) are pieces of the shared novels (data.txt's own splitting, ~3,000 characters) and
Chinese Wikipedia paragraphs; copies and junk are made from them here, with a fixed seed. Each
record's id says what it is (`real/`, `exact/`, `near/`, `junk/<kind>/`). Holds no tests itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dataprep.readers import split_text

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHINESE = SHARED / "chinese"

SPAM = ["加微信领取免费资料，名额有限，先到先得！", "点击这里立即下载，海量小说免费看！",
        "本站最新网址请收藏，手机用户请访问移动版。", "全场五折包邮，限时抢购，错过再等一年！"]
NAV = ["首页", "新闻", "体育", "娱乐", "财经", "科技", "汽车", "房产", "教育", "旅游", "登录", "注册", "帮助",
       "联系我们", "网站地图", "返回顶部", "上一页", "下一页"]


def _novel_pieces(name: str, count: int, skip: int = 3) -> list[tuple[str, str]]:
    text = (CHINESE / "novels" / name).read_text(encoding="utf-8")
    pieces = split_text(text, 3000)[skip:]  # the first pieces hold the site's notices and tables of contents
    step = max(1, len(pieces) // count)
    return [(f"real/{name}:{suffix}", piece) for suffix, piece in pieces[::step][:count]]


def _wiki(count: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (CHINESE / "web" / "cmrc2018_wiki_paragraphs.jsonl").open(encoding="utf-8")]
    # CMRC's contexts are sometimes cut off mid-sentence (ending in a digit or a bare word): not whole documents
    rows = [r for r in rows if len(r["text"]) >= 400 and r["text"].rstrip().endswith("。")]
    return [(f"real/wiki/{r['id']}", r["text"]) for r in rows[:: max(1, len(rows) // count)][:count]]


def _near_copy(text: str, rng: random.Random, share: float = 0.01) -> str:
    """`text` with `share` of its characters (not line ends) replaced by other characters of the same text."""
    chars = list(text)
    pool = [c for c in chars if c.strip()]
    positions = [i for i, c in enumerate(chars) if c.strip()]
    for i in rng.sample(positions, max(1, int(share * len(chars)))):
        chars[i] = rng.choice(pool)
    return "".join(chars)


def _english(count: int) -> list[str]:
    rows = [json.loads(line) for line in (SHARED / "web" / "cleaneval_dev.jsonl").open(encoding="utf-8")]
    return [r["text"] for r in rows if len(r["text"]) > 1500][:count]


def build(seed: int = 0, novels: int = 40, wiki: int = 30, exact: int = 20, near: int = 20,
          junk_each: int = 8) -> list[dict[str, str]]:
    """Records `{"id", "text"}`: real ones, `exact` exact copies, `near` 1% near copies, 4 x `junk_each` junk."""
    rng = random.Random(seed)
    real = (_novel_pieces("xiyou_ji.txt", novels // 2) + _novel_pieces("shuihu_zhuan.txt", novels // 2)
            + _wiki(wiki))
    records = [{"id": i, "text": t} for i, t in real]
    rng.shuffle(records)
    originals = [t for i, t in real if "wiki" not in i]  # long pieces: a 1% change is many characters
    for k, text in enumerate(rng.sample(originals, exact)):
        records.append({"id": f"exact/{k}", "text": text})
    for k, text in enumerate(rng.sample(originals, near)):
        records.append({"id": f"near/{k}", "text": _near_copy(text, rng)})
    for k in range(junk_each):
        lines = [rng.choice(SPAM) for _ in range(40)]
        records.append({"id": f"junk/spam/{k}", "text": "\n".join(lines)})
        nav = ["  |  ".join(rng.sample(NAV, 8)) for _ in range(30)]
        records.append({"id": f"junk/nav/{k}", "text": "\n".join(nav)})
        soup = "\n".join("".join(rng.choice("★☆※◆◇■□▲△●○◎＃＆＠§№→←↑↓①②③④⑤|/\\~-=+*<>") for _ in range(60))
                         for _ in range(15))
        records.append({"id": f"junk/symbols/{k}", "text": soup})
    for k, text in enumerate(_english(junk_each)):
        records.append({"id": f"junk/english/{k}", "text": text})
    planted = records[len(real):]
    rng.shuffle(planted)  # after the real ones: with one task, dedup keeps the first of a set of copies
    return records[: len(real)] + planted


def write(path: Path, **kw: int) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build(**kw)), encoding="utf-8")
    return path
