"""A generated corpus in the format of Search-R1's and ASearcher's wiki-18 (DPR's 100-word passages of the 2018
Wikipedia dump): one `{"id": "<line number>", "contents": "\\"Title\\"\\ntext"}` line per passage, each article's
passages consecutive. The dump itself cannot be downloaded here; this stands in for it."""

from __future__ import annotations

import json
from pathlib import Path

#: (title, passages) per article, in corpus order. "Alpha" is stored twice, apart: two pages of one title.
ARTICLES = [
    ("Alpha", ["Alpha is a river in the north.", "Its source lies in the hills.", "It joins the sea at Beta Bay."]),
    ("Beta Bay", ["Beta Bay is a bay of the western sea."]),
    ("Gamma", ["Gamma is a town on the Alpha river.", "Its mayor is Delta Smith."]),
    ("Alpha", ["Alpha is also a play of 1901 by an unknown author."]),
]


def wiki18_lines(articles=ARTICLES) -> list[dict[str, str]]:
    """The corpus lines: ids are line numbers, titles quoted, as in wiki-18."""
    lines = []
    for title, passages in articles:
        for text in passages:
            lines.append({"id": str(len(lines)), "contents": f'"{title}"\n{text}'})
    return lines


def write_wiki18(path: Path, articles=ARTICLES) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in wiki18_lines(articles)), encoding="utf-8")
    return path
