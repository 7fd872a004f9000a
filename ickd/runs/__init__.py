"""The lowest platform layer: what a run folder is and how it is written, neutral of any tool.

Standard library and ``ickd.errors`` only, so the core (whose trainer writes the run folder) may use it:
``rundir`` (RunDir: every file name of a run folder), ``atomic`` (atomic writes), ``slurm`` (the SLURM
environment), ``signals`` (the preemption guard and events.jsonl), ``exits`` (exit codes), ``roots``
(where studies and launches live)."""
