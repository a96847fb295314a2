from semanticmim.cli import app

app(prog_name="semanticmim")
