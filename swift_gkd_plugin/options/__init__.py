"""The flags and the checks that run before any model loads, for ``swift rlhf`` and ``megatron rlhf`` alike: the
plugin's own flags, each a dataclass field with its help (``flags.py``), the checks that name a flag, its value and
the allowed values (``flag_checks.py``), ms-swift's flag table read without importing its pipelines
(``ms_swift_flag_table.py``, generated into ``_ms_swift_flags.py``), local paths and hub ids (``local_paths.py``,
``hub_models.py``). Imports only core/. A new flag goes in ``flags.py``; a new check on a value in ``flag_checks.py``."""
