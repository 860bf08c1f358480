"""``python -m stages.distill`` and ``accelerate launch -m stages.distill``: the stage's command."""

from stages.cli import stage_app

stage_app("distill")()
