"""Launching on SLURM (or locally) through submitit: resource profiles, fire-and-forget submission
with a launch manifest, preemption-safe tasks, and `ickd jobs` to follow them. Sits on top of the
core (and of ickd.sweep for study workers); the core never imports it."""
