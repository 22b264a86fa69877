"""`python -m streamq` is the `streamq` command."""

from .cli import app

app(prog_name="streamq")
