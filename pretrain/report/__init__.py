"""``vitscale report``: a run's (or several runs') figures and header as an HTML page.

``series`` reads the run directories and extracts the data behind every figure (pure, no
matplotlib); ``page`` draws the figures with matplotlib and writes the page and ``report.json``.
"""
