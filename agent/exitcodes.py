"""The exit codes of the ``egress-agent`` command line: 0 success, 1 a
runtime failure (permissions, kernel refused), 2 bad input (policy file or
arguments)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
