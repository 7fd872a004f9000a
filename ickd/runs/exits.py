"""Exit codes of ickd's commands and processes, in one place, so schedulers, sweeps and launched
jobs can tell outcomes apart (README: "exit codes")."""
from __future__ import annotations

EXIT_ERROR = 1  # an unexpected error (a bug): with a traceback
EXIT_CONFIG_ERROR = 2  # a deliberate error (IckdError): bad config, missing file, ...
EXIT_NONFINITE = 3  # a NaN/inf loss
# Stopped for a signal with a checkpoint saved; run again to continue (EX_TEMPFAIL). A packed child
# exits with it when it wants to run again.
EXIT_INTERRUPTED = 75
EXIT_CTRL_C = 130  # Ctrl-C: stopped with a mid-epoch checkpoint (or aborted by a second Ctrl-C); rerun to continue
