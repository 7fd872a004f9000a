"""Reports, the top platform layer: what studies and comparisons found.

- ``study``: a study's self-contained HTML report (``ickd report``), from a :class:`ickd.sweep.reader.StudyReader`
  and the run folders (:class:`ickd.runs.rundir.RunDir`);
- ``wandb_report``: the same facts as a W&B Report (``ickd report --wandb``);
- ``compare``: ``ickd compare`` (retrain rows over seeds locally or through ``ickd.launch``, then the table);
- ``cli``: ``ickd report``'s command line.

Reads studies through StudyReader only (never the sweep CLI); may use launch (compare submits jobs),
sweep, track, runs and the core. Nothing below imports it.
"""
