"""The process both adapters run in: how it ends (exit codes, torchrun's workers and launcher:
``process_exit.py``) and ms-swift's global state the plugin extends (its dataset columns: ``ms_swift_state.py``).
Imports nothing of the package; a new process-wide rule (a signal, an exit path) goes here."""
