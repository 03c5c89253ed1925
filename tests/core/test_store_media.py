"""core/scores/media.py: a multimodal row's key holds what its media are, and a store names its processor."""
import base64
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from swift_gkd_plugin.core.scores.media import media_digest, processor_fingerprint
from swift_gkd_plugin.core.scores.store import row_key


def _png(tmp_path, name, colour):
    path = str(tmp_path / name)
    Image.new('RGB', (4, 4), colour).save(path)
    return path


def test_a_text_rows_key_is_unchanged_and_media_change_it():
    ids, positions = [5, 6, 7, 8], [2, 3]
    assert media_digest() == media_digest([], None, []) == ''
    assert row_key(ids, positions, '') == row_key(ids, positions)  # (stores written before media were keyed)
    assert row_key(ids, positions, 'ab') != row_key(ids, positions)


def test_files_are_keyed_by_their_bytes_not_their_paths(tmp_path):
    red, red_copy, blue = _png(tmp_path, 'a.png', 'red'), _png(tmp_path, 'b.png', 'red'), _png(tmp_path, 'c.png', 'blue')
    assert media_digest([red]) == media_digest([red_copy]) != media_digest([blue])
    with open(red, 'rb') as f:
        data = f.read()
    url = 'data:image/png;base64,' + base64.b64encode(data).decode()
    assert media_digest([data]) == media_digest([url]) == media_digest([{'bytes': data, 'path': None}])
    assert media_digest([{'bytes': None, 'path': red}]) == media_digest([red])
    before = media_digest([red])
    Image.new('RGB', (4, 4), 'green').save(red)  # the file changed: its rows find no stale scores
    os.utime(red, ns=(1, 1))
    assert media_digest([red]) != before


def test_order_kind_and_count_are_part_of_the_digest(tmp_path):
    a, b = _png(tmp_path, 'a.png', 'red'), _png(tmp_path, 'b.png', 'blue')
    assert media_digest([a, b]) != media_digest([b, a])
    assert media_digest([a]) != media_digest(videos=[a]) != media_digest(audios=[a])
    assert media_digest([a, a]) != media_digest([a])
    assert media_digest(['https://x/a.png']) != media_digest(['https://x/b.png'])  # a URL: the string is the row's


def test_decoded_images_and_arrays_are_keyed_by_their_content():
    red, blue = Image.new('RGB', (4, 4), 'red'), Image.new('RGB', (4, 4), 'blue')
    assert media_digest([red]) == media_digest([red.copy()]) != media_digest([blue])
    assert media_digest([red]) != media_digest([red.convert('RGBA')])  # the mode too
    wave = np.arange(8, dtype=np.float32)
    assert media_digest(audios=[wave]) == media_digest(audios=[torch.arange(8, dtype=torch.float32)])
    assert media_digest(audios=[wave]) != media_digest(audios=[wave.reshape(2, 4)])  # the shape too
    assert media_digest(audios=[(wave, 16000)]) != media_digest(audios=[(wave, 8000)])


def test_a_medium_that_cannot_be_read_as_content_is_named():
    with pytest.raises(TypeError, match='type object cannot be keyed'):
        media_digest([object()])


def test_the_processor_fingerprint_reads_its_settings_files(tmp_path):
    assert processor_fingerprint(str(tmp_path)) == '' == processor_fingerprint('org/hub-id')
    (tmp_path / 'processor_config.json').write_text(json.dumps({'image_processor': {'size': 28, 'mean': [0.5]}}))
    one = processor_fingerprint(str(tmp_path))
    (tmp_path / 'processor_config.json').write_text(json.dumps({'image_processor': {'mean': [0.5], 'size': 28}}))
    assert processor_fingerprint(str(tmp_path)) == one and len(one) == 32  # (the keys' order does not count)
    (tmp_path / 'processor_config.json').write_text(json.dumps({'image_processor': {'size': 32, 'mean': [0.5]}}))
    assert processor_fingerprint(str(tmp_path)) != one
