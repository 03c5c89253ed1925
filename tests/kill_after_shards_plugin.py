"""TEST-ONLY (``--external_plugins``): a teacher-score run (``--save_teacher_scores STORE``) that kills itself with
SIGKILL, as ``kill -9`` would, once ``GKD_TEST_KILL_AFTER_SHARDS`` shard files are in ``STORE/shards``; a shard a row
(``SWIFT_GKD_STORE_SHARD_BYTES=1``, set here: the store's writer reads it when it starts). Lets that run fork from the
test zygote: a variable other than ``GKD_TEST_*`` in its environment would start a fresh process."""
import glob
import os
import signal
import sys
import threading
import time

_WANT = int(os.environ['GKD_TEST_KILL_AFTER_SHARDS'])
_SHARDS = os.path.join(sys.argv[sys.argv.index('--save_teacher_scores') + 1], 'shards', '*.safetensors')
os.environ['SWIFT_GKD_STORE_SHARD_BYTES'] = '1'


def _kill_after_shards() -> None:
    while len(glob.glob(_SHARDS)) < _WANT:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


threading.Thread(target=_kill_after_shards, daemon=True).start()
