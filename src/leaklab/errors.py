"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class LeaklabError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class UnknownNameError(LeaklabError):
    """A registry lookup failed; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str], hint: str = "") -> None:
        msg = f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.name = name
        self.valid = sorted(valid)
