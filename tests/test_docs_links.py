"""Every relative link of the docs resolves: the page exists and, for ``page.md#anchor``, the page has a heading whose
GitHub slug is the anchor. The docs were split into how-tos and results pages (issue 97); a moved section must not
leave a link behind. Checked: docs_en, docs_zh, both READMEs, benchmarks/README.md, examples/ and tests/gpu/README.md
(examples' shell comments name pages as ``docs_en/page.md#anchor``)."""
from __future__ import annotations

import glob
import os
import re
import unicodedata

from test_packaging import PROJECT

MARKDOWN = (glob.glob(os.path.join(PROJECT, 'docs_en', '*.md')) + glob.glob(os.path.join(PROJECT, 'docs_zh', '*.md'))
            + [os.path.join(PROJECT, p) for p in ('README.md', 'README_CN.md', 'benchmarks/README.md',
                                                  'examples/README.md', 'tests/gpu/README.md')])
LINK = re.compile(r'\]\(([^)\s]+)\)')
#: ``docs_en/page.md#anchor`` named in a script's or module's comment
PAGE_REFERENCE = re.compile(r'(docs_(?:en|zh)/[a-z_0-9]+\.md)(#[\w-]+)?')
#: tests that name pages that do not exist on purpose (an unknown page refused, this file's own pattern)
NAMING_MADE_UP_PAGES = ('test_docs_links.py', 'test_docs_parity.py')


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, links and backticks dropped, letters, digits, ``-``, ``_`` and
    spaces kept, spaces as ``-``."""
    heading = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading).strip().lower().replace('`', '')
    kept = (ch for ch in heading if ch in ' -_' or unicodedata.category(ch)[0] in 'LN' or unicodedata.category(ch) == 'Mn')
    return ''.join(kept).replace(' ', '-')


def anchors(path: str) -> set:
    seen, fence = {}, False
    with open(path, encoding='utf-8') as f:
        for line in f:
            fence ^= line.startswith('```')
            m = re.match(r'#{1,6} (.*)', line)
            if m and not fence:
                s = slug(m.group(1))
                seen[s] = seen.get(s, -1) + 1
    return {s if i == 0 else f'{s}-{i}' for s, n in seen.items() for i in range(n + 1)}


def broken(source: str, target: str) -> str:
    page, _, anchor = target.partition('#')
    path = os.path.normpath(os.path.join(os.path.dirname(source), page)) if page else source
    if not os.path.exists(path):
        return 'no such file'
    if anchor and path.endswith('.md') and anchor not in anchors(path):
        return 'no such heading'
    return ''


def test_the_slug_is_githubs():
    assert slug('Quality: the `top_k` of [SKD](skd.md), 2 seeds') == 'quality-the-top_k-of-skd-2-seeds'
    assert slug('错误输入 (bad input)') == '错误输入-bad-input'


def test_every_relative_link_of_the_docs_resolves():
    found = []
    for source in MARKDOWN:
        with open(source, encoding='utf-8') as f:
            text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
        for target in LINK.findall(text):
            if not re.match(r'[a-z]+:', target):
                why = broken(source, target)
                if why:
                    found.append(f'{os.path.relpath(source, PROJECT)}: ({target}) {why}')
    assert not found, '\n'.join(found)


def test_every_docs_page_named_by_the_code_examples_and_benchmarks_exists_with_its_heading():
    found = []
    for folder in ('swift_gkd_plugin', 'examples', 'benchmarks', 'tests'):
        for source in glob.glob(os.path.join(PROJECT, folder, '**', '*.*'), recursive=True):
            if not source.endswith(('.py', '.sh', '.md')) or '__pycache__' in source or \
                    os.path.basename(source) in NAMING_MADE_UP_PAGES:
                continue
            with open(source, encoding='utf-8') as f:
                for page, anchor in PAGE_REFERENCE.findall(f.read()):
                    why = broken(os.path.join(PROJECT, 'x'), page + anchor)
                    if why:
                        found.append(f'{os.path.relpath(source, PROJECT)}: {page}{anchor} {why}')
    assert not found, '\n'.join(sorted(set(found)))
