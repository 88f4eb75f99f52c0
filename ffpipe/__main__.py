from ffpipe.cli import app

app(prog_name="ffpipe")
