"""The CLI's own: the typer app (:mod:`.app`), its options, the console that renders results,
the entry point (:mod:`.main`), and the commands that only read or combine others (stores, runs,
demo). ``python -m workflows.cli`` is ``wf``.
"""
