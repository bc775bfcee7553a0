"""`python -m bnfold`: the `bnfold` command, as the console script runs it."""

from bnfold.cli import main

main()
