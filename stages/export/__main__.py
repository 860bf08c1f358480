"""``python -m stages.export``: the stage's command."""

from stages.cli import stage_app

stage_app("export")()
