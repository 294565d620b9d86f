"""Studies built on the simulator: the SLO search (study), the sweep over devices and
processes (sweep), the closed-form bounds (bounds), the PAM study reproduced (reproduce), the
engine benchmark (bench), and their CSV/JSON/PNG writers (report, plots).

Import the modules themselves (``from pamjax.studies import study``); the names users need
most are also in the flat public API (``pamjax.run_sweep``, ``pamjax.peak_under_slo``).
"""
