"""The commands of ``expandctl``, one Typer module each; :data:`expandctl.cli.COMMANDS` registers them.

Shared options are declared once in :mod:`.options`; the error guard, exit codes and argument parsing
live in :mod:`.runtime`. A command module parses its flags, calls its library verb
(:mod:`expandctl.workflows`, :mod:`expandctl.train`, ...) and prints the result; it imports the library
inside the command function, so ``--help`` loads no torch.
"""
