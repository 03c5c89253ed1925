"""What Python, ms-swift and the shell run first: the start-up hook every process imports through
``swift_gkd_plugin.pth`` (``bootstrap.py``), the one module that patches ms-swift (``activation.py``), and the
``swift-gkd`` command (``cli.py``). The top of the house: nothing of the package imports it but the start-up hook
and ``plugin/activate_swift_gkd.py``. A new hook on an ms-swift module goes in ``bootstrap._HOOKS`` and
``activation.py``; a new ``swift-gkd`` subcommand in ``cli.py``."""
