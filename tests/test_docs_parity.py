"""Issue 57 item 5: the Chinese docs kept stale figures and statements beside the English ones (docs_zh/gpu_results.md
still called the measured Triton kernels "being written"), ``swift-gkd docs docs_zh/skd.md`` printed the English page,
and ``swift-gkd serve-teacher --template T`` on a local Qwen3 folder without ``--model_type`` failed after the load
started, with ms-swift's traceback.

docs_en is authoritative: every docs_en page has a docs_zh page of the same name, with the same sections (headings of
levels 1-3 in the same order) holding the same figures, section by section."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from decimal import Decimal

import pytest

from test_packaging import PROJECT, build, project_copy, record_paths  # noqa: F401 (project_copy: a fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'server'))
from test_hardening_serve_paths import _serve_refusal  # noqa: E402

SWIFT_GKD = os.path.join(os.path.dirname(sys.executable), 'swift-gkd')
EN, ZH = os.path.join(PROJECT, 'docs_en'), os.path.join(PROJECT, 'docs_zh')
PAGES = sorted(n for n in os.listdir(EN) if n.endswith('.md'))

#: Figures that may differ between a docs_en page and its docs_zh page: {page: {figure: reason}}. Empty: every
#: difference found was a stale or missing translation, fixed in docs_zh. Add an entry only with the reason.
ALLOWED_DIFFERENCES: dict = {}

#: A figure: a number (thousands separators, decimals, exponents) with what may follow it: a scale (k, M, 万, 亿), a
#: unit (x, %, GiB, ms, s, 倍, 秒, ...) or an ordinal suffix (90th), after an optional "x" (x1.06). Not part of a word,
#: an identifier or a version (qwen3, v0.1.0, 1e-4's exponent).
FIGURE = re.compile(
    r'(?<![A-Za-z0-9_.])(?<![0-9][eE]-)(?:[x×](?=\d))?'
    r'(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
    r'(\s?万|\s?亿|[Mk](?![A-Za-z])|)'
    r'(\s?(?:倍|毫秒|秒|分钟|x(?!\s?\d)|×(?!\s?\d)|%|GiB|MiB|KiB|GB|MB|B|ms|s|min|minutes|seconds|nats)|st|nd|rd|th)?'
    r'(?![A-Za-z0-9_])')
SCALE = {'k': 10**3, 'M': 10**6, '万': 10**4, '亿': 10**8}
HEADING = re.compile(r'#{1,3} ')


def figures(text: str) -> Counter:
    """The multiset of ``text``'s figures, written one way: "1,947" = "1947", "4970 万" = "49.7M". A bare one-digit
    number is left out (English writes "three seeds", Chinese "3 个种子"); so are list markers and link targets."""
    found = Counter()
    for line in text.splitlines():
        line = re.sub(r'^\s*(?:[-*+]|\d+\.)\s+', '', line)
        line = re.sub(r'\]\([^)]*\)', ']', line)
        for m in FIGURE.finditer(line):
            value, scale, unit = m.group(1).replace(',', ''), m.group(2).strip(), m.group(3)
            if scale:
                value = format((Decimal(value) * SCALE[scale]).normalize(), 'f')
            elif len(value) == 1 and not unit:
                continue
            found[value] += 1
    return found


def sections(text: str) -> list:
    """``(heading, body)`` of each section (levels 1-3; a ``#`` inside a code block is no heading)."""
    out, fence = [['(top)', []]], False
    for line in text.splitlines():
        fence ^= line.startswith('```')
        if not fence and HEADING.match(line):
            out.append([line, []])
        out[-1][1].append(line)
    return [(heading, '\n'.join(body)) for heading, body in out]


def figure_differences(en_text: str, zh_text: str, allowed=()) -> list:
    """One line per section whose figures differ (those in ``allowed`` left out): the English heading, the figures
    only in each language; or one line if the pages' sections differ."""
    en, zh = sections(en_text), sections(zh_text)
    if len(en) != len(zh):
        return [f'{len(en)} sections in docs_en, {len(zh)} in docs_zh: '
                f'{[h for h, _ in en]} against {[h for h, _ in zh]}']
    found = []
    for (heading, en_body), (_, zh_body) in zip(en, zh):
        a, b = figures(en_body), figures(zh_body)
        for figure in allowed:
            a.pop(figure, None), b.pop(figure, None)
        if a != b:
            found.append(f'{heading}: only in en {sorted((a - b).elements())}, only in zh {sorted((b - a).elements())}')
    return found


def test_figures_are_read_the_same_way_in_both_languages():
    assert figures('1,947 rows, 4970 万参数, 3.6x, 25.8 倍, 90th, x1.06, 5.4e-5, 8 s, 8 秒') == \
        figures('1947 行，49.7M parameters, 3.6 倍, 25.8x, 90 分位, 1.06 倍, 5.4e-5, 8 秒, 8 s')
    assert figures('qwen3 v0.1.0 top-k, three 3 seeds, [a](x/2024.md)\n1. item') == Counter()
    assert figures('1e-4 and 5.4e-5') == Counter({'1e-4': 1, '5.4e-5': 1})
    assert figures('Qwen2.5-0.5B')['0.5'] == 1 and figures('2.2-2.4x') == Counter({'2.2': 1, '2.4': 1})


def test_a_figure_changed_in_one_language_only_is_caught():
    """The check fails when one page's figure changes: shown on gpu_results.md's third run, 2.35x -> 2.36x."""
    with open(os.path.join(EN, 'gpu_results.md'), encoding='utf-8') as f:
        en = f.read()
    with open(os.path.join(ZH, 'gpu_results.md'), encoding='utf-8') as f:
        zh = f.read()
    assert en.count('| 2.35x |') == 1
    changed = figure_differences(en.replace('| 2.35x |', '| 2.36x |'), zh)
    assert len(changed) == 1 and "only in en ['2.36'], only in zh ['2.35']" in changed[0], changed
    assert 'The third run' in changed[0]


@pytest.mark.parametrize('page', PAGES)
def test_docs_zh_page_has_the_figures_of_docs_en(page):
    zh_path = os.path.join(ZH, page)
    assert os.path.isfile(zh_path), f'docs_en/{page} has no docs_zh/{page}: translate it'
    with open(os.path.join(EN, page), encoding='utf-8') as f, open(zh_path, encoding='utf-8') as g:
        differences = figure_differences(f.read(), g.read(), ALLOWED_DIFFERENCES.get(page, {}))
    assert not differences, f'docs_zh/{page} differs from docs_en/{page} (docs_en is authoritative):\n' + \
        '\n'.join(differences)


def test_no_docs_zh_page_without_a_docs_en_page():
    assert sorted(n for n in os.listdir(ZH) if n.endswith('.md')) == PAGES


def _docs(*argv):
    return subprocess.run([SWIFT_GKD, 'docs', *argv], capture_output=True, text=True, timeout=120)


def _served(lang):
    """Where ``swift-gkd docs`` serves ``lang`` from: the installed package's copy (CI's regular install), or the
    checkout's (an editable install)."""
    from swift_gkd_plugin.entry.cli import docs_dir
    return docs_dir(lang)


@pytest.mark.parametrize('argv', [['docs_zh/skd.md'], ['zh/skd'], ['--lang', 'zh', 'skd'], ['--lang', 'zh', 'skd.md'],
                                  [os.path.join(ZH, 'skd.md')]])
def test_swift_gkd_docs_serves_a_chinese_page(argv):
    done = _docs(*argv)
    served = os.path.join(_served('zh'), 'skd.md')
    assert done.returncode == 0 and done.stdout.strip() == served, done.stdout + done.stderr
    with open(served) as page, open(os.path.join(ZH, 'skd.md')) as checkout:
        assert page.read() == checkout.read()  # the Chinese page, not the English one


def test_swift_gkd_docs_lists_the_chinese_pages_and_keeps_english_the_default():
    english = os.path.join(_served('en'), 'skd.md')
    assert _docs('skd').stdout.strip() == _docs('docs_en/skd.md').stdout.strip() == english
    listing = _docs('--lang', 'zh').stdout.splitlines()
    assert listing[0] == _served('zh') and 'gpu_results' in listing[1]


@pytest.mark.parametrize('argv,needle', [
    (['nope'], "no page 'nope' in docs_en (pages: README, architecture, "),
    (['docs_zh/nope.md'], "no page 'docs_zh/nope.md' in docs_zh (pages: README, architecture, "),
    (['docs_fr/skd.md'], "no language 'docs_fr' in page 'docs_fr/skd.md' (languages: en, zh, docs_en, docs_zh)"),
    (['--lang', 'en', 'docs_zh/skd.md'], "page 'docs_zh/skd.md' is in docs_zh, not --lang en"),
])
def test_swift_gkd_docs_refuses_an_unknown_page_in_one_line(argv, needle):
    done = _docs(*argv)
    assert done.returncode == 2 and not done.stdout, done.stdout + done.stderr
    assert done.stderr.count('\n') == 1 and done.stderr.startswith(f'swift-gkd docs: error: {needle}'), done.stderr


def test_wheel_ships_the_chinese_docs(project_copy, tmp_path):
    """The regular wheel carries docs_zh beside docs_en (``swift-gkd docs --lang zh`` finds it in the package); its
    links to ``../docs_en/img/`` stay links, as docs_en is shipped beside it."""
    with zipfile.ZipFile(build(project_copy, 'build_wheel', tmp_path / 'dist')) as wheel:
        assert {f'swift_gkd_plugin/docs_zh/{page}' for page in PAGES} <= set(wheel.namelist())
        assert 'swift_gkd_plugin/docs_zh/skd.md' in record_paths(wheel)
        quality, rl = (wheel.read(f'swift_gkd_plugin/docs_zh/{page}').decode() for page in ('quality_results.md', 'rl.md'))
        assert '](../docs_en/img/quality_exact_match_bar.png)' in quality
        assert '`examples/gkd_rl_reward.sh` (in the source tree)' in rl
        wheel.extractall(tmp_path / 'site')
    code = ('import site, sys; site.addsitedir(sys.argv[1]); from swift_gkd_plugin.entry import cli; '
            'sys.exit(cli.show_docs("docs_zh/skd.md"))')
    done = subprocess.run([sys.executable, '-I', '-S', '-c', code, str(tmp_path / 'site')], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == str(tmp_path / 'site' / 'swift_gkd_plugin' / 'docs_zh' / 'skd.md'), done.stderr


def test_serve_teacher_asks_for_model_type_before_loading(tiny_ws):
    """The tiny Qwen3 teacher's folder: ms-swift cannot tell qwen3 from qwen3_emb / qwen3_reranker by its
    architecture, which ``--template`` needs (a 24-line traceback after the load started, exit code 1)."""
    error = _serve_refusal(['--model', tiny_ws.teacher, '--template', 'qwen3_nothinking'])
    assert (f'--model {tiny_ws.teacher}: ms-swift cannot tell its model type (architecture Qwen3ForCausalLM is one of '
            'qwen3, qwen3_emb, qwen3_reranker), which --template qwen3_nothinking needs: pass --model_type, e.g. '
            '--model_type qwen3') in error
    error = _serve_refusal(['--model', tiny_ws.teacher, '--model_type', 'qwen33', '--template', 'qwen3_nothinking'])
    assert "--model_type 'qwen33' is not an ms-swift model type (closest: qwen3" in error
