"""The one error type for bad input from the user: a config value, a data file, a tokenizer, a checkpoint, a
launcher whose process count does not match. Entry points print it as one line `error: <field> <problem>; <fix>`
and exit with code 2; nothing else in seqpar raises it."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: `field` names the setting or file, `problem` says what is wrong and `fix` how to put it right."""

    exit_code = 2

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field_name} {problem}; {fix}")
