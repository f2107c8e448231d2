"""The one exception type for mistakes a user can fix."""


class VramfitError(ValueError):
    """Bad input: the message says what is wrong and what to do instead.

    The CLI prints it as one line and exits with code 2; anything else is a bug.
    """
