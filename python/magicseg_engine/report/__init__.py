"""The `report` command: one self-contained HTML page showing a run's pairs and statistics.

gather.py reads the run (statistics from every finished sample's JSON, which pairs to show),
sampling.py chooses those pairs evenly across classes, thumbnails.py draws them, charts.py
draws the statistics, page.py writes the HTML and build.py ties them together.
"""

from magicseg_engine.report.build import MAX_SAMPLES, ReportSummary, build_report

__all__ = ["MAX_SAMPLES", "ReportSummary", "build_report"]
