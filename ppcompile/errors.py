"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class CompileError(ValueError):
    """Bad input to the compiler: the message names the offending value and what would work."""


class PassError(RuntimeError):
    """An internal failure inside a compiler pass, wrapped with the pass's name."""

    def __init__(self, pass_name: str, cause: BaseException):
        super().__init__(f"pass {pass_name!r} failed: {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
