"""README documents every command and every option of the command line (a new flag without docs fails here)."""

import re
from pathlib import Path

import typer.main

from ffpipe.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_command_and_option_is_in_the_readme():
    missing = []
    for name, command in typer.main.get_command(app).commands.items():
        if f"ffpipe {name}" not in README:
            missing.append(f"ffpipe {name}")
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            flags = [o for o in param.opts + param.secondary_opts if o.startswith("--")] or param.opts
            if not any(re.search(rf"{re.escape(flag)}(?![\w-])", README) for flag in flags):
                missing.append(f"ffpipe {name} {flags[0]}")
    assert not missing, f"not in README.md: {missing}"
