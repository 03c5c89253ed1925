"""What ms-swift 4.6's dataset preprocessors read from one row (``swift/dataset/preprocessor/core.py``): its messages or
query / response columns, a prompt and a response, its teacher columns and media; and why a row cannot be used.

Plain functions of a row (a ``dict`` as the dataset files give it) and ``--columns``, for the checks of
:mod:`swift_gkd_plugin.swift.setup.datasets` (which reads the files).
"""
from __future__ import annotations

import ast
import base64
import binascii
import json
import os
from typing import Dict, List, Optional, Tuple

from swift_gkd_plugin.core.constants import PRIVILEGED_COLUMNS

# the keys of ms-swift 4.6's MessagesPreprocessor and ResponsePreprocessor (swift/dataset/preprocessor/core.py)
MESSAGES_KEYS = ('messages', 'conversation', 'conversations')
ROLE_KEYS = ('role', 'from')
ASSISTANT_ROLES = ('assistant', 'gpt', 'bot')
USER_ROLES = ('user', 'human')
RESPONSE_KEYS = ('response', 'answer', 'output', 'targets', 'target', 'answer_key', 'answers', 'solution', 'text',
                 'completion', 'content')
MEDIA_KEYS = ('images', 'videos', 'audios')

#: the roles ms-swift 4.6's messages preprocessor accepts (aliases included), everything else fails its row
KNOWN_ROLES = ('system', 'user', 'human', 'assistant', 'gpt', 'bot', 'tool', 'tool_call', 'tool_response',
               'function_call', 'function-call', 'function_response', 'function-response', 'observation',
               'observations')
CONTENT_KEYS = ('content', 'value')


def row_problem(row: dict, columns: Dict[str, str]) -> Optional[str]:
    """Why ms-swift would drop ``row`` (a row its preprocessor or template cannot use), else None. A messages row:
    messages that are not a non-empty list of objects (a string is parsed as ms-swift does, as in a csv column), an
    unknown role, a missing, null or non-text content. A ``query`` / ``response`` row (ms-swift's response
    preprocessor, its column names included): a system, query or response that is not text. ShareGPT's ``user`` /
    ``assistant`` keys are not judged here."""
    row = mapped_row(row, columns)
    key = next((k for k in MESSAGES_KEYS if k in row), None)
    if key is None:
        return _response_row_problem(row)
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        return f'"{key}" is {_kind(messages)}, not a non-empty list of messages'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f'message {i} is {_kind(message)}, not an object'
        if not any(k in message for k in ROLE_KEYS):
            if i == 0 and set(USER_ROLES + ASSISTANT_ROLES) & set(message):
                return None  # ShareGPT's {"human": ..., "assistant": ...} pairs (its user and assistant keys)
            return f'message {i} has no "role"'
        role = _role(message)
        if role not in KNOWN_ROLES:
            return f'message {i} has the role {role!r}, not one of {", ".join(KNOWN_ROLES[:4])}, tool, ...'
        content = next((message[k] for k in CONTENT_KEYS if k in message), None)
        final_response = i == len(messages) - 1 and role in ASSISTANT_ROLES and content is not None
        if not isinstance(content, (str, list)) and not final_response:  # a final response: response_problem
            return f'message {i} ({role}): its content is {_kind(content)}, not text'
    return None


def response_problem(row: dict, columns: Dict[str, str]) -> Optional[str]:
    """A response (the last message, the assistant's, or a response column) that is not null and not text, such as a
    number: it does not encode, so the steps that encode the response (dataset steps, evaluation) drop the row, and
    the others, which encode the prompt alone, keep it."""
    row = mapped_row(row, columns)
    messages = _messages(row)
    if messages is not None:
        content = next((messages[-1][k] for k in CONTENT_KEYS if k in messages[-1]), None)
        if _role(messages[-1]) in ASSISTANT_ROLES and content is not None and not isinstance(content, (str, list)):
            return f'message {len(messages) - 1} (assistant): its content is {_kind(content)}, not text'
        return None
    source = _response_columns(row)['response'] if not any(k in row for k in MESSAGES_KEYS) else None
    value = row.get(source)
    value = value[0] if isinstance(value, list) and value else value  # ms-swift uses the first of a list
    return None if value is None or isinstance(value, str) else f'"{source}" is {_kind(value)}, not text'


# the columns of ms-swift 4.6's ResponsePreprocessor (swift/dataset/preprocessor/core.py), by what they become
RESPONSE_ROW_KEYS = {'system': ('system', 'system_prompt'),
                     'query': ('query', 'prompt', 'input', 'instruction', 'question', 'problem'),
                     'response': RESPONSE_KEYS}
#: the columns ms-swift's automatic preprocessor reads text from
READ_COLUMNS = MESSAGES_KEYS + tuple(key for keys in RESPONSE_ROW_KEYS.values() for key in keys)


def misspelt_columns(names) -> str:
    """`` (column 'respones' is not one ms-swift reads: did you mean 'response'?)`` for each of ``names`` that is no
    column ms-swift reads but close to one (a typo), else ``''``."""
    import difflib
    hints = []
    for name in sorted(n for n in names if n not in READ_COLUMNS + MEDIA_KEYS + PRIVILEGED_COLUMNS):
        close = difflib.get_close_matches(str(name).lower(), READ_COLUMNS, n=1, cutoff=0.75)
        if close:
            hints.append(f'column {name!r} is not one ms-swift reads: did you mean {close[0]!r}?')
    return f' ({"; ".join(hints)})' if hints else ''


def _response_row_problem(row: dict) -> Optional[str]:
    """A system or query column of a row without messages whose value is not text (a csv column of numbers only is
    read as numbers); a response column's: :func:`response_problem`."""
    for target, source in _response_columns(row).items():
        value = row.get(source)
        if target != 'response' and value is not None and not isinstance(value, str):
            return f'"{source}" is {_kind(value)}, not text'
    return None


def _response_columns(row: dict) -> Dict[str, Optional[str]]:
    """The column of ``row`` that ms-swift's response preprocessor reads as its system, query and response, as its
    ``safe_rename_columns`` maps them: case-insensitive, and two columns for one target map neither (a column named as
    the target itself is kept)."""
    lower = {key.lower(): key for key in row}
    columns = {}
    for target, keys in RESPONSE_ROW_KEYS.items():
        present = [lower[key] for key in keys if key in lower]
        columns[target] = present[0] if len(present) == 1 else (target if target in row else None)
    return columns


#: the roles a ``teacher_messages`` column may hold: ms-swift checks and renames only the ``messages`` column's
STANDARD_ROLES = ('system', 'user', 'assistant', 'tool', 'tool_call', 'tool_response')


def privileged_problem(row: dict, columns: Dict[str, str]) -> Optional[str]:
    """Why a row's ``teacher_prompt`` (text, or null) or ``teacher_messages`` (null, or a non-empty list of
    ``{"role", "content"}`` messages in ms-swift's own role names) cannot be used, else None. ms-swift reads these
    columns as they are, and the trainer refuses a column of another type only once both models are loaded."""
    row = {columns.get(key, key): value for key, value in row.items()}
    prompt = row.get('teacher_prompt')
    if prompt is not None and not isinstance(prompt, str):
        return f'teacher_prompt is {_kind(prompt)}; allowed: text (the teacher\'s version of the last user message)'
    messages = row.get('teacher_messages')
    if messages is None:
        return None
    allowed = ('allowed: a non-empty list of {"role": ..., "content": ...} messages (roles '
               f'{", ".join(STANDARD_ROLES)}), the teacher\'s prompt conversation')
    if not isinstance(messages, list) or not messages:
        return f'teacher_messages is {_kind(messages)}; {allowed}'
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get('role') in STANDARD_ROLES
                and isinstance(message.get('content'), (str, list))):
            return f'teacher_messages message {i} is {_kind(message)}; {allowed}'
    return _other_answer(messages[-1], row, columns)


def _other_answer(last: dict, row: dict, columns: Dict[str, str]) -> Optional[str]:
    """A ``teacher_messages`` that ends with an assistant answer other than the row's own (the student's response):
    the teacher would score that answer's tokens where the student scores its own (the step's error, after
    loading). Its prompt alone (the student's answer is appended), or the same answer, is what it may hold."""
    if last['role'] != 'assistant':
        return None
    answer = _dataset_answer(mapped_row(row, columns))
    if answer is None or answer == last['content']:
        return None
    return (f'teacher_messages ends with the assistant answer {_quoted(last["content"])} where the row\'s answer '
            f'(the response the student scores) is {_quoted(answer)}; allowed: the teacher\'s prompt alone (the '
            'student\'s response is appended to it), or ending with that same answer')


def _dataset_answer(row: dict):
    """The row's last answer as ms-swift reads it (the last message's content when it is the assistant's, else a
    response column's), or None (no answer, or a form not judged here such as ShareGPT's keys)."""
    messages = _messages(row)
    if messages is not None:
        if _sharegpt_pairs(messages) or _role(messages[-1]) not in ASSISTANT_ROLES:
            return None
        return next((messages[-1][k] for k in CONTENT_KEYS if k in messages[-1]), None)
    if any(k in row for k in MESSAGES_KEYS):
        return None
    value = row.get(_response_columns(row)['response'])
    return value[0] if isinstance(value, list) and value else value


def _quoted(value, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[:width] + '...'


def _kind(value) -> str:
    return 'null' if value is None else f'{type(value).__name__} {json.dumps(value, default=str)[:40]}'


def mapped_row(row: dict, columns: Dict[str, str]) -> dict:
    """``row`` after ``--columns``, a messages column given as a string parsed as ms-swift's messages preprocessor
    does (JSON, else a Python literal; left a string when neither parses)."""
    row = {columns.get(key, key): value for key, value in row.items()}
    for key in MESSAGES_KEYS:
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except ValueError:
                try:
                    row[key] = ast.literal_eval(row[key])
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                    pass
    return row


def _messages(row: dict) -> Optional[list]:
    for key in MESSAGES_KEYS:
        messages = row.get(key)
        if isinstance(messages, list) and messages:
            return messages
    return None


def _role(message) -> Optional[str]:
    return next((message[k] for k in ROLE_KEYS if k in message), None) if isinstance(message, dict) else None


def _sharegpt_pairs(messages: list) -> bool:
    """ShareGPT's key form, one ``{"human": q, "assistant": a}`` object a turn: ms-swift's ``sharegpt_to_messages``
    reads it where the first message has neither a role nor a content key."""
    return all(isinstance(m, dict) for m in messages) and not set(messages[0]) & set(ROLE_KEYS + CONTENT_KEYS)


def has_response(row: dict, columns: Dict[str, str]) -> bool:
    """Whether ms-swift's automatic preprocessor finds a non-empty assistant response in ``row`` (after
    ``--columns``)."""
    row = mapped_row(row, columns)
    messages = _messages(row)
    if messages is not None and _sharegpt_pairs(messages):  # {"human": q, "assistant": a} turns
        return next((messages[-1][k] for k in ASSISTANT_ROLES if k in messages[-1]), None) not in (None, '', [])
    if messages is not None:  # an empty content ('') encodes as a bare end of turn: nothing to distil either
        content = next((messages[-1][k] for k in CONTENT_KEYS if k in messages[-1]), None)
        return _role(messages[-1]) in ASSISTANT_ROLES and content not in ('', [])
    return any(row.get(key) not in (None, '', []) for key in RESPONSE_KEYS)


def has_prompt(row: dict, columns: Dict[str, str]) -> bool:
    """Whether ms-swift gives a row that :func:`row_problem` accepts (after ``--columns``) a user message, the prompt
    that on-policy and seq_kd steps sample a response to: a ``user`` / ``human`` message (ShareGPT's key of that name),
    or a query column that is not null (:data:`RESPONSE_ROW_KEYS`; Alpaca's ``instruction`` or ``input``)."""
    row = mapped_row(row, columns)
    messages = _messages(row)
    if messages is not None:
        return any(_role(m) in USER_ROLES or (isinstance(m, dict) and bool(set(m) & set(USER_ROLES))) for m in messages)
    if 'instruction' in row and 'input' in row:  # ms-swift's AlpacaPreprocessor: instruction or input
        return (row['instruction'] or row['input']) is not None
    source = _response_columns(row)['query']
    return source is not None and row.get(source) is not None


def empty_prompt(row: dict, columns: Dict[str, str]) -> bool:
    """A row with a prompt (:func:`has_prompt`) whose text is all blank (its system and user messages, ShareGPT's user
    keys, or the system and query columns; Alpaca's ``instruction`` and ``input``) and that names no media: a step
    that samples gives the model nothing to answer."""
    row = mapped_row(row, columns)
    if media_refs(row, {}):
        return False
    messages = _messages(row)
    if messages is not None and _sharegpt_pairs(messages):
        texts = [m[k] for m in messages for k in USER_ROLES if k in m]
    elif messages is not None:
        texts = [next((m[k] for k in CONTENT_KEYS if k in m), None) for m in messages
                 if _role(m) in USER_ROLES + ('system', )]
    elif 'instruction' in row and 'input' in row:
        texts = [row['instruction'], row['input'], row.get('system')]
    else:
        found = _response_columns(row)
        texts = [row.get(found['query']), row.get(found['system'])]
    return all(text is None or isinstance(text, str) and not text.strip() for text in texts)


def prompt_missing(row: dict, columns: Dict[str, str]) -> str:
    """What a row without a prompt (:func:`has_prompt`) gives instead, for the messages that name it."""
    row = mapped_row(row, columns)
    messages = _messages(row)
    if messages is not None:
        return f'messages of the roles {", ".join(str(_role(m)) for m in messages)} (no "user" message)'
    queries = [key for key in row if key.lower() in RESPONSE_ROW_KEYS['query']]
    why = (f'no query column ({", ".join(RESPONSE_ROW_KEYS["query"])})' if not queries else f'a null "{queries[0]}"'
           if len(queries) == 1 else f'the query columns {queries}, which ms-swift reads as none')
    return f'the column(s) {sorted(row)}, {why}: a response alone{misspelt_columns(row)}'


def media_refs(row: dict, columns: Dict[str, str]) -> List[Tuple[str, str]]:
    """``(column, reference)`` for each media file a row names (a path, a URL or inline base64), after
    ``--columns``: a string, or a list of strings / ``{"path": ...}`` dicts (``{"bytes": ...}`` is inline)."""
    row = {columns.get(key, key): value for key, value in row.items()}
    refs = []
    for key in MEDIA_KEYS:
        values = row.get(key)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, dict) and not value.get('bytes'):
                value = value.get('path')
            if isinstance(value, str) and value.strip():
                refs.append((key, value.strip()))
    return refs


def _local_file(ref: str) -> Optional[str]:
    """Where ms-swift reads a local media reference (as ``swift.template.vision_utils._check_path``: the working
    directory, else ``ROOT_IMAGE_DIR``), or None for a URL or inline base64 data, which are read at encoding time."""
    if ref.startswith(('http://', 'https://', 'data:')) or len(ref) > 2000:
        return None
    root = os.environ.get('ROOT_IMAGE_DIR')
    for candidate in (ref, os.path.join(root, ref) if root else None):
        if candidate and os.path.exists(os.path.expanduser(candidate)):
            return os.path.abspath(os.path.expanduser(candidate))
    try:
        base64.b64decode(ref, validate=True)
        return None  # inline data
    except (binascii.Error, ValueError):
        return ref  # a path that does not exist


def media_problem(key: str, ref: str) -> Optional[str]:
    """Why ms-swift could not read this media reference (a missing file, an image that does not open), or None."""
    path = _local_file(ref)
    if path is None:
        return None
    if not os.path.isfile(path):
        where = f'the working directory {os.getcwd()}' + (
            f' or ROOT_IMAGE_DIR {os.environ["ROOT_IMAGE_DIR"]}' if os.environ.get('ROOT_IMAGE_DIR') else '')
        return f'{key} {ref!r}: no such file (relative paths are read from {where})'
    if key == 'images':
        from PIL import Image
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            return f'{key} {ref!r}: not a readable image ({type(exc).__name__}: {exc})'
    return None


#: the media tag of each media column, as ms-swift's templates read them from the messages
MEDIA_TAGS = {'images': '<image>', 'videos': '<video>', 'audios': '<audio>'}


def media_tag_problem(row: dict, columns: Dict[str, str]) -> Optional[str]:
    """A messages row whose text holds more ``<image>`` (``<video>``, ``<audio>``) tags than the row has images
    (videos, audios): the template has no image for the tag and the model trains on the tag alone."""
    row = mapped_row(row, columns)
    messages = _messages(row)
    if messages is None:
        return None
    text = ''.join(m.get(k, '') for m in messages if isinstance(m, dict) for k in CONTENT_KEYS
                   if isinstance(m.get(k), str))
    given = [key for key, _ in media_refs(row, {})]
    for key, tag in MEDIA_TAGS.items():
        tags, media = text.count(tag), given.count(key)
        if tags > media:
            return (f'its messages hold {tags} {tag} tag(s) and the row {media} {key} (the "{key}" column): the '
                    f'template has no {key[:-1]} for the tag')
    return None
