"""``python -m stages.evaluate`` and ``accelerate launch -m stages.evaluate``: the stage's command."""

from stages.cli import stage_app

stage_app("evaluate")()
