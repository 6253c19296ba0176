"""Sweeps: a plan of runs from tasks/tables.toml (plan), one claim per run id (claims), the loop that pulls
claimed runs and starts each in a fresh process (sweeper), and the launchers that start sweepers on one
machine or on a SLURM cluster through submitit (launch)."""
