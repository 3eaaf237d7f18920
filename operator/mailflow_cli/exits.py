"""The command's exit codes: 0 clean, 1 problems found in the inputs, 2 usage errors."""

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
