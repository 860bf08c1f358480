"""``python -m stages.generate`` and ``accelerate launch -m stages.generate``: the stage's command."""

from stages.cli import stage_app

stage_app("generate")()
