"""`python -m stages ...` is the `semanticmim` command (torchrun: `torchrun ... -m stages pretrain ...`)."""

from stages.cli import app

app()
