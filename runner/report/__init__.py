"""The run report: a run's facts collected once, written as report.md and a self-contained report.html.

    build.py           collect(): the facts of a finished run (RunResult) -> Facts; write_report(); headline_lines()
                       for the CLI's last lines
    stage_sections.py  one section per stage, every field by name
    evaluation.py      the forgetting table and one table per evaluation set
    recipe_section.py  the resolved recipe and where each value came from
    formatting.py      numbers, sizes, durations and tables as text
    render.py          Blocks -> markdown and HTML (inline CSS, pictures embedded, no JavaScript)
    plots.py           latency histogram and confusion matrix (matplotlib)

Import the modules themselves; this file imports nothing.
"""
