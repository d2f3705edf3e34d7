"""ConfigError: every refusal of the launcher's configuration, one line per problem."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration or invocation the launcher refuses. One line per problem:
    `<file>: <dotted.key>: <problem>; <fix>`."""

    def __init__(self, source: str, key: str, problem: str, fix: str = ""):
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        self.errors: list[ConfigError] = [self]
        super().__init__(f"{source}: {key}: {problem}" + (f"; {fix}" if fix else ""))

    @classmethod
    def many(cls, errors: list["ConfigError"]) -> "ConfigError":
        if len(errors) == 1:
            return errors[0]
        err = cls(errors[0].source, errors[0].key, errors[0].problem, errors[0].fix)
        err.args = ("\n".join(str(e) for e in errors),)
        err.errors = errors
        return err


def _did_you_mean(word: str, options) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
