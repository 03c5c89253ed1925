"""TEST-ONLY (``--external_plugins``): the run's process may write files of at most ``GKD_TEST_FILE_SIZE_LIMIT``
bytes from here on, as under ``ulimit -f`` (``RLIMIT_FSIZE``, soft and hard), set when ms-swift loads the plugins,
before any model loads. Lets a run forked from the test zygote take the limit its fresh process would get from
``preexec_fn``."""
import os
import resource

_LIMIT = int(os.environ['GKD_TEST_FILE_SIZE_LIMIT'])
resource.setrlimit(resource.RLIMIT_FSIZE, (_LIMIT, _LIMIT))
