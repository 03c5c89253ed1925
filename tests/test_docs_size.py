"""Issue 97: the docs are read by what the reader wants. The README is scanned in a minute; the user pages (the guide,
the how-tos, the flag reference, the architecture) say how to do a thing and link the results pages, which hold every
measurement with its date, machine and command. A results page is named ``*_results.md``."""
from __future__ import annotations

import os
import re

from test_packaging import PROJECT

EN = os.path.join(PROJECT, 'docs_en')
#: The user pages' word budget (issue 97: 90.6k words in 22 pages before the split, measurements and how-to mixed).
MOST_USER_PAGE_WORDS = 40_000
DATE = re.compile(r'\b20\d\d-\d\d-\d\d\b')
DURATION = re.compile(r'\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?\s?(?:s|sec|seconds|min|minutes|h|hours)\b')


def _readme_lines():
    with open(os.path.join(PROJECT, 'README.md'), encoding='utf-8') as f:
        return f.read().splitlines()


def words(path: str) -> int:
    with open(path, encoding='utf-8') as f:
        return len(f.read().split())


def user_pages() -> list:
    return sorted(n for n in os.listdir(EN) if n.endswith('.md') and not n.endswith('_results.md'))


def test_the_readme_is_scanned_in_a_minute():
    lines = _readme_lines()
    assert len(lines) <= 110, len(lines)
    top = '\n'.join(lines[:40])
    assert not DATE.findall(top), DATE.findall(top)
    assert len(DURATION.findall(top)) <= 3, DURATION.findall(top)


def test_the_readme_shows_a_dataset_row_and_names_ms_swift_among_the_tested_versions():
    text = '\n'.join(_readme_lines())
    assert re.search(r'^\{"messages": \[', text, re.M), 'no dataset row'
    tested = text[text.index('Tested versions'):]
    assert re.search(r'ms-swift[^\n]*4\.6', tested), tested[:400]


def test_the_user_pages_hold_at_most_the_word_budget():
    counts = {n: words(os.path.join(EN, n)) for n in user_pages()}
    assert sum(counts.values()) <= MOST_USER_PAGE_WORDS, sorted(counts.items(), key=lambda kv: -kv[1])


def test_there_are_results_pages_and_the_guide_links_each():
    results = sorted(n for n in os.listdir(EN) if n.endswith('_results.md'))
    assert len(results) >= 3, results
    with open(os.path.join(EN, 'README.md'), encoding='utf-8') as f:
        guide = f.read()
    assert [n for n in results if f']({n}' not in guide] == []
